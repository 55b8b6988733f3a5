"""No-op round trip and throughput: apportion vs concurrent.futures.ThreadPoolExecutor.

Both are measured in the same run, interleaved, several repetitions; the table reports medians
and the ratios the project tracks (see bench/RESULTS.md).

    python bench/python/bench_roundtrip.py [--reps 5] [--n 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import statistics
import time

import apportion as ap


def noop(x):
    return x


def round_trip(submit, n: int) -> tuple[float, float]:
    """Median and p99 (us) of submit-then-wait for one request at a time."""
    samples = []
    for i in range(n):
        t = time.perf_counter_ns()
        submit(i).result()
        samples.append(time.perf_counter_ns() - t)
    samples.sort()
    return samples[len(samples) // 2] / 1e3, samples[int(len(samples) * 0.99)] / 1e3


def throughput(run, n: int) -> float:
    t = time.perf_counter()
    run(n)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--n", type=int, default=100_000, help="requests per throughput repetition")
    p.add_argument("--rtt-n", type=int, default=5_000, help="requests per round-trip repetition")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args()

    rt = ap.Runtime()
    rt.add_model("noop", model=noop, max_queue=1 << 20)
    rt.start()
    pool = cf.ThreadPoolExecutor(max_workers=1)

    def ap_submit(n):
        futs = [rt.submit("noop", i) for i in range(n)]
        for f in futs:
            f.result()

    def ap_submit_many(n):
        for f in rt.submit_many("noop", range(n)):
            f.result()

    def tpe_submit(n):
        futs = [pool.submit(noop, i) for i in range(n)]
        for f in futs:
            f.result()

    raw: dict[str, list] = {k: [] for k in
                            ("ap_rtt", "tpe_rtt", "ap_submit", "ap_submit_many", "tpe_submit")}
    # warm-up
    round_trip(lambda i: rt.submit("noop", i), 500)
    round_trip(lambda i: pool.submit(noop, i), 500)
    for _ in range(args.reps):
        raw["ap_rtt"].append(round_trip(lambda i: rt.submit("noop", i), args.rtt_n))
        raw["tpe_rtt"].append(round_trip(lambda i: pool.submit(noop, i), args.rtt_n))
        raw["ap_submit"].append(throughput(ap_submit, args.n))
        raw["ap_submit_many"].append(throughput(ap_submit_many, args.n))
        raw["tpe_submit"].append(throughput(tpe_submit, args.n))
    rt.close()
    pool.shutdown()

    med = statistics.median
    ap_p50 = med(r[0] for r in raw["ap_rtt"])
    ap_p99 = med(r[1] for r in raw["ap_rtt"])
    tpe_p50 = med(r[0] for r in raw["tpe_rtt"])
    tpe_p99 = med(r[1] for r in raw["tpe_rtt"])
    tpe = med(raw["tpe_submit"])
    sub = med(raw["ap_submit"])
    many = med(raw["ap_submit_many"])
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"{args.reps} reps (medians)")
    print()
    print("| measure | apportion | ThreadPoolExecutor | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| no-op round trip p50 (us) | {ap_p50:.1f} | {tpe_p50:.1f} | {ap_p50 / tpe_p50:.2f}x (target <= 0.20x) |")
    print(f"| no-op round trip p99 (us) | {ap_p99:.1f} | {tpe_p99:.1f} | {ap_p99 / tpe_p99:.2f}x |")
    print(f"| no-op throughput, submit (req/s) | {sub:,.0f} | {tpe:,.0f} | {sub / tpe:.1f}x (target >= 5x) |")
    print(f"| no-op throughput, submit_many (req/s) | {many:,.0f} | {tpe:,.0f} | {many / tpe:.1f}x (target >= 10x) |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    main()
