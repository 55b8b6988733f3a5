"""Process isolation: instances served from pinned child processes, crash and hang recovery,
clean shutdown. Factories live in process_models.py (the child imports them by path)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
from concurrent.futures import CancelledError
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import apportion as ap
from apportion._private import process as process_mod

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the children inherit it and import process_models

import process_models  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process isolation needs Linux")

# Deadlock guards only; nothing asserts on time.
LONG = 60.0


def our_segments() -> list[str]:
    prefix = f"{process_mod.SHM_PREFIX}{os.getpid()}-"
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


@pytest.fixture(autouse=True)
def no_leftovers(child_pids: Callable[[], set[int]]) -> Iterator[None]:
    before = child_pids()
    yield
    # Every runtime of the test is closed by now (fixtures and with-blocks).
    assert child_pids() - before == set(), "worker processes left behind"
    assert our_segments() == [], "shared-memory segments left behind"


# -- serving --------------------------------------------------------------------------------------
def test_serves_from_a_child_process_with_the_same_api(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:info", isolation="process", instances=2)
    rt.start()
    out = [rt.submit("m", i).result(timeout=LONG) for i in range(20)]
    assert [o["x"] for o in out] == list(range(20))
    pids = {o["pid"] for o in out}
    assert os.getpid() not in pids and {o["ppid"] for o in out} == {os.getpid()}
    assert {o["isolation"] for o in out} == {"process"}
    assert {o["model"] for o in out} == {"m"}
    assert len(pids) <= 2
    s = rt.stats()["m"]
    assert s.completed == 20 and s.failed == 0
    assert [f.result(timeout=LONG)["x"] for f in rt.submit_many("m", [1, 2, 3])] == [1, 2, 3]

    async def go() -> Any:
        return await rt.infer("m", "async")

    assert asyncio.run(go())["x"] == "async"


def test_a_module_level_function_is_accepted_as_factory(rt: ap.Runtime) -> None:
    rt.add_model("m", factory=process_models.echo, isolation="process")
    rt.start()
    assert rt.submit("m", "x").result(timeout=LONG) == "x"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_children_are_confined_to_their_instance_cpus(rt: ap.Runtime) -> None:
    cpu = max(os.sched_getaffinity(0))
    rt.add_model("pinned", factory="process_models:info", isolation="process", cores=str(cpu))
    rt.start()
    out = rt.submit("pinned", 0).result(timeout=LONG)
    assert out["cpus"] == [cpu] and out["ctx_cpus"] == (cpu,)
    status = Path(f"/proc/{out['pid']}/status").read_text()
    allowed = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                   if line.startswith("Cpus_allowed_list"))
    assert allowed == str(cpu)
    # Every thread of the child, not only the one that answered.
    for _tid, _name, cpus in ap._core.thread_affinities(out["pid"]):
        assert list(cpus) == [cpu]


def test_large_arrays_travel_out_of_band_and_small_ones_inline(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:echo", isolation="process")
    rt.start()
    big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
    small = np.arange(10, dtype=np.int64)
    got = rt.submit("m", {"big": big, "small": small, "s": "text"}).result(timeout=LONG)
    np.testing.assert_array_equal(got["big"], big)
    np.testing.assert_array_equal(got["small"], small)
    assert got["s"] == "text" and got["big"].flags.writeable
    parts = process_mod.dumps({"big": big, "small": small})
    assert len(parts) == 2 and memoryview(parts[1]).nbytes == big.nbytes


def test_torch_tensors_round_trip(rt: ap.Runtime) -> None:
    torch = pytest.importorskip("torch")
    rt.add_model("m", factory="process_models:echo", isolation="process")
    rt.start()
    for t in (torch.randn(512, 512), torch.randn(256, 256).to(torch.bfloat16), torch.arange(5)):
        got = rt.submit("m", t).result(timeout=LONG)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are read from /proc")
def test_a_childs_serving_thread_is_named_as_a_worker_so_its_threads_are_the_models(rt: ap.Runtime) -> None:
    # It kept the name "python": the confinement check (threads named ap:<model>:<i>, and those
    # they start) found none of the model's threads in a child.
    rt.add_model("named", factory="process_models:thread_name", isolation="process", instances=2)
    rt.start()
    got = {rt.submit("named", i).result(timeout=LONG) for i in range(8)}
    assert got <= {("ap:named:0", "ap:named:0"), ("ap:named:1", "ap:named:1")} and got


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_childs_context_says_whether_its_cpus_are_its_own() -> None:
    # It read isolation="process" either way, so adapters (ONNX Runtime's spinning) took a
    # process model with cores of its own for one on the shared pool.
    rt = ap.Runtime()
    try:
        rt.add_model("own", factory="process_models:context", isolation="process", cores=1)
        rt.add_model("pool", factory="process_models:context", isolation="process")
        rt.start()
        own, pool = rt.call("own", 0), rt.call("pool", 0)
        assert own["isolation"] == pool["isolation"] == "process"
        assert own["own_cpus"] is True and pool["own_cpus"] is False
        assert tuple(own["cpus"]) == rt.plan()["own"].cpus
    finally:
        rt.close()
    # Thread instances: an exclusive model's own, not its burst instances or a shared model's.
    seen: dict[tuple[str, bool], bool] = {}

    def record(ctx: ap.InstanceContext) -> Any:
        seen[(ctx.model, ctx.burst)] = ctx.own_cpus
        return lambda x: x

    with ap.Runtime(shared_pool="scheduled") as rt:
        rt.add_model("excl", factory=record, cores=1, isolation="exclusive", burst=True)
        rt.add_model("shared", factory=record)
        rt.start()
    assert seen == {("excl", False): True, ("excl", True): False, ("shared", False): False}


def test_a_model_with_a_very_long_name_starts_its_worker_process() -> None:
    # Its launch spec travelled as one command-line argument: beyond 128 KiB, start() failed
    # with OSError E2BIG ("Argument list too long"), naming no model.
    name = "m" * 200_000
    rt = ap.Runtime()
    try:
        rt.add_model(name, factory="process_models:echo", isolation="process")
        rt.start()
        assert rt.call(name, 5) == 5
    finally:
        rt.close()


def test_a_childs_warnings_are_warned_in_the_parent_naming_the_model() -> None:
    # They went to the child's stderr: the caller's filters, handlers and logging never saw a
    # confinement (PinningWarning) or any other warning of a process-isolated model.
    rt = ap.Runtime()
    try:
        rt.add_model("w", factory="process_models:warner", isolation="process")
        with pytest.warns(UserWarning, match=r"model 'w' instance 0 \(worker process\): built \(.*process_models.py"):
            rt.start()
        with pytest.warns(UserWarning, match=r"model 'w' instance 0 \(worker process\): call plain") as rec:
            assert rt.submit("w", "plain").result(timeout=LONG) == "plain"
        assert len(rec) == 1
        with pytest.warns(ap.PinningWarning, match=r"worker process\): call pin"):
            assert rt.call("w", "pin") == "pin"
        # A category the parent cannot import: a UserWarning that names it.
        with pytest.warns(UserWarning, match=r"__main__:LocalWarning: call local"):
            assert rt.call("w", "local") == "local"
        # Under -W error the warning fails its call, and the next call reads its own reply.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match="call strict"):
                rt.call("w", "strict")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert [rt.call("w", k) for k in ("a", "b")] == ["a", "b"]
    finally:
        rt.close()
    rt = ap.Runtime()
    try:
        rt.add_model("f", factory="process_models:warns_then_fails", isolation="process")
        with pytest.raises(RuntimeError, match="factory failed after warning") as err:
            rt.start()
        assert any("warned before it failed: builtins:UserWarning: about to fail" in n
                   for n in getattr(err.value, "__notes__", []))
    finally:
        rt.close()


def test_a_child_whose_factory_did_not_import_torch_sets_the_planned_threads_once_torch_is_there() -> None:
    # The factory imports nothing; torch arrives with a request's tensor, or in the model's
    # first call. The child ran on torch's default count (every CPU) from then on.
    torch = pytest.importorskip("torch")
    if torch.get_num_threads() < 2:
        pytest.skip("torch's default here is one thread: the planned count cannot differ from it")
    for first, want_first in ((torch.ones(1), 1), (0, None)):
        rt = ap.Runtime()
        try:
            rt.add_model("t", factory="process_models:lazy_torch_threads", isolation="process", threads=1)
            rt.start()
            got = rt.submit("t", first).result(timeout=LONG)
            if want_first is not None:  # torch came with the request: set before the call
                assert got == want_first
            assert rt.submit("t", 0).result(timeout=LONG) == 1  # and for every call after the first
        finally:
            rt.close()


def test_tensors_whose_bytes_are_not_their_values_or_layout_round_trip(rt: ap.Runtime) -> None:
    # Each >= 64 KiB (the out-of-band path): a quantized tensor came back as qint8 without its
    # scale (q_scale() failed), a conjugate view could not be sent, and a channels_last tensor
    # came back contiguous; plain pickle keeps all three.
    torch = pytest.importorskip("torch")
    rt.add_model("m", factory="process_models:echo", isolation="process")
    rt.start()
    with warnings.catch_warnings():  # torch deprecates quantized tensors (and their pickling's storage)
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(torch.randn(300, 300), scale=0.1, zero_point=3, dtype=torch.qint8)
        got = rt.submit("m", q).result(timeout=LONG)
    assert got.is_quantized and got.q_scale() == 0.1 and got.q_zero_point() == 3
    assert torch.equal(got.dequantize(), q.dequantize())
    c = torch.randn(200, 200, dtype=torch.complex64).conj()
    got = rt.submit("m", c).result(timeout=LONG)
    assert torch.equal(got, c)
    neg = torch.randn(200, 200, dtype=torch.complex64).conj()._neg_view()
    assert torch.equal(rt.submit("m", neg).result(timeout=LONG), neg)
    for t in (torch.randn(8, 64, 32, 32).to(memory_format=torch.channels_last),
              torch.randn(2, 8, 16, 32, 32).to(memory_format=torch.channels_last_3d),
              torch.randn(512, 256).t(), torch.randn(512, 512)[::2, 1:]):
        got = rt.submit("m", t).result(timeout=LONG)
        assert got.stride() == t.stride() and torch.equal(got, t), (t.shape, t.stride(), got.stride())
    # A nested tensor of 64 KiB or more could be sent neither way ("nested reshape cannot...").
    with warnings.catch_warnings():  # torch calls nested tensors a prototype
        warnings.simplefilter("ignore", UserWarning)
        nested = torch.nested.nested_tensor([torch.ones(3), torch.arange(1 << 15, dtype=torch.float32)])
        got = rt.submit("m", nested).result(timeout=LONG)
    assert got.is_nested and [p.tolist() for p in got.unbind()] == [p.tolist() for p in nested.unbind()]


def test_model_exception_reaches_the_caller_with_the_remote_traceback(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process")
    rt.start()
    with pytest.raises(ValueError, match="the model refused") as info:
        rt.submit("m", "raise").result(timeout=LONG)
    assert isinstance(info.value.__cause__, process_mod.RemoteTraceback)
    assert "process_models.py" in str(info.value.__cause__)
    assert rt.submit("m", 1).result(timeout=LONG) == 1


def test_batching_through_a_process_instance(rt: ap.Runtime, tally) -> None:
    rt.add_model("b", factory="process_models:double_batch", isolation="process",
                  batching=ap.Batching(max_size=8, max_delay_ms=2.0))
    rt.start()
    futs = [tally.watch(f) for f in rt.submit_many("b", list(range(50)))]
    assert [f.result(timeout=LONG) for f in futs] == [2 * i for i in range(50)]
    tally.check_once(futs)


def test_priorities_and_deadlines_apply_to_queued_requests(rt: ap.Runtime, tmp_path: Path,
                                                           tally) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process", priority_levels=2)
    rt.start()
    entered, release = tmp_path / "entered", tmp_path / "release"
    gate = tally.watch(rt.submit("m", ("gate", str(entered), str(release))), "gate")
    deadline_at = time.monotonic() + LONG
    while not entered.exists():
        assert time.monotonic() < deadline_at, "the gate request never started"
        time.sleep(0.005)
    low = [tally.watch(rt.submit("m", f"low{i}", priority=1), f"low{i}") for i in range(3)]
    high = [tally.watch(rt.submit("m", f"high{i}", priority=0), f"high{i}") for i in range(3)]
    late = tally.watch(rt.submit("m", "late", timeout_ms=1), "late")
    time.sleep(0.01)  # past the 1 ms deadline while the gate still holds the only instance
    release.touch()
    assert gate.result(timeout=LONG) == "gate"
    assert [f.result(timeout=LONG) for f in high + low] == [f"high{i}" for i in range(3)] + [f"low{i}" for i in range(3)]
    with pytest.raises(ap.DeadlineExceeded):
        late.result(timeout=LONG)
    tally.check_once([gate, *low, *high, late])
    served = [t for t in tally.order if t not in ("gate", "late")]
    assert served == [f"high{i}" for i in range(3)] + [f"low{i}" for i in range(3)]


# -- faults ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("trigger", "cause"), [("segv", "killed by signal SIGSEGV"),
                                                ("exit", "exited with code 7"),
                                                ("kill", "killed by signal SIGKILL"),
                                                # a reply frame no sender writes: the parent copied a
                                                # 1 GiB part from past the mapping (SIGSEGV)
                                                ("scribble", "wrote a malformed reply")])
def test_a_crash_fails_only_the_call_in_flight_and_the_child_is_restarted(
        rt: ap.Runtime, trigger: str, cause: str, tally) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process")
    rt.add_model("threaded", factory=lambda ctx: (lambda x: -x))
    rt.start()
    first = rt.submit("m", "info")
    assert first.result(timeout=LONG) == "info"
    crash = tally.watch(rt.submit("m", trigger))
    queued = [tally.watch(rt.submit("m", i)) for i in range(20)]
    others = [tally.watch(rt.submit("threaded", i)) for i in range(20)]
    with pytest.raises(ap.WorkerCrashed, match=cause) as info:
        crash.result(timeout=LONG)
    msg = str(info.value)
    assert "'m'" in msg and "instance 0" in msg
    assert info.value.model == "m" and info.value.instance == 0  # type: ignore[attr-defined]
    # Queued requests were not lost: the restarted child serves them, each exactly once.
    assert [f.result(timeout=LONG) for f in queued] == list(range(20))
    assert [f.result(timeout=LONG) for f in others] == [-i for i in range(20)]
    tally.check_once([crash, *queued, *others])
    s = rt.stats()["m"]
    assert s.completed + s.failed >= 22
    # The restart is counted (in the stats and on /metrics), for process models only.
    assert s.process_restarts == 1 and rt.stats()["threaded"].process_restarts is None
    from apportion.metrics import prometheus_text

    text = prometheus_text(rt.stats())
    assert 'apportion_process_restarts_total{model="m"} 1.0' in text
    assert 'apportion_process_restarts_total{model="threaded"}' not in text


def test_a_hung_child_is_killed_by_the_watchdog_and_replaced(rt: ap.Runtime, tally) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process", watchdog_s=0.5)
    rt.add_model("other", factory="process_models:echo", isolation="process")
    rt.start()
    hang = tally.watch(rt.submit("m", "hang"))
    after = [tally.watch(rt.submit("m", i)) for i in range(5)]
    assert rt.submit("other", "still serving").result(timeout=LONG) == "still serving"
    with pytest.raises(ap.WorkerCrashed, match=r"watchdog_s.*SIGKILL"):
        hang.result(timeout=LONG)
    assert [f.result(timeout=LONG) for f in after] == list(range(5))
    tally.check_once([hang, *after])


@pytest.mark.parametrize("how", ["close", "remove_model"])
def test_close_without_drain_kills_a_hung_child(tmp_path: Path, how: str) -> None:
    rt = ap.Runtime()
    try:
        rt.add_model("m", factory="process_models:faulty", isolation="process")  # no watchdog
        rt.start()
        entered = tmp_path / "entered"
        fut = rt.submit("m", ("hang_after", str(entered)))
        queued = rt.submit("m", 1)
        deadline = time.monotonic() + LONG
        while not entered.exists():
            assert time.monotonic() < deadline, "the hanging request never started"
            time.sleep(0.005)
        if how == "close":
            rt.close(drain=False)
        else:
            rt.remove_model("m", drain=False)
        with pytest.raises(ap.WorkerCrashed, match="drain=False"):
            fut.result(timeout=LONG)
        with pytest.raises(CancelledError):
            queued.result(timeout=LONG)
    finally:
        rt.close(drain=False)


def test_torch_model_is_adapted_in_the_child(rt: ap.Runtime) -> None:
    torch = pytest.importorskip("torch")
    rt.add_model("t", factory="process_models:torch_threads", isolation="process", cores=1, threads=1)
    rt.start()
    y, threads, inference = rt.submit("t", torch.ones(3, 4)).result(timeout=LONG)
    assert y.shape == (3, 2) and threads == 1 and inference


def test_repeated_crashes_back_off_and_recover(rt: ap.Runtime, tally, monkeypatch: pytest.MonkeyPatch) -> None:
    restarts: list[tuple[float, bool]] = []  # (back-off, waited out before the child started)

    def on_restart(delay_s: float, failed_at: float) -> None:
        restarts.append((delay_s, time.monotonic() >= failed_at + delay_s))

    monkeypatch.setattr(process_mod, "_on_restart", on_restart)
    rt.add_model("m", factory="process_models:faulty", isolation="process")
    rt.start()
    # Three crashes in a row, queued back to back: each restart waits twice as long as the one
    # before; the call that succeeds resets the back-off.
    futs = [tally.watch(rt.submit("m", "exit")) for _ in range(3)]
    futs.append(tally.watch(rt.submit("m", "ok")))
    for crash in futs[:3]:
        with pytest.raises(ap.WorkerCrashed, match="exited with code 7"):
            crash.result(timeout=LONG)
    assert futs[3].result(timeout=LONG) == "ok"
    first = process_mod._BACKOFF_FIRST_S
    assert restarts == [(first, True), (2 * first, True), (4 * first, True)]
    # Crash and success alternating: the back-off starts over after each success.
    futs += [tally.watch(rt.submit("m", x)) for x in ("exit", "ok")]
    with pytest.raises(ap.WorkerCrashed, match="exited with code 7"):
        futs[4].result(timeout=LONG)
    assert futs[5].result(timeout=LONG) == "ok"
    assert restarts[3:] == [(first, True)]
    tally.check_once(futs)
    assert rt.submit("m", 5).result(timeout=LONG) == 5


def test_a_request_the_child_cannot_unpickle_fails_alone(rt: ap.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # A class from a module that exists only in this process: pickled here, not importable there.
    mod = types.ModuleType("apportion_parent_only_module")

    class Unimportable:
        pass

    Unimportable.__module__ = mod.__name__
    Unimportable.__qualname__ = "Unimportable"
    mod.Unimportable = Unimportable  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    rt.add_model("m", factory="process_models:echo", isolation="process")
    rt.start()
    with pytest.raises(ModuleNotFoundError, match="apportion_parent_only_module"):
        rt.submit("m", Unimportable()).result(timeout=LONG)
    assert rt.submit("m", 2).result(timeout=LONG) == 2


def test_a_child_that_died_while_idle_is_replaced_before_the_next_call(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:info", isolation="process")
    rt.start()
    pid = rt.submit("m", 0).result(timeout=LONG)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LONG
    while Path(f"/proc/{pid}/stat").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The request was never seen by the dead child: it is served by the new one, not failed.
    out = rt.submit("m", 1).result(timeout=LONG)
    assert out["x"] == 1 and out["pid"] != pid


def test_a_request_larger_than_the_channel_fails_alone(rt: ap.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_mod, "RING_BYTES", 1 << 20)
    rt.add_model("m", factory="process_models:echo", isolation="process")
    rt.start()
    with pytest.raises(ValueError, match="'m'.*does not fit"):
        rt.submit("m", np.zeros(1 << 20, dtype=np.float32)).result(timeout=LONG)
    assert rt.submit("m", 3).result(timeout=LONG) == 3


def test_growing_messages_that_wrap_the_channel_go_through(rt: ap.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.45 then 0.6 of the channel, each way (echo): the second cannot fit before the ring's
    # end and, at its start, would cover the padding's header. It waited for ever, in the
    # request direction and in the reply direction, and close(drain=False) hung behind it.
    monkeypatch.setattr(process_mod, "RING_BYTES", 4 << 20)
    rt.add_model("m", factory="process_models:echo", isolation="process")
    rt.start()
    cap = 4 << 20
    for share in (0.45, 0.6, 0.3, 0.9, 0.5, 0.7):
        x = np.full(int(share * cap) // 4 - 1024, share, dtype=np.float32)
        got = rt.submit("m", x).result(timeout=LONG)
        assert got.shape == x.shape and got[0] == np.float32(share), share
    assert rt.submit("m", 3).result(timeout=LONG) == 3


# -- start and shutdown ---------------------------------------------------------------------------
@pytest.mark.parametrize("isolation", ["process", "shared"])
def test_a_model_that_failed_to_start_is_forgotten_with_its_worker_processes(
        isolation: str, child_pids: Callable[[], set[int]]) -> None:
    # Its instance 1 failed in start(): rt.models no longer listed it, yet adding it again read
    # "already registered", and instance 0's worker process lingered until close().
    rt = ap.Runtime()
    try:
        rt.add_model("ok", factory="process_models:echo", isolation=isolation)
        rt.add_model("m", factory="process_models:second_fails", isolation=isolation, instances=2)
        before = child_pids()
        with pytest.raises(RuntimeError, match="instance 1 of 'm' refuses"):
            rt.start()
        assert rt.models == ["ok"] and [m.name for m in rt.plan().models] == ["ok"]
        if isolation == "process":
            assert len(child_pids() - before) == 1  # the one of "ok" alone (a zombie of "m" stayed)
        rt.add_model("m", factory="process_models:echo", isolation=isolation)
        assert rt.call("m", 5) == 5 and rt.call("ok", 6) == 6
    finally:
        rt.close()


def test_a_configs_process_model_that_fails_to_start_is_named(tmp_path: Any) -> None:
    from apportion.config import Config, ConfigError, StartFailed

    def config(factory: str) -> Config:
        return Config.loads(f'[models.good]\nfactory = "process_models:echo"\nisolation = "process"\n'
                            f'[models.bad]\nfactory = "{factory}"\nisolation = "process"\n', "c.toml")

    # Was "models: a model failed to start: RuntimeError: ...", naming no model.
    with pytest.raises(StartFailed, match=r"failed on purpose .*\(raised by the factory of model 'bad', instance 0, "
                                          r"in its worker process\)"):
        config("process_models:failing_factory").runtime(start=True)
    with pytest.raises(StartFailed, match=r"factory returned int, which is not callable.*model 'bad', instance 0"):
        config("process_models:not_callable").runtime(start=True)
    # Was the worker's QuotaError as it was ("model 'bad', field 'factory'"), with no file or key.
    with pytest.raises(ConfigError, match=r"^c\.toml: models\.bad\.factory: 'process_models:no_such_factory' "
                                          r"cannot be imported") as missing:
        config("process_models:no_such_factory").runtime(start=True)
    assert type(missing.value) is ConfigError


def test_factory_errors_surface_from_add_model(rt: ap.Runtime) -> None:
    rt.start()
    with pytest.raises(RuntimeError, match="failed on purpose") as info:
        rt.add_model("a", factory="process_models:failing_factory", isolation="process")
    assert isinstance(info.value.__cause__, process_mod.RemoteTraceback)
    with pytest.raises(ap.WorkerCrashed, match="exited with code 3"):
        rt.add_model("b", factory="process_models:crashing_factory", isolation="process")
    with pytest.raises(TypeError, match="not callable"):
        rt.add_model("c", factory="process_models:not_callable", isolation="process")
    with pytest.raises(ap.QuotaError, match="'factory'.*no attribute") as missing:
        rt.add_model("d", factory="process_models:no_such_factory", isolation="process")
    assert (missing.value.model, missing.value.field) == ("d", "factory")
    assert rt.models == []
    rt.add_model("e", factory="process_models:echo", isolation="process")
    assert rt.submit("e", 1).result(timeout=LONG) == 1


def test_a_child_the_os_refuses_is_not_blamed_on_the_factory(rt: ap.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    # No fd or process left for the child: the note said the factory raised "in its worker
    # process", which never existed.
    import errno

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    rt.start()
    monkeypatch.setattr(process_mod.subprocess, "Popen", refuse)
    with pytest.raises(OSError, match="Too many open files") as info:
        rt.add_model("p", factory="process_models:echo", isolation="process")
    notes = getattr(info.value, "__notes__", [])
    assert any("starting the worker process of model 'p', instance 0: in this process, before the child ran; "
               "its factory did not run" in n for n in notes), notes
    assert not any("raised by the factory" in n for n in notes), notes
    assert rt.models == []
    monkeypatch.undo()
    rt.add_model("p", factory="process_models:echo", isolation="process")
    assert rt.submit("p", 4).result(timeout=LONG) == 4


def test_close_and_remove_model_end_children_and_segments(child_pids: Callable[[], set[int]]) -> None:
    rt = ap.Runtime()
    rt.add_model("a", factory="process_models:info", isolation="process", instances=2)
    rt.add_model("b", factory="process_models:info", isolation="process")
    rt.start()
    pa = {rt.submit("a", 0).result(timeout=LONG)["pid"]}
    pb = rt.submit("b", 0).result(timeout=LONG)["pid"]
    assert len(child_pids()) == 3
    rt.remove_model("b")
    assert pb not in child_pids()
    assert rt.submit("a", 1).result(timeout=LONG)["x"] == 1
    rt.close()
    assert child_pids() & pa == set()
    assert child_pids() == set() and our_segments() == []


def test_two_processes_with_one_pid_in_two_pid_namespaces_both_start_process_models() -> None:
    # Two containers of a pod share /dev/shm and each runs its service as pid 1: the channel
    # names (pid and a counter) were the same, and the second model failed to start with
    # "shm_open /apportion-1-0-i0: File exists". So did a process whose pid came back while a
    # segment of the old one was left.
    import shutil

    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-p", "-f", "--mount-proc", sys.executable, "-c",
                            "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60) \
        if unshare else None
    if probe is None or probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"no PID namespace here (unshare -p: {probe.stderr.strip() if probe else 'not installed'})")
    script = textwrap.dedent("""
        import os, sys, time
        import apportion as ap
        assert os.getpid() == 1
        time.sleep(float(sys.argv[1]))
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:info", isolation="process")
        rt.start()
        print(rt.call("p", 5)["x"])
        time.sleep(1.0)  # both hold their channels at once
        rt.close()
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent),
                                                         os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([unshare, "-p", "-f", "--mount-proc", sys.executable, "-c", script, delay],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for delay in ("0", "0")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "5", err[-2000:]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_leaves_the_children_to_the_parent(sig: str) -> None:
    # Ctrl-C in a terminal (or a service manager's stop) signals the whole process group. The
    # application drains on it, yet the child died of it and the call it served failed
    # (KeyboardInterrupt, or WorkerCrashed "killed by signal SIGTERM").
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import numpy as np
        sys.path.insert(0, {str(HERE)!r})
        import apportion as ap
        signal.signal(signal.{sig}, lambda *a: None)  # the application's own graceful stop
        rt = ap.Runtime()
        rt.add_model("m", factory="process_models:sleeper", isolation="process")
        rt.start()
        inflight = rt.submit("m", np.array([1.0]))
        queued = rt.submit("m", np.array([0.0]))
        time.sleep(0.3)
        os.killpg(os.getpgid(0), signal.{sig})
        rt.close(drain=True)
        print(inflight.result(timeout=30).tolist(), queued.result(timeout=30).tolist(), flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=LONG,
                          start_new_session=True)  # a group of its own, as a terminal's job is
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1.0] [0.0]", done.stdout + done.stderr


