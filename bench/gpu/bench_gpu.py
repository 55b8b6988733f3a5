"""Victim latency next to a saturating aggressor on one GPU: solo, equal priorities, with
priorities, with SM groups (green contexts). Also records the SMs each side ran on, for spin
kernels launched through the CUDA runtime and, where CuPy is installed, through CuPy.

The victim is a short spin kernel timed from launch to the end of cudaStreamSynchronize; the
aggressor keeps its stream full of long spin kernels that occupy every thread slot of the SMs
they reach (2 blocks x 1024 threads per SM). Streams and green contexts come from
apportion.gpu.GpuPartition, exactly as models get them. SM groups are built with strict=True,
so a group the driver cannot build is an error row, never a silent run on the whole GPU; when
the driver's split yields fewer groups than planned, the aggressor's group shrinks by one unit
and the row says so. SM counts reported are the driver's.

Every scenario's row is appended to --summary as soon as it is measured (flushed and synced),
so a crash or a timeout keeps every row measured before it.

usage: python bench/gpu/bench_gpu.py --out DIR [--summary FILE] [--iterations N] [--device D]
       python bench/gpu/bench_gpu.py --simulate ...   (no GPU: made-up numbers, same output path)
Testing the run itself: APPORTION_GPU_BENCH_INJECT=crash@K or hang@K makes scenario K (0-based)
abort the process or hang instead of measuring.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TABLE_HEADER = (
    "| scenario | victim p50 us | victim p99 us | p99 / solo p99 | victim SMs (driver) "
    "| aggressor SMs (driver) | victim ran on | aggressor ran on | shared SMs |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    k = min(len(s) - 1, max(0, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def ranges(ids: list[int]) -> str:
    out: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


class Summary:
    """Appends to the summary file as results arrive: each write is flushed and synced, so
    whatever kills the process later cannot take it back."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, text: str) -> None:
        print(text, end="", flush=True)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def row(r: dict[str, Any], solo_p99: float | None) -> str:
    if "error" in r:
        return f"| {r['scenario']} | error: {r['error']} | | | | | | | |\n"
    ratio = r["p99_us"] / solo_p99 if solo_p99 else math.nan
    v_sms = r.get("victim_sm_count") or "all"
    a_sms = r.get("aggressor_sm_count", "-") or "all"
    return (
        f"| {r['scenario']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {ratio:.2f} | {v_sms} "
        f"| {a_sms} | {len(r['victim_sms'])} ({ranges(r['victim_sms'])}) "
        f"| {len(r['aggressor_sms'])} | {len(r['shared_sms'])} |\n"
    )


# --- the scenarios on a device ------------------------------------------------------------------


def run_scenario(name: str, quotas: dict[str, Any], dev: Any, args: argparse.Namespace,
                 via: str = "runtime") -> dict[str, Any]:
    from apportion import _core, gpu

    native = _core.gpu
    plan = gpu.plan_gpus(quotas, [dev])
    result: dict[str, Any] = {"scenario": name}
    with gpu.GpuPartition(plan) as part:
        result["plan"] = str(part.plan)
        result["warnings"] = list(part.warnings)
        victim = part.context("victim")
        result["victim_green_context"] = victim.green_context
        result["victim_sm_count"] = victim.sm_count
        result["victim_priority"] = victim.priority
        # Warm up: module load, first launch on each stream.
        native.time_spins(victim.stream_ptr, args.victim_us, args.victim_blocks,
                          args.victim_threads, 5, args.device)
        flood = None
        if "aggressor" in quotas:
            aggr = part.context("aggressor")
            result["aggressor_green_context"] = aggr.green_context
            result["aggressor_sm_count"] = aggr.sm_count
            result["aggressor_priority"] = aggr.priority
            # Returns once the first batch is queued; the sleep lets it reach every SM.
            flood = native.SpinFlood(aggr.stream_ptr, args.aggressor_us,
                                     2 * dev.sm_count, 1024, args.device)
            time.sleep(0.05)
        try:
            if via == "cupy":
                lat, victim_sms = cupy_spins(victim, args)
            else:
                lat, victim_sms = native.time_spins(victim.stream_ptr, args.victim_us,
                                                    args.victim_blocks, args.victim_threads,
                                                    args.iterations, args.device)
        finally:
            if flood is not None:
                flood.stop()
        aggr_sms = flood.sm_ids() if flood is not None else []
        result.update(
            iterations=len(lat),
            p50_us=percentile(lat, 50),
            p99_us=percentile(lat, 99),
            max_us=max(lat),
            mean_us=sum(lat) / len(lat),
            victim_sms=victim_sms,
            aggressor_sms=aggr_sms,
            aggressor_kernels=flood.kernels if flood is not None else 0,
            shared_sms=sorted(set(victim_sms) & set(aggr_sms)),
        )
    return result


