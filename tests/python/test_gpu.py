"""GPU quotas, plans over described devices, the driver's availability, and (on a machine with a
CUDA device) partitions and the spin kernel. GPU tests skip here with the driver's reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import apportion as ap
from apportion import gpu
from apportion.errors import PlacementError, QuotaError

GiB = 1 << 30

_REASON = gpu.gpu_unavailable_reason()
requires_gpu = pytest.mark.skipif(
    _REASON is not None, reason=f"no CUDA device is present: {_REASON}"
)


# --- quotas ---------------------------------------------------------------------------------


def test_gpu_quota_defaults() -> None:
    q = gpu.GPU()
    assert (q.device, q.streams, q.priority) == (0, 1, "normal")
    assert q.sm_share is None and q.sm_count is None and q.memory is None
    assert not q.allow_overlap and not q.strict
    assert not q.wants_sm_group
    assert gpu.GPU(sm_count=8).wants_sm_group


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * GiB),
        ("512MB", 512 * 1000**2),
        ("1.5 gib", 3 * GiB // 2),
        ("64kib", 64 * 1024),
        ("2TB", 2 * 1000**4),
        ("1024", 1024),
        ("7B", 7),
        (4096, 4096),
        ("18446744073709551615", 2**64 - 1),  # exact: through a float it was refused
        ("9007199254740993", 2**53 + 1),  # and this one read as 2**53
    ],
)
def test_memory_sizes_normalise_to_bytes(text: int | str, expected: int) -> None:
    assert gpu.parse_memory(text) == expected
    assert gpu.GPU(memory=text).memory == expected


@pytest.mark.parametrize("bad", ["4 GiBs", "lots", "-1GiB", "", 0, -5, 1.5, True, "0.1B", 2**64, "20000000TB",
                                 "1" + "0" * 400, "18446744073709551616"])  # was OverflowError; 2**64
def test_bad_memory_sizes_name_the_field(bad: object) -> None:
    with pytest.raises(QuotaError, match=r"gpu\.memory") as info:
        gpu.GPU(memory=bad)  # type: ignore[arg-type]
    assert info.value.field == "gpu.memory"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"device": -1}, "device"),
        ({"device": "gpu0"}, "device"),
        ({"device": 1.0}, "device"),
        # beyond what the native quota holds: was pybind's "Unable to cast Python instance"
        ({"device": 2**32}, "device"),
        ({"device": "cuda:4294967296"}, "device"),
        ({"device": "cuda:\u0661"}, "device"),
        ({"priority": 2**31}, "priority"),
        ({"priority": -(2**31) - 1}, "priority"),
        ({"sm_count": 2**31}, "sm_count"),
        ({"streams": 0}, "streams"),
        ({"streams": 65}, "streams"),
        ({"streams": True}, "streams"),
        ({"priority": "urgent"}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"priority": None}, "priority"),
        ({"sm_share": 0.0}, "sm_share"),
        ({"sm_share": 1.01}, "sm_share"),
        ({"sm_share": float("nan")}, "sm_share"),
        ({"sm_share": "half"}, "sm_share"),
        ({"sm_share": 10 ** 400}, "sm_share"),  # an int beyond every float
        ({"sm_share": 0.5, "sm_count": 8}, "sm_share"),
        ({"sm_count": 0}, "sm_count"),
        ({"sm_count": 2.5}, "sm_count"),
        ({"allow_overlap": 1}, "allow_overlap"),
        ({"strict": "yes"}, "strict"),
    ],
)
def test_invalid_fields_raise_quota_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(QuotaError, match=rf"gpu\.{field}") as info:
        gpu.GPU(**kwargs)
    assert info.value.field == f"gpu.{field}"
    assert isinstance(info.value, ap.ApportionError)


def test_validate_names_the_model() -> None:
    q = gpu.GPU(sm_share=0.5)
    assert q.validate("ranker") is q
    with pytest.raises(QuotaError, match=r"^model 'ranker', field 'gpu\.streams': streams=0 must be") as info:
        _bad_streams("ranker")
    assert info.value.model == "ranker"  # type: ignore[attr-defined]
    with pytest.raises(QuotaError, match="model name"):
        q.validate("")


def _bad_streams(model: str) -> None:
    # A quota that passed construction and was broken afterwards (frozen dataclasses can still be
    # forced): validate(model) must catch it and name the model.
    q = gpu.GPU()
    object.__setattr__(q, "streams", 0)
    q.validate(model)


def test_device_accepts_cuda_strings() -> None:
    assert gpu.GPU(device="cuda:1").device == 1
    assert gpu.GPU(device="cuda").device == 0


def test_to_native_carries_every_field() -> None:
    q = gpu.GPU(device=1, streams=2, priority=-3, sm_count=16, memory="1GiB", strict=True)
    assert q.to_native("m") == {
        "model": "m",
        "device": 1,
        "streams": 2,
        "priority": -3,
        "sm_share": None,
        "sm_count": 16,
        "memory": GiB,
        "allow_overlap": False,
        "strict": True,
    }


# --- described devices and plans ------------------------------------------------------------


def test_described_devices() -> None:
    assert gpu.described_device_names() == ["h200", "h100", "a100", "v100-cuda12.2"]
    h200 = gpu.described_device("h200")
    assert (h200.sm_count, h200.sm_granularity, h200.sm_units) == (132, 8, 16)
    assert (h200.priority_least, h200.priority_greatest) == (0, -5)
    assert h200.green_contexts
    a100 = gpu.described_device("a100", 2)
    assert (a100.ordinal, a100.sm_count, a100.sm_alignment) == (2, 108, 2)
    assert not gpu.described_device("v100-cuda12.2").green_contexts
    assert "132 SMs" in str(h200)
    with pytest.raises(ValueError, match="known: h200"):
        gpu.described_device("tpu-v5")


def test_six_groups_of_eleven_sms_round_to_sixteen() -> None:
    plan = gpu.plan_gpus({f"m{i}": gpu.GPU(sm_count=11) for i in range(6)}, "h200")
    assert [m.sm_count for m in plan.models.values()] == [16] * 6
    assert all(m.sm_rounded and m.sm_asked == 11 for m in plan.models.values())
    assert plan.models["m5"].sm_units == [10, 11]
    assert plan.devices[0].sm_unassigned == 36
    assert any("asked for 11 SMs, gets 16" in n for n in plan.notes)
    assert any("36 of 132 SMs are in no group" in n for n in plan.notes)
    text = str(plan)
    assert "GPU plan" in text and "16 [units 0-1]" in text


def test_priorities_map_and_clamp() -> None:
    plan = gpu.plan_gpus(
        [
            ("hi", gpu.GPU(priority="high")),
            ("mid", gpu.GPU(priority="normal")),
            ("lo", gpu.GPU(priority="low")),
            ("over", gpu.GPU(priority=-12)),
        ],
        gpu.described_device("a100"),
    )
    got = {name: m.priority for name, m in plan.models.items()}
    assert got == {"hi": -5, "mid": -2, "lo": 0, "over": -5}
    assert plan.models["over"].priority_clamped
    assert not plan.models["hi"].priority_clamped
    assert any("priority -12 is outside" in n for n in plan.notes)


def test_sm_oversubscription_is_a_placement_error_saying_what_is_left() -> None:
    with pytest.raises(PlacementError, match="only 24 of 128 groupable SMs are left") as info:
        gpu.plan_gpus({"a": gpu.GPU(sm_count=100), "b": gpu.GPU(sm_share=0.3)}, "h100")
    assert info.value.model == "b"  # type: ignore[attr-defined]


def test_overlap_is_allowed_when_the_quota_says_so() -> None:
    plan = gpu.plan_gpus(
        {"a": gpu.GPU(sm_count=100), "b": gpu.GPU(sm_share=0.3, allow_overlap=True)}, "h100"
    )
    assert plan.models["b"].sm_overlaps
    assert plan.models["b"].sm_count == 40


def test_memory_oversubscription_names_the_model_and_what_is_left() -> None:
    with pytest.raises(PlacementError, match=r"model 'b' asks for 30\.0 GiB .* only 19\.6 GiB"):
        gpu.plan_gpus({"a": gpu.GPU(memory="60GiB"), "b": gpu.GPU(memory="30GiB")}, "h100")
    plan = gpu.plan_gpus(
        {"a": gpu.GPU(memory="60GiB"), "b": gpu.GPU(memory="30GiB", allow_overlap=True)}, "h100"
    )
    assert plan.models["b"].memory == 30 * GiB


def test_old_driver_falls_back_or_fails_when_strict() -> None:
    plan = gpu.plan_gpus({"a": gpu.GPU(sm_share=0.5)}, "v100-cuda12.2")
    assert plan.models["a"].sm_count == 0
    assert any("priority-only streams" in n for n in plan.notes)
    with pytest.raises(PlacementError, match=r"strict=True.*CUDA 12\.4\+"):
        gpu.plan_gpus({"a": gpu.GPU(sm_share=0.5, strict=True)}, "v100-cuda12.2")


def test_missing_device_and_multiple_devices() -> None:
    with pytest.raises(PlacementError, match="asks for GPU 2 but the devices are 0 1"):
        gpu.plan_gpus({"a": gpu.GPU(device=2)}, ["h200", "h200"])
    plan = gpu.plan_gpus(
        {"a": gpu.GPU(sm_count=128), "b": gpu.GPU(device=1, sm_count=128)}, ["h200", "h200"]
    )
    assert plan.models["a"].sm_units == plan.models["b"].sm_units


def test_plans_are_deterministic() -> None:
    models = {f"m{i}": gpu.GPU(sm_count=8 * (i + 1), priority=i - 3) for i in range(4)}
    assert str(gpu.plan_gpus(models, "h200")) == str(gpu.plan_gpus(models, "h200"))


def test_plan_rejects_non_gpu_quotas_and_bad_devices() -> None:
    with pytest.raises(QuotaError, match="model 'a', field 'gpu': must be"):
        gpu.plan_gpus({"a": {"sm_share": 0.5}}, "h200")  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="devices"):
        gpu.plan_gpus({"a": gpu.GPU()}, [42])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="devices must be a preset name"):  # was "'int' object is not iterable"
        gpu.plan_gpus({"a": gpu.GPU()}, 0)  # type: ignore[arg-type]
    # One ordinal twice: the model was planned on both entries (and would be realised twice).
    with pytest.raises(ValueError, match=r"ordinal 0 is given more than once \(\[0, 0\]\)"):
        gpu.plan_gpus({"a": gpu.GPU()}, [gpu.described_device("h100", 0), gpu.described_device("h200", 0)])
    assert len(gpu.plan_gpus({"a": gpu.GPU(device=1)}, ["h100", "h200"]).devices) == 2


def test_a_model_leaving_a_running_runtime_leaves_the_others_gpu_plan_as_it_was() -> None:
    # remove_model on a started runtime dropped the GPU plan and plan() made a new one: the
    # remaining model printed on units other than its green context's, and planning again
    # against live free memory (which the serving models had used) could fail.
    import dataclasses

    from apportion.runtime import _plan_without

    g = gpu.plan_gpus({"alpha": gpu.GPU(sm_share=0.25), "b": gpu.GPU(sm_share=0.25, memory="4GiB")}, "h200")
    cpu = ap.plan({"alpha": {}, "b": {}}, ap.topology(str(Path(__file__).resolve().parents[1] / "fixtures" / "topology" / "vm2")))
    left = _plan_without(dataclasses.replace(cpu, gpu=g), "alpha")
    assert [m.name for m in left.models] == ["b"] and list(left.gpu.models) == ["b"]
    kept = left.gpu.models["b"]
    assert kept.sm_units == g.models["b"].sm_units != [] and kept.memory == 4 << 30
    assert "alpha" not in str(left.gpu).split("notes:")[0] and left.gpu.notes == g.notes
    assert list(g.models) == ["alpha", "b"], "the original plan is not changed"


def test_edited_described_device() -> None:
    d = gpu.described_device("h200")
    d.free_memory = 10 * GiB
    with pytest.raises(PlacementError, match=r"only 10\.0 GiB is left"):
        gpu.plan_gpus({"a": gpu.GPU(memory="12GiB")}, d)


def test_gpu_context_speaks_the_cuda_stream_protocol() -> None:
    ctx = gpu.GpuContext(
        model="m", device=0, stream_ptr=0x1234, sm_count=16, priority=-5, memory=0,
        green_context=True,
    )
    assert ctx.__cuda_stream__() == (0, 0x1234)


# --- the driver on this machine -------------------------------------------------------------


def test_driver_status_is_consistent() -> None:
    st = gpu.driver_status()
    assert set(st) >= {"available", "reason", "driver_version", "device_count", "green_contexts"}
    assert gpu.gpu_available() == st["available"]
    if st["available"]:
        assert gpu.gpu_unavailable_reason() is None
        assert st["device_count"] == len(gpu.devices()) > 0
    else:
        assert gpu.gpu_unavailable_reason() == st["reason"] != ""
        assert gpu.devices() == []
        assert not gpu.spin_available()


@pytest.mark.skipif(_REASON is None, reason="a CUDA device is present")
def test_without_a_gpu_live_plans_and_partitions_explain_why() -> None:
    with pytest.raises(PlacementError, match="no GPU is available") as info:
        gpu.plan_gpus({"a": gpu.GPU()})
    assert _REASON in str(info.value)
    plan = gpu.plan_gpus({"a": gpu.GPU()}, "h200")
    with pytest.raises(PlacementError, match="no usable GPU"):
        gpu.GpuPartition(plan)


def test_built_with_cuda_is_exposed() -> None:
    assert isinstance(ap._core.built_with_cuda, bool)
    if not ap._core.built_with_cuda:
        assert not gpu.spin_available()


# --- on a CUDA device -----------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
def test_live_partition_gives_streams_with_priorities_and_green_contexts() -> None:
    dev = gpu.devices()[0]
    unit = dev.sm_granularity
    plan = gpu.plan_gpus(
        {
            "victim": gpu.GPU(sm_count=2 * unit, priority="high", streams=2),
            "bulk": gpu.GPU(priority="low"),
        },
        [dev],
    )
    with gpu.GpuPartition(plan) as part:
        v0 = part.context("victim", 0)
        v1 = part.context("victim", 1)
        assert v0.stream_ptr != v1.stream_ptr
        assert part.context("victim", 2).stream_ptr == v0.stream_ptr
        assert v0.priority == dev.priority_greatest
        if dev.green_contexts:
            assert v0.green_context and v0.sm_count >= 2 * unit
        bulk = part.context("bulk")
        assert not bulk.green_context and bulk.sm_count == 0
        # The plan, the partition's copy and the contexts all report the driver's SM counts.
        assert part.plan.models["victim"].sm_count == v0.sm_count
        assert plan.models["victim"].sm_count == v0.sm_count
        assert str(plan) == str(part.plan)
    assert part.closed
    with pytest.raises(RuntimeError, match="closed"):
        part.context("victim")


@pytest.mark.gpu
@requires_gpu
def test_spin_kernel_records_sms_and_green_groups_are_disjoint() -> None:
    if not gpu.spin_available():
        pytest.skip("this build has no CUDA spin kernel (APPORTION_WITH_CUDA=OFF)")
    native = ap._core.gpu
    buf = native.SpinBuffer(32)
    native.launch_spin(0, 50.0, 32, buf.ptr)
    native.stream_synchronize(0)
    ids = buf.read()
    assert len(ids) == 32 and len(set(ids)) > 1
    dev = gpu.devices()[0]
    if not dev.green_contexts:
        pytest.skip("the driver cannot build green contexts")
    unit = dev.sm_granularity
    plan = gpu.plan_gpus({"a": gpu.GPU(sm_count=unit), "b": gpu.GPU(sm_count=3 * unit)}, [dev])
    with gpu.GpuPartition(plan) as part:
        a = part.context("a")
        b = part.context("b")
        _, sms_a = native.time_spins(a.stream_ptr, 50.0, 8 * unit, 32, 5)
        _, sms_b = native.time_spins(b.stream_ptr, 50.0, 24 * unit, 32, 5)
    assert 0 < len(sms_a) <= unit
    assert 0 < len(sms_b) <= 3 * unit
    assert not set(sms_a) & set(sms_b)


# --- the device run (bench/gpu/run_all.sh), simulated --------------------------------------------

_RUN_ALL = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "run_all.sh"


def _simulated_run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, str, Path]:
    out = tmp_path / "out"
    full_env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
                "APPORTION_GPU_RUN_SIMULATE": "1", "APPORTION_GPU_RUN_GTEST": "1", **env}
    # The timeout only turns a hung script into a failure; the deadlines under test are far
    # shorter.
    proc = subprocess.run(["bash", str(_RUN_ALL), str(out)], env=full_env, capture_output=True,
                          text=True, timeout=120)
    return proc, (out / "summary.md").read_text(), out


def _check_outputs(out: Path) -> list[str]:
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["logs.tar.gz", "summary.md"], files
    assert len(files) <= 8, "the device tool returns at most 8 files"
    with tarfile.open(out / "logs.tar.gz") as tar:
        return sorted(tar.getnames())


skip_inside_a_device_run = pytest.mark.skipif(
    bool(os.environ.get("APPORTION_GPU_RUN_ACTIVE")), reason="already inside a device run"
)


@skip_inside_a_device_run
def test_device_run_keeps_every_row_measured_before_the_benchmark_hangs(tmp_path: Path) -> None:
    proc, summary, out = _simulated_run(tmp_path, APPORTION_GPU_BENCH_INJECT="hang@3",
                                        APPORTION_GPU_RUN_BUDGET_BENCH="3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SIMULATED run" in summary
    for scenario in ("solo", "equal priorities", "victim high priority"):
        assert f"| {scenario} |" in summary
    assert "| SM groups |" not in summary, "the hung scenario measured nothing"
    assert "- bench: **timed out** (budget 3 s)" in summary
    assert "- cpp: ok" in summary, "the steps after the hung one still ran"
    assert "1 step(s) failed" in summary
    assert "logs/bench.log" in _check_outputs(out)


@skip_inside_a_device_run
def test_device_run_keeps_every_row_measured_before_the_benchmark_crashes(tmp_path: Path) -> None:
    proc, summary, out = _simulated_run(tmp_path, APPORTION_GPU_BENCH_INJECT="crash@2")
    assert proc.returncode == 1
    assert "| solo |" in summary and "| equal priorities |" in summary
    assert "| victim high priority |" not in summary
    assert "- bench: **failed** (exit 134, signal 6)" in summary
    assert "- cpp: ok" in summary
    names = _check_outputs(out)
    assert {"logs/build.log", "logs/pytest.log", "logs/bench.log", "logs/cpp.log"} <= set(names)


@skip_inside_a_device_run
def test_device_run_stops_a_hung_step_at_the_deadline_and_skips_the_rest(tmp_path: Path) -> None:
    proc, summary, out = _simulated_run(tmp_path, APPORTION_GPU_RUN_DEADLINE_S="9",
                                        APPORTION_GPU_RUN_INJECT="pytest:hang")
    assert proc.returncode == 1
    assert "- build: ok" in summary
    # The budget is what was left of the deadline after the build (which varies with the load).
    budget = re.search(r"- pytest: \*\*timed out\*\* \(budget (\d+) s\)", summary)
    assert budget is not None and 1 <= int(budget.group(1)) <= 9, summary
    assert "- bench: skipped, the deadline is reached" in summary
    assert "- cpp: skipped, the deadline is reached" in summary
    assert "(deadline 9 s): 1 step(s) failed" in summary
    _check_outputs(out)


@skip_inside_a_device_run
def test_device_run_without_googletest_says_the_cpp_tests_were_skipped(tmp_path: Path) -> None:
    proc, summary, out = _simulated_run(tmp_path, APPORTION_GPU_RUN_GTEST="0")
    assert proc.returncode == 0, summary
    assert "- cpp: skipped, GoogleTest is not installed here" in summary
    assert "| SM groups, equal priorities |" in summary, "every scenario ran"
    assert "0 step(s) failed" in summary
    _check_outputs(out)


def test_a_described_device_with_extreme_sm_figures_plans_without_crashing() -> None:
    # An alignment near 2**31 overflowed the granularity's int arithmetic to 0, and the planner
    # divided by it: the process died of SIGFPE.
    from apportion import gpu

    d = gpu.described_device("h100")
    d.sm_alignment = 2**31 - 1
    p = gpu.plan_gpus({"m": ap.GPU(sm_share=0.5)}, devices=[d])
    assert p.models["m"].sm_count == 0
    assert any("groups SMs in units of 2147483647" in n for n in p.notes)
