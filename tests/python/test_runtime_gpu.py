"""GPU quotas on the runtime: refused with the reason on machines without a GPU; on a GPU,
each instance runs on its own stream and its memory budget is enforced."""

from __future__ import annotations

import pytest

import apportion as ap
from apportion.gpu import gpu_available, gpu_unavailable_reason

needs_gpu = pytest.mark.skipif(not gpu_available(),
                               reason=f"no CUDA device is present: {gpu_unavailable_reason()}")


@pytest.mark.skipif(gpu_available(), reason="this machine has a usable GPU")
def test_gpu_quota_without_a_gpu_is_a_quota_error_with_the_reason(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError, match=r"model 'm', field 'gpu': no usable GPU: ") as err:
        rt.add_model("m", model=lambda x: x, gpu=ap.GPU(device=0, streams=1))
    assert gpu_unavailable_reason() in str(err.value)
    assert rt.models == []


def test_gpu_quota_is_validated_before_anything_else(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError, match=r"model 'm', field 'gpu': give apportion.GPU"):
        rt.add_model("m", model=lambda x: x, gpu={"device": 0})
    with pytest.raises(ap.QuotaError, match="sm_share and gpu.sm_count are both set"):
        ap.GPU(device=0, sm_share=0.5, sm_count=8)  # refused when built, before any model
    assert rt.models == []


@pytest.mark.gpu
@needs_gpu
def test_each_instance_runs_on_its_own_stream() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support in this environment")
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
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support in this environment")
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