def test_children_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("m", factory="process_models:info", isolation="process")
        rt.start()
        print(rt.submit("m", 0).result(timeout=60)["pid"], flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + LONG
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the orphaned worker process kept running"
        time.sleep(0.02)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{process_mod.SHM_PREFIX}{parent.pid}-")]


# -- quotas ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"factory": process_models.echo, "watchdog_s": 1.0}, "'watchdog_s'.*isolation=\"process\""),
    ({"factory": "process_models:echo", "isolation": "process", "watchdog_s": 0}, "'watchdog_s'"),
    ({"factory": "process_models:echo", "isolation": "process", "watchdog_s": True}, "'watchdog_s'"),
    ({"factory": "process_models:echo", "isolation": "process", "watchdog_s": float("inf")}, "'watchdog_s'"),
    ({"factory": "process_models", "isolation": "process"}, "'factory'.*module:function"),
    ({"factory": "no_such_module_zz:f", "isolation": "process"}, "'factory'.*not importable"),
    ({"factory": lambda ctx: ctx, "isolation": "process"}, "'factory'.*module-level function"),
    ({"factory": 42, "isolation": "process"}, "'factory'"),
    ({"model": print, "isolation": "process"}, "'model'"),
    ({"factory": "process_models:echo", "isolation": "procs"}, "'isolation'"),
])
def test_invalid_quotas_name_the_model_and_field(rt: ap.Runtime, kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ap.QuotaError, match=pattern) as info:
        rt.add_model("bad", **kwargs)
    assert "'bad'" in str(info.value)
    assert info.value.model == "bad" and info.value.field == re.search(r"'(\w+)'", pattern).group(1)
    assert rt.models == []


