"""GPU quotas on the runtime: refused with the reason on machines without a GPU; on a GPU,
each instance runs on its own stream and its memory budget is enforced. The adapter's logic
(which framework, budgets that recover, the model's device) is also tested here without a GPU,
through fakes of the allocator hooks; what only a device can show is marked gpu."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

import apportion as ap
from apportion import gpu as gpu_mod
from apportion.gpu import gpu_available, gpu_unavailable_reason

needs_gpu = pytest.mark.skipif(not gpu_available(),
                               reason=f"no CUDA device is present: {gpu_unavailable_reason()}")


def cuda_torch() -> types.ModuleType:
    """torch, or a skip saying why it cannot use the GPU here."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support in this environment")
    return torch


@pytest.mark.skipif(gpu_available(), reason="this machine has a usable GPU")
def test_gpu_quota_without_a_gpu_is_a_quota_error_with_the_reason(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError, match=r"model 'm', field 'gpu': no usable GPU: ") as err:
        rt.add_model("m", model=lambda x: x, gpu=ap.GPU(device=0, streams=1))
    assert gpu_unavailable_reason() in str(err.value)
    assert (err.value.model, err.value.field) == ("m", "gpu")  # a config's error then names models.m.gpu
    assert rt.models == []


def test_gpu_quota_is_validated_before_anything_else(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError, match=r"model 'm', field 'gpu': must be apportion.GPU"):
        rt.add_model("m", model=lambda x: x, gpu={"device": 0})
    with pytest.raises(ap.QuotaError, match="sm_share and gpu.sm_count are both set"):
        ap.GPU(device=0, sm_share=0.5, sm_count=8)  # refused when built, before any model
    assert rt.models == []


@pytest.mark.gpu
@needs_gpu
def test_each_instance_runs_on_its_own_stream() -> None:
    torch = cuda_torch()
    seen = {}

    def factory(ctx):
        seen[ctx.instance] = ctx.gpu

        def model(x):
            return (torch.cuda.current_stream().cuda_stream, (x.cuda() * 2).cpu())

        return model

    with ap.Runtime() as rt:
        rt.add_model("m", factory=factory, instances=2, gpu=ap.GPU(device=0, streams=2, priority="high"))
        rt.start()
        results = [f.result(30) for f in rt.submit_many("m", [torch.ones(4)] * 8)]
        assert str(rt.plan()).count("m") >= 1
    streams = {g.stream_ptr for g in seen.values()}
    assert len(streams) == 2 and all(g.device == 0 for g in seen.values())
    assert {s for s, _ in results} <= streams
    assert all(torch.equal(y, torch.full((4,), 2.0)) for _, y in results)


@pytest.mark.gpu
@needs_gpu
def test_memory_budget_fails_only_the_request_that_exceeds_it() -> None:
    torch = cuda_torch()
    from apportion.adapters.gpu import GpuMemoryExceeded

    keep = []

    def hog(n):
        keep.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
        return n

    with ap.Runtime() as rt:
        rt.add_model("hog", model=hog, gpu=ap.GPU(device=0, memory="64MiB"))
        rt.add_model("other", model=lambda x: x + 1, gpu=ap.GPU(device=0))
        rt.start()
        assert rt.submit("hog", 1 << 20).result(30) == 1 << 20
        with pytest.raises(GpuMemoryExceeded, match="model 'hog': GPU memory budget exceeded"):
            rt.submit("hog", 256 << 20).result(30)
        assert rt.submit("other", 1).result(30) == 2
        assert rt.stats()["hog"].gpu_memory_peak_bytes >= 256 << 20