_CUPY_SPIN = r"""
extern "C" __global__ void spin(unsigned long long nanos, unsigned int* mask) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  if (threadIdx.x == 0) {
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    if (sm < 512) atomicOr(&mask[sm / 32], 1u << (sm % 32));
  }
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < nanos);
}
"""


def cupy_spins(ctx: Any, args: argparse.Namespace) -> tuple[list[float], list[int]]:
    """The victim's spin kernel launched by CuPy (a module loaded in whatever context CuPy has
    current) on the green context's stream: shows whether CuPy launches follow the stream's SMs."""
    import cupy

    with cupy.cuda.Device(args.device):
        kernel = cupy.RawKernel(_CUPY_SPIN, "spin")
        mask = cupy.zeros(16, dtype=cupy.uint32)
        stream = ctx.cupy_stream()
        lat = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            kernel((args.victim_blocks,), (args.victim_threads,),
                   (cupy.uint64(int(args.victim_us * 1000)), mask), stream=stream)
            stream.synchronize()
            lat.append((time.perf_counter() - t0) * 1e6)
        words = [int(w) for w in mask.get()]
    sms = [w * 32 + b for w, bits in enumerate(words) for b in range(32) if bits >> b & 1]
    return lat, sms


def scenarios(dev: Any, args: argparse.Namespace) -> list[tuple[str, Callable[[], dict]]]:
    from apportion import gpu
    from apportion.errors import PlacementError

    d = args.device
    unit = dev.sm_granularity
    victim_sms = max(unit, math.ceil(args.victim_sms / unit) * unit)
    rest = dev.sm_units * unit - victim_sms

    def grouped(name: str, vprio: str, aprio: str, via: str = "runtime") -> dict:
        # Strict groups: a fallback to the whole GPU would measure no isolation at all.
        aggressor = rest
        for _ in range(3):
            quotas = {
                "victim": gpu.GPU(device=d, priority=vprio, sm_count=victim_sms, strict=True),
                "aggressor": gpu.GPU(device=d, priority=aprio, sm_count=aggressor, strict=True),
            }
            try:
                r = run_scenario(name, quotas, dev, args, via)
            except PlacementError as e:
                if "groups of" not in str(e) or aggressor <= unit:
                    raise
                aggressor -= unit  # the driver split fewer groups than planned
                continue
            if aggressor != rest:
                r["scenario"] += f" (aggressor shrunk to {aggressor} SMs: driver split)"
            return r
        raise RuntimeError(f"{name}: the driver would not build the SM groups")

    plain = {
        "solo": {"victim": gpu.GPU(device=d, priority="normal")},
        "equal priorities": {
            "victim": gpu.GPU(device=d, priority="normal"),
            "aggressor": gpu.GPU(device=d, priority="normal"),
        },
        "victim high priority": {
            "victim": gpu.GPU(device=d, priority="high"),
            "aggressor": gpu.GPU(device=d, priority="low"),
        },
    }
    out: list[tuple[str, Callable[[], dict]]] = [
        (name, lambda name=name, q=q: run_scenario(name, q, dev, args))
        for name, q in plain.items()
    ]
    out += [
        ("SM groups", lambda: grouped("SM groups", "high", "low")),
        ("SM groups, equal priorities",
         lambda: grouped("SM groups, equal priorities", "normal", "normal")),
    ]
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        out.append(("SM groups, CuPy launches",
                    lambda: grouped("SM groups, CuPy launches", "high", "low", via="cupy")))
    return out


# --- simulated (no device): the same output path with made-up numbers ----------------------------


