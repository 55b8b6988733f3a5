"""Victim latency next to a saturating aggressor on one GPU: solo, equal priorities, with
priorities, with SM groups (green contexts). Also records the SMs each side ran on.

The victim is a short spin kernel timed from launch to the end of cudaStreamSynchronize; the
aggressor keeps its stream full of long spin kernels that occupy every thread slot of the SMs
they reach (2 blocks x 1024 threads per SM). Streams and green contexts come from
apportion.gpu.GpuPartition, exactly as models get them.

usage: python bench/gpu/bench_gpu.py --out OUTDIR [--iterations N] [--device D]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

from apportion import _core
from apportion import gpu


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


def run_scenario(
    name: str, quotas: dict[str, gpu.GPU], dev: Any, args: argparse.Namespace
) -> dict[str, Any]:
    native = _core.gpu
    plan = gpu.plan_gpus(quotas, [dev])
    result: dict[str, Any] = {"scenario": name, "plan": str(plan)}
    with gpu.GpuPartition(plan) as part:
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
            flood = native.SpinFlood(aggr.stream_ptr, args.aggressor_us,
                                     2 * dev.sm_count, 1024, args.device)
            time.sleep(0.05)  # let the aggressor fill the GPU first
        try:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--victim-us", type=float, default=20.0)
    ap.add_argument("--victim-blocks", type=int, default=16)
    ap.add_argument("--victim-threads", type=int, default=128)
    ap.add_argument("--aggressor-us", type=float, default=500.0)
    ap.add_argument("--victim-sms", type=int, default=16, help="victim's SM group size")
    args = ap.parse_args()

    status = gpu.driver_status()
    if not status["available"]:
        print(f"bench_gpu: no CUDA device is present: {status['reason']}", file=sys.stderr)
        return 2
    if not gpu.spin_available():
        print("bench_gpu: apportion was built without CUDA (no spin kernel)", file=sys.stderr)
        return 2
    dev = gpu.devices()[args.device]
    unit = dev.sm_granularity
    victim_sms = max(unit, math.ceil(args.victim_sms / unit) * unit)
    rest = dev.sm_units * unit - victim_sms

    scenarios: list[tuple[str, dict[str, gpu.GPU]]] = [
        ("solo", {"victim": gpu.GPU(device=args.device, priority="normal")}),
        ("equal priorities", {
            "victim": gpu.GPU(device=args.device, priority="normal"),
            "aggressor": gpu.GPU(device=args.device, priority="normal"),
        }),
        ("victim high priority", {
            "victim": gpu.GPU(device=args.device, priority="high"),
            "aggressor": gpu.GPU(device=args.device, priority="low"),
        }),
        ("SM groups", {
            "victim": gpu.GPU(device=args.device, priority="high", sm_count=victim_sms),
            "aggressor": gpu.GPU(device=args.device, priority="low", sm_count=rest),
        }),
        ("SM groups, equal priorities", {
            "victim": gpu.GPU(device=args.device, priority="normal", sm_count=victim_sms),
            "aggressor": gpu.GPU(device=args.device, priority="normal", sm_count=rest),
        }),
    ]
    results = []
    for name, quotas in scenarios:
        try:
            results.append(run_scenario(name, quotas, dev, args))
        except Exception as e:  # one failing scenario must not hide the others
            results.append({"scenario": name, "error": f"{type(e).__name__}: {e}"})

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(dev),
        "driver": status,
        "python": platform.python_version(),
        "params": {k: v for k, v in vars(args).items() if k != "out"},
    }
    (args.out / "bench_gpu.json").write_text(json.dumps({"meta": meta, "results": results},
                                                        indent=2))

    solo = next((r for r in results if r["scenario"] == "solo" and "p50_us" in r), None)
    lines = [
        f"device: {dev}",
        f"victim: {args.victim_blocks} blocks x {args.victim_threads} threads x "
        f"{args.victim_us:g} us; aggressor: {2 * dev.sm_count} blocks x 1024 threads x "
        f"{args.aggressor_us:g} us, kept saturated; {args.iterations} victim launches",
        "",
        "| scenario | victim p50 us | victim p99 us | p99 / solo p99 | victim SMs | aggressor SMs "
        "| shared SMs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['scenario']} | error: {r['error']} | | | | | |")
            continue
        ratio = r["p99_us"] / solo["p99_us"] if solo else math.nan
        lines.append(
            f"| {r['scenario']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {ratio:.2f} "
            f"| {len(r['victim_sms'])} ({ranges(r['victim_sms'])}) "
            f"| {len(r['aggressor_sms'])} | {len(r['shared_sms'])} |"
        )
    for r in results:
        for w in r.get("warnings", []):
            lines.append(f"warning ({r['scenario']}): {w}")
    table = "\n".join(lines)
    (args.out / "bench_gpu.md").write_text(table + "\n")
    print(table)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