@pytest.mark.gpu
@needs_gpu
def test_torch_budget_recovers_after_two_overruns() -> None:
    torch = cuda_torch()
    from apportion.adapters.gpu import GpuMemoryExceeded

    def transient(n):
        return int(torch.empty(n, dtype=torch.uint8, device="cuda").numel())

    with ap.Runtime() as rt:
        rt.add_model("m", model=transient, gpu=ap.GPU(device=0, memory="64MiB"))
        rt.start()
        for _ in range(2):
            with pytest.raises(GpuMemoryExceeded, match="model 'm'"):
                rt.submit("m", 256 << 20).result(30)
        assert rt.submit("m", 1 << 20).result(30) == 1 << 20
        assert rt.stats()["m"].gpu_memory_bytes <= 64 << 20


@pytest.mark.gpu
@needs_gpu
def test_cupy_model_in_a_torch_process_runs_on_its_stream_through_cupy() -> None:
    pytest.importorskip("torch")
    cupy = pytest.importorskip("cupy")
    seen = {}

    def factory(ctx):
        def model(n):
            seen["stream"] = cupy.cuda.get_current_stream().ptr
            seen["want"] = ctx.gpu.stream_ptr
            return int(cupy.arange(n).sum())

        return model

    with ap.Runtime() as rt:
        rt.add_model("c", factory=factory, gpu=ap.GPU(device=0, memory="64MiB"))
        rt.start()
        assert rt.submit("c", 10).result(30) == 45
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
            rt.submit("c", 64 << 20).result(30)  # 512 MiB of int64
        assert rt.submit("c", 10).result(30) == 45
    assert seen["stream"] == seen["want"]


# --- the adapter's logic with fakes of the allocator hooks (no GPU needed) ---------------------

MiB = 1 << 20


class FakePool:
    """A caching allocator's pool: reserved grows to the peak of live and is never given back."""

    def __init__(self) -> None:
        self.reserved = 0
        self.live = 0


class Block:
    def __init__(self, pool: FakePool, n: int) -> None:
        self.pool, self.n = pool, n
        pool.live += n
        pool.reserved = max(pool.reserved, pool.live)

    def __del__(self) -> None:
        self.pool.live -= self.n


class FakeTorchBackend:
    name = "torch"

    def __init__(self) -> None:
        self.current: FakePool | None = None
        self.pools: list[FakePool] = []
        self.releases = 0

    @contextlib.contextmanager
    def scope(self, pool):
        self.current = pool
        try:
            yield
        finally:
            self.current = None

    def synchronize(self) -> None:
        pass

    def new_pool(self, budget: int) -> FakePool:
        self.pools.append(FakePool())
        return self.pools[-1]

    def held(self, pool: FakePool) -> int:
        return pool.reserved

    def live(self, pool: FakePool) -> int:
        return pool.live

    def release(self) -> None:
        self.releases += 1

    def alloc(self, n: int) -> Block:
        assert self.current is not None, "allocation outside the model's pool"
        return Block(self.current, n)


def gpu_context(device: int = 1) -> gpu_mod.GpuContext:
    return gpu_mod.GpuContext(model="m", device=device, stream_ptr=0x5EED, sm_count=16,
                              priority=-5, memory=64 * MiB, green_context=True)


def test_two_overruns_then_a_small_request_succeeds() -> None:
    from apportion.adapters.gpu import GpuMemoryExceeded, GpuUsage, _OnStream

    backend = FakeTorchBackend()
    usage = GpuUsage(64 * MiB)

    def transient(n: int) -> int:
        backend.alloc(n)  # freed on return, but the pool keeps the segment reserved
        return n

    serve = _OnStream(transient, gpu_context(), usage, backend, pooled=True)
    assert serve(MiB) == MiB
    for _ in range(2):
        with pytest.raises(GpuMemoryExceeded, match=r"model 'm': GPU memory budget exceeded on "
                                                    r"cuda:1 \(268435456 bytes held"):
            serve(256 * MiB)
    assert serve(MiB) == MiB
    assert usage.used == MiB and usage.peak == 256 * MiB
    assert len(backend.pools) == 3, "each overrun replaced the pool"
    assert backend.releases == 2
    assert usage.ledgers["torch"].retired == [], "nothing lives in the old pools: dropped"