def test_gpu_quota_is_refused_with_process_isolation(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError, match="'gpu'"):
        rt.add_model("g", factory="process_models:echo", isolation="process", gpu=ap.GPU(device=0))


def test_a_process_model_without_cores_shares_the_scheduled_pool() -> None:
    # Planned like a shared model, so on a scheduled pool its calls hold pool units (its worker
    # holds them while the child computes) and its weight and class apply.
    rt = ap.Runtime(shared_pool="scheduled")
    try:
        rt.add_model("remote", factory="process_models:echo", isolation="process", weight=2.0,
                     priority_class=1)
        rt.add_model("local", model=lambda x: x + 1)
        rt.start()
        assert [f.result(30) for f in rt.submit_many("remote", range(20))] == list(range(20))
        assert [f.result(30) for f in rt.submit_many("local", range(5))] == [1, 2, 3, 4, 5]
        stats = rt.stats()
        assert stats["remote"].pool_calls == 20 and stats["remote"].pool_time_s > 0
        assert stats["local"].pool_calls == 5
    finally:
        rt.close(drain=False)


# -- synchronous calls (Runtime.call) -------------------------------------------------------------
def test_call_serves_an_idle_process_instance_directly_with_stats(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:info", isolation="process", instances=2)
    rt.start()
    out = [rt.call("m", i) for i in range(30)]
    assert [o["x"] for o in out] == list(range(30))
    assert {o["ppid"] for o in out} == {os.getpid()}
    s = rt.stats()["m"]
    assert s.direct == 30 and s.submitted == 30 and s.completed == 30 and s.in_flight == 0
    assert s.end_to_end.count == 30 and s.compute.count == 30 and s.batches == 30
    assert s.queue_wait.count == 30 and s.queue_wait.max_ms == 0.0
    # Large arrays travel out of band on this path too.
    big = np.arange(1 << 18, dtype=np.float32)
    np.testing.assert_array_equal(rt.call("m", big)["x"], big)


def test_call_raises_the_model_error_and_counts_it(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process")
    rt.start()
    with pytest.raises(ValueError, match="the model refused") as info:
        rt.call("m", "raise")
    assert isinstance(info.value.__cause__, process_mod.RemoteTraceback)
    with pytest.raises(TypeError, match="model 'm': the request could not be sent to the worker process .*cannot "
                                        "pickle"):
        rt.call("m", threading_lock())
    assert rt.call("m", 4) == 4
    s = rt.stats()["m"]
    assert (s.direct, s.submitted, s.failed, s.completed) == (3, 3, 2, 1)
    with pytest.raises(TypeError, match="model 'm': the request could not be sent"):  # the queued path too
        rt.submit("m", threading_lock()).result(30)


def test_errors_at_the_process_boundary_name_the_model(rt: ap.Runtime) -> None:
    rt.add_model("odd", factory="process_models:unpicklable_result", isolation="process")
    rt.add_model("big", factory="process_models:blob", isolation="process")
    rt.start()
    for wait in (lambda: rt.call("odd", 1), lambda: rt.submit("odd", 1).result(30)):
        with pytest.raises(TypeError, match="model 'odd': a reply of the worker process .* does not unpickle here"):
            wait()
    too_big = 64 << 20  # more than the channel takes in one message
    for wait in (lambda: rt.call("big", too_big), lambda: rt.submit("big", too_big).result(60)):
        with pytest.raises((ValueError, OSError), match="model 'big'"):
            wait()
    assert rt.call("big", 3) == bytearray(3)  # the instance serves on: a failure, not a crash
    assert rt.stats()["odd"].failed >= 2 and rt.stats()["big"].failed == 2


def test_a_process_model_warms_up_with_array_and_large_samples(rt: ap.Runtime) -> None:
    # The samples stay in the parent, which warms each instance through its proxy: they never
    # travel on the child's command line (an array is not JSON, and a large sample would overflow it).
    samples = [np.ones(4, np.float32), b"raw", np.zeros(1 << 17)]
    rt.add_model("m", factory="process_models:blob", isolation="process", warmup=samples)
    rt.start()
    assert rt.call("m", 5) == bytearray(5)
    assert rt.stats()["m"].submitted == 1  # warm-up calls are not requests


def threading_lock() -> Any:
    return threading.Lock()


@pytest.mark.parametrize(("trigger", "cause"), [("segv", "killed by signal SIGSEGV"),
                                                ("exit", "exited with code 7")])
def test_a_crash_during_a_direct_call_fails_it_and_the_next_call_restarts_the_child(
        rt: ap.Runtime, trigger: str, cause: str) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process")
    rt.start()
    assert rt.call("m", 1) == 1
    with pytest.raises(ap.WorkerCrashed, match=cause) as info:
        rt.call("m", trigger)
    assert info.value.model == "m" and info.value.instance == 0  # type: ignore[attr-defined]
    # No live child now: this call goes through the queue, whose worker restarts the child.
    assert rt.call("m", 2) == 2
    assert rt.call("m", 3) == 3
    s = rt.stats()["m"]
    assert s.failed == 1 and s.completed == 3 and s.submitted == 4
    assert s.direct == 3  # 1, the crash, and 3 (2 went through the worker)


def test_a_direct_call_to_a_child_that_died_while_idle_is_served_by_its_replacement(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:info", isolation="process")
    rt.start()
    pid = rt.call("m", 0)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LONG
    while "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The dead child never took it: not failed, but sent through the queue to a new child.
    out = rt.call("m", 1)
    assert out["x"] == 1 and out["pid"] != pid
    s = rt.stats()["m"]
    assert s.failed == 0 and s.completed == 2 and s.submitted == 2 and s.direct == 1


def test_the_watchdog_ends_a_hung_direct_call(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process", watchdog_s=0.5)
    rt.start()
    with pytest.raises(ap.WorkerCrashed, match=r"watchdog_s.*SIGKILL"):
        rt.call("m", "hang")
    assert rt.call("m", 5) == 5


def test_call_takes_the_queue_when_the_instance_is_busy_or_requests_wait(rt: ap.Runtime, tmp_path: Path,
                                                                        tally) -> None:
    rt.add_model("m", factory="process_models:faulty", isolation="process", priority_levels=2)
    rt.start()
    entered, release = tmp_path / "entered", tmp_path / "release"
    gate = tally.watch(rt.submit("m", ("gate", str(entered), str(release))))
    deadline = time.monotonic() + LONG
    while not entered.exists():
        assert time.monotonic() < deadline, "the gate request never started"
        time.sleep(0.005)
    queued = tally.watch(rt.submit("m", "queued", priority=1))
    # A direct call may not start while a request waits: it would overtake it.
    assert rt._direct_begin("m", None, None) == 0
    results: list[Any] = []
    caller = threading.Thread(target=lambda: results.append(rt.call("m", "called", priority=0)))
    caller.start()
    time.sleep(0.05)
    assert results == []  # waiting in the queue behind the busy instance
    release.touch()
    caller.join(LONG)
    assert results == ["called"] and queued.result(timeout=LONG) == "queued"
    tally.check_once([gate, queued])
    assert rt.stats()["m"].direct == 0
    assert rt._direct_begin("m", None, None) > 0  # idle and nothing queued again


def test_call_checks_its_arguments_and_the_runtime_like_submit(rt: ap.Runtime) -> None:
    rt.add_model("m", factory="process_models:echo", isolation="process", priority_levels=2)
    rt.start()
    with pytest.raises(ValueError, match="'m'.*timeout_ms"):
        rt.call("m", 1, timeout_ms=-1)
    with pytest.raises(ValueError, match="'m'.*priority"):
        rt.call("m", 1, priority=2)
    with pytest.raises(ap.ModelNotFound, match="'nope'"):
        rt.call("nope", 1)
    assert rt.call("m", 1, timeout_ms=1000, priority=1) == 1
    assert rt.stats()["m"].submitted == 1
    rt.close()
    with pytest.raises(ap.RuntimeClosed):
        rt.call("m", 1)


def test_call_uses_the_queue_for_other_models(tally) -> None:
    # Thread models, batching process models and process models on a scheduled pool.
    rt = ap.Runtime(shared_pool="scheduled")
    try:
        rt.add_model("t", model=lambda x: x + 1)
        rt.add_model("b", factory="process_models:double_batch", isolation="process",
                     batching=ap.Batching(max_size=4, max_delay_ms=1.0))
        rt.add_model("pooled", factory="process_models:echo", isolation="process")
        rt.start()
        assert [rt.call("t", i) for i in range(3)] == [1, 2, 3]
        assert [rt.call("b", i) for i in range(3)] == [0, 2, 4]
        assert [rt.call("pooled", i) for i in range(3)] == [0, 1, 2]
        stats = rt.stats()
        assert [stats[m].direct for m in ("t", "b", "pooled")] == [0, 0, 0]
        assert [stats[m].completed for m in ("t", "b", "pooled")] == [3, 3, 3]
        assert stats["pooled"].pool_calls == 3
    finally:
        rt.close(drain=False)


def test_direct_calls_do_not_starve_queued_requests(rt: ap.Runtime) -> None:
    # One thread calls back to back; another submits. A request the worker took waits for at
    # most the direct call in flight: the worker says it wants the instance, and direct calls
    # then leave it alone.
    rt.add_model("m", factory="process_models:echo", isolation="process")
    rt.start()
    stop = threading.Event()
    calls = [0]

    def hammer() -> None:
        while not stop.is_set():
            assert rt.call("m", 1) == 1
            calls[0] += 1

    t = threading.Thread(target=hammer)
    t.start()
    try:
        while calls[0] < 50:
            time.sleep(0.001)
        assert [rt.submit("m", i).result(timeout=LONG) for i in range(50)] == list(range(50))
    finally:
        stop.set()
        t.join(LONG)
    s = rt.stats()["m"]
    assert s.direct >= 50 and s.completed == s.submitted and s.failed == 0


def test_concurrent_calls_submits_and_close_complete_every_request_once(tally) -> None:
    rt = ap.Runtime()
    rt.add_model("m", factory="process_models:echo", isolation="process", instances=2, max_queue=64)
    rt.start()
    outcomes: list[str] = []
    lock = threading.Lock()
    futs: list[ap.Future] = []

    def caller(k: int) -> None:
        for i in range(300):
            try:
                got = rt.call("m", (k, i))
                kind = "ok" if got == (k, i) else "wrong"
            except (ap.RuntimeClosed, ap.QueueFull, CancelledError):
                kind = "refused"
            with lock:
                outcomes.append(kind)

    def submitter() -> None:
        for i in range(300):
            try:
                f = tally.watch(rt.submit("m", i))
            except (ap.RuntimeClosed, ap.QueueFull):
                continue
            with lock:
                futs.append(f)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(3)] + [threading.Thread(target=submitter)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    rt.close(drain=True)
    for t in threads:
        t.join(LONG)
    assert len(outcomes) == 900 and "wrong" not in outcomes
    tally.check_once(futs)
    for f in futs:
        assert f.result(timeout=LONG) is not None
    s = rt.stats()["m"]
    assert s.in_flight == 0
    assert s.submitted == s.completed + s.rejected


def test_close_without_drain_ends_a_hung_direct_call(tmp_path: Path) -> None:
    rt = ap.Runtime()
    try:
        rt.add_model("m", factory="process_models:faulty", isolation="process")  # no watchdog
        rt.start()
        entered = tmp_path / "entered"
        errors: list[BaseException] = []

        def call() -> None:
            try:
                rt.call("m", ("hang_after", str(entered)))
            except BaseException as e:  # noqa: BLE001 - checked below
                errors.append(e)

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + LONG
        while not entered.exists():
            assert time.monotonic() < deadline, "the hanging call never started"
            time.sleep(0.005)
        rt.close(drain=False)
        t.join(LONG)
        assert len(errors) == 1 and isinstance(errors[0], ap.WorkerCrashed)
        assert "drain=False" in str(errors[0])
        assert rt.stats()["m"].failed == 1 and rt.stats()["m"].direct == 1
    finally:
        rt.close(drain=False)


@pytest.mark.parametrize("how", ["remove_model", "close"])
def test_draining_waits_for_a_direct_call_in_flight(rt: ap.Runtime, tmp_path: Path, how: str) -> None:
    # The child dies with the worker thread that started it: the worker must not stop before
    # a direct call on its child has finished.
    rt.add_model("m", factory="process_models:faulty", isolation="process")
    rt.start()
    entered, release = tmp_path / "entered", tmp_path / "release"
    results: list[Any] = []
    t = threading.Thread(target=lambda: results.append(rt.call("m", ("gate", str(entered), str(release)))))
    t.start()
    deadline = time.monotonic() + LONG
    while not entered.exists():
        assert time.monotonic() < deadline, "the gated call never started"
        time.sleep(0.005)
    threading.Timer(0.1, release.touch).start()
    if how == "close":
        rt.close()
    else:
        rt.remove_model("m")  # returns once the call finished and the child exited
        assert rt.models == []
    assert results == ["gate"]
    t.join(LONG)


# -- a small /dev/shm ------------------------------------------------------------------------------

_SMALL_SHM_PROBE = textwrap.dedent("""
    import errno, faulthandler, json, os, sys, warnings
    faulthandler.enable(all_threads=True)  # a SIGBUS would show where
    import numpy as np
    import apportion as ap

    out = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rt = ap.Runtime()
        rt.add_model("big", factory="process_models:blob", isolation="process")
        rt.start()
    out["warnings"] = [(w.category.__name__, str(w.message)) for w in seen]

    def attempt(fn):
        try:
            return {"value": fn()}
        except OSError as e:
            return {"errno": e.errno, "error": str(e)}

    out["pid"] = rt.call("big", "pid")
    # The request path (through the worker thread), then the result path (a direct call).
    out["request"] = attempt(lambda: rt.submit("big", np.ones(48 << 20, np.uint8)).result(timeout=120))
    out["pid_after_request"] = rt.call("big", "pid")
    out["small_after_request"] = rt.submit("big", np.ones(1 << 20, np.uint8)).result(timeout=120)
    out["result"] = attempt(lambda: rt.call("big", 48 << 20))
    out["pid_after_result"] = rt.call("big", "pid")
    out["small_after_result"] = len(rt.call("big", 1 << 20))
    # Someone else fills /dev/shm: a process model added now cannot even create its channel.
    fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR, 0o600)
    at = 0
    try:
        while True:
            os.posix_fallocate(fd, at, 4096)
            at += 4096
    except OSError:
        pass
    try:
        rt.add_model("late", factory="process_models:blob", isolation="process")
        out["late"] = {"value": "added"}
    except OSError as e:
        out["late"] = {"errno": e.errno, "error": str(e)}
    out["small_when_full"] = rt.call("big", "pid")
    rt.close()
    print(json.dumps(out))
""")


def test_a_message_too_large_for_a_small_dev_shm_fails_alone(tmp_path: Path) -> None:
    """A 16 MiB /dev/shm (Docker's default is 64 MiB): a 48 MiB request, then a 48 MiB
    result, each fail with an OSError that says what to do; both processes live on (no
    SIGBUS) and the next small request succeeds. Needs a mount namespace of its own."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a 16 MiB tmpfs on /dev/shm in a mount namespace of its own")
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) (util-linux) for a mount namespace with a small /dev/shm")
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/dev/shm"],
                           capture_output=True, text=True, timeout=LONG)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a new mount namespace here: {probe.stderr.strip()}")
    script = tmp_path / "probe.py"
    script.write_text(_SMALL_SHM_PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    # unshare(1) makes the new namespace's mounts private: the small /dev/shm is this run's only.
    done = subprocess.run(["unshare", "-m", "sh", "-c",
                           'mount -t tmpfs -o size=16m tmpfs /dev/shm && exec "$0" "$1"', sys.executable,
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"the parent died ({done.returncode}; 135 or -7 is SIGBUS): {done.stderr[-3000:]}"
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [cat for cat, _ in out["warnings"]] == ["SharedMemoryWarning"], out["warnings"]
    note = out["warnings"][0][1]
    assert "model 'big'" in note and "/dev/shm has 16.0 MiB free" in note and "--shm-size" in note, note
    for what, key in (("request", "request"), ("result", "result")):
        err = out[key]
        assert err.get("errno") == 28, err  # ENOSPC
        assert "model 'big' instance 0" in err["error"], err
        size = re.search(rf"the {what} \(48\.0 MiB, (\d+) bytes\)", err["error"])
        assert size and 48 << 20 <= int(size[1]) < (48 << 20) + 4096, err  # the array and its pickle
        assert "MiB free" in err["error"] and "--shm-size" in err["error"], err
    # The same worker process served throughout: neither side died.
    assert out["pid"] == out["pid_after_request"] == out["pid_after_result"]
    assert out["small_after_request"] == 1 << 20
    assert out["small_after_result"] == 1 << 20
    late = out["late"]
    assert late.get("errno") == 28 and "model 'late' instance 0: cannot create the shared-memory channel" in late["error"]
    assert "/dev/shm has 0 bytes free" in late["error"] and "--shm-size" in late["error"], late
    assert out["small_when_full"] == out["pid"]  # the model already serving is unaffected


def test_the_dev_shm_warning_counts_both_directions_of_every_instance() -> None:
    from apportion._private.shmspace import space_note

    mib = 1 << 20
    assert space_note("m", 2, 64 * mib, 256 * mib) is None  # 2 instances x 2 directions x 64 MiB
    assert space_note("m", 2, 64 * mib, None) is None  # unknown: no claim
    note = space_note("m", 2, 64 * mib, 256 * mib - 1)
    assert note is not None and "model 'm'" in note and "need 256.0 MiB" in note and "--shm-size" in note


def test_closing_a_channel_while_another_thread_waits_on_it_does_not_crash() -> None:
    # close() unmapped the segment under a receive() (or a send() waiting for room) that had
    # released the GIL: the waiting thread faulted (SIGSEGV). The call now keeps the segment
    # mapped until it returns; the channel refuses calls after close().
    code = textwrap.dedent("""
        import os, threading, time
        from apportion import _core
        for mode in ("receive", "send"):
            name = f"/apportion-test-close-{os.getpid()}-{mode}"
            ch = _core.ShmChannel.create(name, 1 << 16)
            peer = _core.ShmChannel.open(name)
            out = []
            def wait():
                if mode == "receive":
                    out.append(ch.receive(0.0, 0.5))
                else:
                    ok = True
                    while ok:  # fills the ring, then waits for room
                        ok = peer.send([b"x" * 40000], 0.0, 0.5)
                    out.append(ok)
            t = threading.Thread(target=wait)
            t.start()
            time.sleep(0.2)
            (ch if mode == "receive" else peer).close()
            junk = [bytearray(1 << 16) for _ in range(64)]  # reuse what was unmapped
            t.join()
            try:
                (ch if mode == "receive" else peer).receive(0.0, 0.0)
            except ValueError as e:
                print(mode, out, e)
            (peer if mode == "receive" else ch).close()
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert p.stdout.splitlines() == ["receive [None] the channel is closed", "send [False] the channel is closed"]


def test_a_factory_found_on_an_import_path_entry_holding_a_colon_is_found_in_the_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PYTHONPATH split the entry "…/a:b" in two: the parent's import check passed and the
    # child failed with ModuleNotFoundError.
    where = tmp_path / "a:b"
    where.mkdir()
    (where / "colonmod.py").write_text("def build(ctx):\n    return lambda x: ('colon', x)\n")
    monkeypatch.syspath_prepend(str(where))
    rt = ap.Runtime()
    try:
        rt.add_model("m", factory="colonmod:build", isolation="process")
        rt.start()
        assert rt.call("m", 1) == ("colon", 1)
    finally:
        rt.close()


def test_a_closed_model_exits_its_children_gracefully_and_ends_what_they_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The children died with the worker threads that started them (PR_SET_PDEATHSIG follows the
    # thread), before close() asked them to exit: atexit handlers never ran, buffered output was
    # lost, a factory's temporary directory was left behind; and a process a factory started
    # outlived close() and the watchdog's kill, reparented to init.
    (tmp_path / "exiting.py").write_text(textwrap.dedent(f"""
        import atexit, subprocess, sys, tempfile, time
        from pathlib import Path

        def build(ctx):
            scratch = tempfile.TemporaryDirectory(dir={str(tmp_path)!r})
            helper = subprocess.Popen(["sleep", "600"])
            atexit.register(lambda: Path({str(tmp_path / "atexit-ran")!r}).touch())
            def serve(x):
                if x == "hang":
                    time.sleep(60)
                sys.stdout.write(f"served {{x}}\\n")  # block-buffered: written at a clean exit only
                return scratch.name, helper.pid
            return serve
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rt = ap.Runtime()
    rt.add_model("m", factory="exiting:build", isolation="process", watchdog_s=1.0)
    rt.start()
    _, hung_helper = rt.call("m", 0)
    with pytest.raises(ap.WorkerCrashed, match="watchdog_s"):
        rt.call("m", "hang")
    scratch, helper = rt.call("m", 1)
    assert _ends(hung_helper), "the killed child's helper lived on"
    rt.close()  # drain=True
    assert (tmp_path / "atexit-ran").exists(), "the child did not exit by itself"
    assert not os.path.exists(scratch), "its temporary directory was left behind"
    assert _ends(helper), "the process it started outlived it"
    assert rt.stats()["m"].process_restarts == 1  # counted after close too (was 0)


def _ends(pid: int, within_s: float = 10.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie nobody reaps) within ``within_s``: a SIGKILL
    takes effect a moment after it is sent."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def test_close_without_drain_does_not_wait_out_a_restarts_back_off(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A model crashing on every request, 20 queued: close(drain=False) slept out the worker's
    # back-off (up to 5 s) before it returned; the requests still queued are cancelled.
    (tmp_path / "crashing.py").write_text("import os\ndef build(ctx):\n    return lambda x: os._exit(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rt = ap.Runtime()
    rt.add_model("m", factory="crashing:build", isolation="process", max_queue=64)
    rt.start()
    futs = [rt.submit("m", i) for i in range(20)]
    deadline = time.monotonic() + 30
    while rt.stats()["m"].process_restarts < 6 and time.monotonic() < deadline:  # a back-off of 3.2 s next
        time.sleep(0.01)
    t0 = time.monotonic()
    rt.close(drain=False)
    took = time.monotonic() - t0
    outcomes = ["cancelled" if f.cancelled() else type(f.exception(10)).__name__ for f in futs]
    assert set(outcomes) <= {"cancelled", "WorkerCrashed"} and "cancelled" in outcomes, outcomes
    assert took < 1.5, took  # it waited out the 3.2 s back-off (less what had passed) whole


def test_a_call_that_warns_without_end_still_returns_its_result(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # 330,000 distinct warnings in one call (85 MB) did not fit the ring: every warning was lost
    # and the call failed with an error that blamed its result ("the result could not be sent").
    (tmp_path / "warny.py").write_text(textwrap.dedent("""
        import warnings
        def build(ctx):
            def serve(arg):
                n, width = arg
                for i in range(n):
                    warnings.warn(f"warning {i}: " + "x" * width)
                return "small result"
            return serve
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from apportion._private.child import MAX_WARNING_CHARS, MAX_WARNINGS

    rt = ap.Runtime()
    try:
        rt.add_model("m", factory="warny:build", isolation="process")
        rt.start()
        where = str(tmp_path / "warny.py") + ":7)"
        # Many short ones: MAX_WARNINGS of them, and how many more were dropped.
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert rt.call("m", (MAX_WARNINGS + 3000, 10)) == "small result"
        texts = [str(w.message) for w in seen]
        assert len(texts) == MAX_WARNINGS + 1 and "warning 0: xxxxxxxxxx (" in texts[0]
        assert "3000 more warnings of the worker process were dropped" in texts[-1]
        # Long ones: each cut to 10,000 characters, and MAX_WARNING_CHARS of them in all.
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert rt.call("m", (300, 30_000)) == "small result"
        texts = [str(w.message) for w in seen]
        assert texts[0].endswith("... (30011 characters) (" + where), texts[0][-80:]
        kept = len(texts) - 1
        assert 0 < kept < 300 and kept * 10_000 <= MAX_WARNING_CHARS < (kept + 1) * 10_100
        assert f"{300 - kept} more warnings of the worker process were dropped" in texts[-1]
    finally:
        rt.close()


def test_a_child_runs_at_its_workers_nice_whichever_started_first() -> None:
    # Children are forked by one spawner thread: they took its nice, the nice of whichever
    # worker made it, so the reserved class's child ran at the lower classes' nice (or the
    # lower classes' at 0, outside the reservation's reach).
    rt = ap.Runtime(shared_pool="scheduled", pool_reserve={1: 1})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ap.PinningWarning)
            rt.add_model("low", factory="process_models:info", isolation="process", priority_class=0)
            rt.add_model("hi", factory="process_models:info", isolation="process", priority_class=1)
            rt.start()
        for n in ("low", "hi"):
            child = rt.submit(n, 0).result(timeout=LONG)["pid"]
            workers = {os.getpriority(os.PRIO_PROCESS, t) for t in rt._worker_tids(n)}
            assert workers == {os.getpriority(os.PRIO_PROCESS, child)}, (n, workers)
    finally:
        rt.close()


def test_a_spawner_thread_that_could_not_start_is_tried_again() -> None:
    # Recorded before it started: after one failed start every later spawn waited for good.
    from apportion._private import process as process_mod

    spawner = process_mod._Spawner()
    real = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    threading.Thread.start = refuse  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            spawner.popen(lambda: subprocess.Popen(["true"]))
    finally:
        threading.Thread.start = real  # type: ignore[method-assign]
    proc = spawner.popen(lambda: subprocess.Popen(["true"]))
    assert proc.wait(30) == 0
