"""Round trips on a busy host: a no-op model's submit().result() and call() against a
ThreadPoolExecutor measured in the same run, with 0..N busy-loop processes beside the benchmark.

    python bench/python/bench_busy.py [--busy 0,1,2] [--n 2000] [--reps 3] [--json OUT] [--torch S]

Prints, per number of busy processes, the median (over reps) of each method's median round
trip in microseconds, and the ratio to ThreadPoolExecutor's. Busy processes are plain
`while True: pass` interpreters, killed when the benchmark ends (and after at most --max-s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import apportion as ap


def busy_processes(n: int, max_s: float) -> list[subprocess.Popen[bytes]]:
    code = f"import time\nend = time.monotonic() + {max_s}\nwhile time.monotonic() < end: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    time.sleep(0.3)  # let them take their CPUs
    return procs


def median_us(fn: Callable[[], object], n: int) -> float:
    for _ in range(min(200, n)):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000.0


def measure(n: int) -> dict[str, float]:
    out = {}
    with ThreadPoolExecutor(1) as ex:
        out["ThreadPoolExecutor"] = median_us(lambda: ex.submit(int).result(), n)
    rt = ap.Runtime()
    rt.add_model("noop", model=lambda x: x)
    rt.start()
    try:
        out["submit().result()"] = median_us(lambda: rt.submit("noop", 1).result(), n)
        out["call()"] = median_us(lambda: rt.call("noop", 1), n)
    finally:
        rt.close()
    return out


def torch_pair(spin_us: float, seconds: float) -> float:
    """Two torch MLPs on one exclusive core each, two closed-loop clients each: requests/s."""
    import threading

    import torch

    def build(ctx: ap.InstanceContext) -> object:
        return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).eval()

    rt = ap.Runtime()
    for name in ("a", "b"):
        rt.add_model(name, factory=build, cores=1, isolation="exclusive", threads=1, spin_us=spin_us)
    rt.start()
    for name in ("a", "b"):  # warmed by hand: older builds have no warmup=
        for _ in range(20):
            rt.call(name, torch.randn(256))
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(name: str) -> None:
        x, n = torch.randn(256), 0
        while time.monotonic() < stop:
            rt.call(name, x)
            n += 1
        with lock:
            done[0] += n

    threads = [threading.Thread(target=client, args=(m,)) for m in ("a", "b", "a", "b")]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = done[0] / (time.monotonic() - t0)
    rt.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", default="0,1,2", help="numbers of busy processes, comma-separated")
    p.add_argument("--n", type=int, default=2000, help="round trips per measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-s", type=float, default=120.0, help="longest a busy process lives")
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--torch", type=float, default=0.0, metavar="S",
                   help="also: two torch models saturating both CPUs for S seconds per run, default "
                   "spin vs spin_us=0 (requests/s, median of --reps)")
    args = p.parse_args(argv)
    rows = {}
    for busy in (int(b) for b in args.busy.split(",")):
        reps: list[dict[str, float]] = []
        procs = busy_processes(busy, args.max_s)
        try:
            for _ in range(args.reps):
                reps.append(measure(args.n))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        rows[busy] = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
    print(f"{os.cpu_count()} CPUs; median of {args.reps} reps of {args.n} round trips (µs); ratio to "
          "ThreadPoolExecutor in ()")
    print(f"{'busy':>4}  {'ThreadPoolExecutor':>18}  {'submit().result()':>22}  {'call()':>22}")
    for busy, r in rows.items():
        base = r["ThreadPoolExecutor"]
        cells = [f"{r[k]:8.1f} ({r[k] / base:5.2f}x)" for k in ("submit().result()", "call()")]
        print(f"{busy:>4}  {base:18.1f}  {cells[0]:>22}  {cells[1]:>22}")
    if args.torch > 0:
        default = statistics.median(torch_pair(50.0, args.torch) for _ in range(args.reps))
        nospin = statistics.median(torch_pair(0.0, args.torch) for _ in range(args.reps))
        print(f"two torch models on both CPUs: default {default:.0f} req/s, spin_us=0 {nospin:.0f} req/s "
              f"({default / nospin:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({str(k): v for k, v in rows.items()}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