def simulated_scenarios(args: argparse.Namespace) -> list[tuple[str, Callable[[], dict]]]:
    def fake(name: str, p99: float, victim: list[int], aggressor: list[int],
             v_count: int = 0, a_count: int | None = None) -> Callable[[], dict]:
        def measure() -> dict:
            time.sleep(args.simulate_step_s)
            r = {"scenario": name, "p50_us": p99 * 0.8, "p99_us": p99, "victim_sms": victim,
                 "aggressor_sms": aggressor, "shared_sms": sorted(set(victim) & set(aggressor)),
                 "victim_sm_count": v_count}
            if a_count is not None:
                r["aggressor_sm_count"] = a_count
            return r
        return measure

    every = list(range(132))
    return [
        ("solo", fake("solo", 25.0, every, [])),
        ("equal priorities", fake("equal priorities", 900.0, every, every, 0, 0)),
        ("victim high priority", fake("victim high priority", 480.0, every, every, 0, 0)),
        ("SM groups", fake("SM groups", 27.0, list(range(16)), list(range(16, 128)), 16, 112)),
        ("SM groups, equal priorities",
         fake("SM groups, equal priorities", 28.0, list(range(16)), list(range(16, 128)), 16, 112)),
    ]


def inject(index: int) -> None:
    what = os.environ.get("APPORTION_GPU_BENCH_INJECT", "")
    kind, _, at = what.partition("@")
    if not kind or not at or int(at) != index:
        return
    print(f"bench_gpu: injected {kind} at scenario {index}", file=sys.stderr, flush=True)
    if kind == "crash":
        os.abort()
    if kind == "hang":
        while True:
            time.sleep(3600)
    raise SystemExit(f"APPORTION_GPU_BENCH_INJECT={what!r}: use crash@K or hang@K")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--summary", type=Path, help="markdown file the rows are appended to")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--victim-us", type=float, default=20.0)
    ap.add_argument("--victim-blocks", type=int, default=16)
    ap.add_argument("--victim-threads", type=int, default=128)
    ap.add_argument("--aggressor-us", type=float, default=500.0)
    ap.add_argument("--victim-sms", type=int, default=16, help="victim's SM group size")
    ap.add_argument("--simulate", action="store_true", help="no GPU: made-up numbers")
    ap.add_argument("--simulate-step-s", type=float, default=0.05)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = Summary(args.summary)

    if args.simulate:
        device_line = "simulated device (no GPU; the numbers are made up)"
        status: dict[str, Any] = {"simulated": True}
        todo = simulated_scenarios(args)
    else:
        from apportion import gpu

        status = gpu.driver_status()
        if not status["available"]:
            summary.write(f"\nbench_gpu: no CUDA device is present: {status['reason']}\n")
            return 2
        if not gpu.spin_available():
            summary.write("\nbench_gpu: apportion was built without CUDA (no spin kernel)\n")
            return 2
        dev = gpu.devices()[args.device]
        device_line = str(dev)
        todo = scenarios(dev, args)

    summary.write(
        f"\ndevice: {device_line}\n"
        f"victim: {args.victim_blocks} blocks x {args.victim_threads} threads x "
        f"{args.victim_us:g} us; aggressor: 2 blocks per SM x 1024 threads x "
        f"{args.aggressor_us:g} us, kept saturated; {args.iterations} victim launches\n\n"
        + TABLE_HEADER
    )
    results: list[dict[str, Any]] = []
    solo_p99: float | None = None
    for index, (name, measure) in enumerate(todo):
        inject(index)
        t0 = time.monotonic()
        try:
            r = measure()
        except Exception as e:  # one failing scenario must not hide the others
            r = {"scenario": name, "error": f"{type(e).__name__}: {e}"}
        r["seconds"] = round(time.monotonic() - t0, 2)
        if r["scenario"] == "solo" and "p99_us" in r:
            solo_p99 = r["p99_us"]
        results.append(r)
        summary.write(row(r, solo_p99))
        (args.out / "bench_gpu.json").write_text(json.dumps(
            {"meta": {"device": device_line, "driver": status,
                      "python": platform.python_version(),
                      "params": {k: str(v) for k, v in vars(args).items()}},
             "results": results}, indent=2))
    for r in results:
        for w in r.get("warnings", []):
            summary.write(f"warning ({r['scenario']}): {w}\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