def test_what_the_model_keeps_from_an_overrun_still_counts_until_it_lets_go() -> None:
    from apportion.adapters.gpu import GpuMemoryExceeded, GpuUsage, _OnStream

    backend = FakeTorchBackend()
    usage = GpuUsage(64 * MiB)
    keep: list[Block] = []

    def hoarder(n: int) -> int:
        keep.append(backend.alloc(n))
        return n

    serve = _OnStream(hoarder, gpu_context(), usage, backend, pooled=True)
    with pytest.raises(GpuMemoryExceeded):
        serve(256 * MiB)
    with pytest.raises(GpuMemoryExceeded, match=r"\(269484032 bytes held"):
        serve(MiB)  # 256 MiB still alive in the retired pool, plus this one
    keep.clear()
    assert serve(MiB) == MiB
    assert usage.used == MiB


def test_a_result_that_is_returned_is_released_when_its_request_fails() -> None:
    from apportion.adapters.gpu import GpuMemoryExceeded, GpuUsage, _OnStream

    backend = FakeTorchBackend()
    usage = GpuUsage(64 * MiB)
    serve = _OnStream(backend.alloc, gpu_context(), usage, backend, pooled=True)
    with pytest.raises(GpuMemoryExceeded):
        serve(128 * MiB)
    assert backend.pools[0].live == 0, "the failed request's result was dropped"
    assert usage.ledgers["torch"].retired == []
    assert serve(MiB).n == MiB


def test_a_request_that_raises_after_allocating_does_not_fail_the_next_one() -> None:
    from apportion.adapters.gpu import GpuUsage, _OnStream

    backend = FakeTorchBackend()
    usage = GpuUsage(64 * MiB)

    def model(n: int) -> int:
        backend.alloc(n)
        if n > MiB:
            raise ValueError("bad input")
        return n

    serve = _OnStream(model, gpu_context(), usage, backend, pooled=True)
    with pytest.raises(ValueError, match="bad input"):  # its own error, not the budget's
        serve(256 * MiB)
    # Its 256 MiB stayed reserved in the pool: the next request failed with "268435456 bytes held".
    assert usage.peak == 256 * MiB and len(backend.pools) == 2, "the over-budget pool was replaced"
    assert serve(MiB) == MiB and usage.used == MiB


