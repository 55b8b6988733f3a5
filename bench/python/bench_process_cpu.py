"""CPU-bound requests through two process instances against ProcessPoolExecutor(2), alternated
in one run, with where the time went.

    python bench/python/bench_process_cpu.py [N] [REPS] [SPIN_US] [--rounds R]

N requests in flight per repetition (default 40), REPS repetitions per round (default 7),
SPIN_US the model's spin_us (default: the runtime's default), R rounds (default 5), each with
new worker processes on both sides.

Why rounds: the same pure-Python loop runs at a speed that is a property of the process that
runs it (memory layout, hash seed), and two processes started alike can differ by 5% and more.
One pair of pools measured many times measures which processes drew the faster layouts; each
round starts new ones, and the summary is the median over rounds. The work reports the CPU
time it took inside its process (``time.thread_time``), so each side's work time per request
and its hand-off cost per request (2 workers: 2 / throughput - work time) are separate.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WORK = 400_000


def timed_work(n: int) -> float:
    """bench_process.work's loop; returns the CPU seconds it took in this thread."""
    t = time.thread_time()
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return time.thread_time() - t + 0.0 * acc


def timed_factory(ctx: Any) -> Any:
    return timed_work


def one_round(n: int, reps: int, spin: float | None) -> dict[str, Any]:
    import apportion as ap

    rt = ap.Runtime()
    kw = {} if spin is None else {"spin_us": spin}
    rt.add_model("cpu_proc", factory="bench_process_cpu:timed_factory", isolation="process", instances=2, **kw)
    rt.start()
    ppe = cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"))
    try:
        def run_rt() -> list[float]:
            return [f.result() for f in [rt.submit("cpu_proc", WORK) for _ in range(n)]]

        def run_ppe() -> list[float]:
            return [f.result() for f in [ppe.submit(timed_work, WORK) for _ in range(n)]]

        for f in (run_rt, run_ppe):
            f()  # warm: both pools started and the work's code paths hot
        rate: dict[str, list[float]] = {"rt": [], "ppe": []}
        work: dict[str, list[float]] = {"rt": [], "ppe": []}
        parent: dict[str, list[float]] = {"rt": [], "ppe": []}
        for i in range(reps):
            order = (("rt", run_rt), ("ppe", run_ppe)) if i % 2 == 0 else (("ppe", run_ppe), ("rt", run_rt))
            for k, f in order:
                c = time.process_time()
                t = time.perf_counter()
                got = f()
                rate[k].append(n / (time.perf_counter() - t))
                parent[k].append((time.process_time() - c) / n)
                work[k] += got
    finally:
        rt.close()
        ppe.shutdown()
    out: dict[str, Any] = {"ratio": statistics.median(a / b for a, b in zip(rate["rt"], rate["ppe"]))}
    for k in ("rt", "ppe"):
        r = statistics.median(rate[k])
        w = statistics.median(work[k])
        out[k] = {"req_s": r, "work_ms": w * 1e3, "handoff_us": (2.0 / r - w) * 1e6,
                  "parent_us": statistics.median(parent[k]) * 1e6}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("n", nargs="?", type=int, default=40)
    p.add_argument("reps", nargs="?", type=int, default=7)
    p.add_argument("spin", nargs="?", type=float, default=None)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    rounds = []
    print(f"{'round':>5} {'ratio':>7} {'rt req/s':>9} {'ppe req/s':>10} {'rt work ms':>11} {'ppe work ms':>12} "
          f"{'rt hand-off us':>15} {'ppe hand-off us':>16} {'rt parent us':>13} {'ppe parent us':>14}")
    for i in range(a.rounds):
        r = one_round(a.n, a.reps, a.spin)
        rounds.append(r)
        print(f"{i:>5} {r['ratio']:>7.3f} {r['rt']['req_s']:>9.1f} {r['ppe']['req_s']:>10.1f} "
              f"{r['rt']['work_ms']:>11.2f} {r['ppe']['work_ms']:>12.2f} {r['rt']['handoff_us']:>15.0f} "
              f"{r['ppe']['handoff_us']:>16.0f} {r['rt']['parent_us']:>13.0f} {r['ppe']['parent_us']:>14.0f}",
              flush=True)
    med = statistics.median
    print(f"median over {a.rounds} rounds of new processes: ratio {med(r['ratio'] for r in rounds):.3f} "
          f"(rounds {min(r['ratio'] for r in rounds):.3f}-{max(r['ratio'] for r in rounds):.3f}); "
          f"hand-off per request rt {med(r['rt']['handoff_us'] for r in rounds):.0f} us, "
          f"ppe {med(r['ppe']['handoff_us'] for r in rounds):.0f} us; work per request rt "
          f"{med(r['rt']['work_ms'] for r in rounds):.2f} ms, ppe {med(r['ppe']['work_ms'] for r in rounds):.2f} ms")


if __name__ == "__main__":
    main()