class ThreadedBackend(FakeTorchBackend):
    """Allocations routed per thread, as torch's use_mem_pool routes them."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    @contextlib.contextmanager
    def scope(self, pool):
        self.local.current = pool
        try:
            yield
        finally:
            self.local.current = None

    def alloc(self, n: int) -> Block:
        return Block(self.local.current, n)


def test_a_pool_retired_while_a_call_runs_in_it_still_counts() -> None:
    # Instance B took the pool and had not allocated yet when instance A overran and retired
    # it; with nothing alive in it, the pool was dropped, and what B then made and kept counted
    # nowhere: later requests passed while the model held 3x its budget.
    from apportion.adapters.gpu import GpuMemoryExceeded, GpuUsage, _OnStream

    backend = ThreadedBackend()
    usage = GpuUsage(64 * MiB)
    kept: list[Block] = []
    entered, retired = threading.Event(), threading.Event()

    def model(req: str) -> str:
        if req == "late":
            entered.set()
            assert retired.wait(10)
            kept.append(backend.alloc(200 * MiB))
        elif req == "overrun":
            backend.alloc(256 * MiB)
        else:
            backend.alloc(MiB)
        return req

    a = _OnStream(model, gpu_context(), usage, backend, pooled=True)
    b = _OnStream(model, gpu_context(), usage, backend, pooled=True)
    late = ThreadPoolExecutor(1).submit(b, "late")
    assert entered.wait(10)
    with pytest.raises(GpuMemoryExceeded):
        a("overrun")
    retired.set()
    with pytest.raises(GpuMemoryExceeded, match=r"\(209715200 bytes held"):
        late.result(10)  # its 200 MiB, kept, is over the budget: counted against it
    with pytest.raises(GpuMemoryExceeded):
        a("small")  # still held by the model
    kept.clear()
    assert a("small") == "small" and usage.used == MiB


def fake_cupy() -> tuple[types.ModuleType, list[tuple]]:
    """Just enough of cupy.cuda for the adapter: records what is entered, on which device."""
    events: list[tuple] = []
    state = {"device": 0}
    cp = types.ModuleType("cupy")
    cuda = types.SimpleNamespace()

    class Device:
        def __init__(self, d: int) -> None:
            self.d = d

        def __enter__(self):
            self.prev, state["device"] = state["device"], self.d
            return self

        def __exit__(self, *exc):
            state["device"] = self.prev

    class ExternalStream:
        def __init__(self, ptr: int, device_id: int = -1) -> None:
            events.append(("stream", ptr, device_id))
            self.ptr = ptr

        def __enter__(self):
            events.append(("on stream", self.ptr, state["device"]))
            return self

        def __exit__(self, *exc):
            pass

        def synchronize(self) -> None:
            events.append(("synchronize", self.ptr))

    class MemoryPool:
        def __init__(self) -> None:
            self.used = 0

        def set_limit(self, size: int) -> None:
            events.append(("set_limit", size, state["device"]))

        def malloc(self, n: int):
            return n

        def used_bytes(self) -> int:
            events.append(("used_bytes", state["device"]))
            return self.used

    @contextlib.contextmanager
    def using_allocator(malloc):
        events.append(("allocator", state["device"]))
        yield

    cuda.Device, cuda.ExternalStream, cuda.MemoryPool = Device, ExternalStream, MemoryPool
    cuda.using_allocator = using_allocator
    cp.cuda = cuda
    cp.asarray = lambda x: x
    return cp, events


def test_a_cupy_model_in_a_process_that_imported_torch_goes_through_cupy(monkeypatch) -> None:
    pytest.importorskip("torch")  # the point: torch is imported in this process

    from apportion.adapters.gpu import GpuUsage, frameworks_used, wrap_for_gpu

    cp, events = fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    ns: dict = {"cp": cp}
    exec("def model(x):\n    return cp.asarray(x) * 2\n", ns)
    model = ns["model"]
    assert frameworks_used(model) == {"cupy"}

    serve = wrap_for_gpu(model, gpu_context(device=1), GpuUsage(64 * MiB))
    assert serve(21) == 42
    assert ("stream", 0x5EED, 1) in events
    # The budget and every call are bound to the model's device (1), not the current one (0).
    assert ("set_limit", 64 * MiB, 1) in events
    assert ("on stream", 0x5EED, 1) in events and ("allocator", 1) in events
    assert ("used_bytes", 1) in events
    assert ("synchronize", 0x5EED) in events


def test_frameworks_are_told_by_what_the_model_uses() -> None:
    torch = pytest.importorskip("torch")

    from apportion.adapters.gpu import _frameworks_for, frameworks_used

    cp, _ = fake_cupy()
    lin = torch.nn.Linear(2, 2)
    assert frameworks_used(lin) == {"torch"}

    def uses_torch(x):
        return torch.relu(x)

    def closure_over_module(x):
        return lin(x)

    class Holder:
        def __init__(self) -> None:
            self.net = lin

        def __call__(self, x):
            return self.net(x)

    both_ns: dict = {"cp": cp, "torch": torch}
    exec("def both(x):\n    return torch.as_tensor(cp.asarray(x))\n", both_ns)
    assert frameworks_used(uses_torch) == {"torch"}
    assert frameworks_used(closure_over_module) == {"torch"}
    assert frameworks_used(Holder()) == {"torch"}
    assert frameworks_used(functools.partial(closure_over_module)) == {"torch"}
    assert frameworks_used(lambda x: x + 1) == frozenset()
    assert _frameworks_for(both_ns["both"]) == ["torch", "cupy"]
    # Nothing to tell from: the imported framework decides (torch is imported here).
    assert _frameworks_for(len) == ["torch"]
