"""How much load the generator itself can put out, against a plain submit loop.

On a no-op model the model costs nothing, so what limits throughput is the path around it:
for the baseline a Python loop of ``rt.submit(x).result()`` (one outstanding request), for
``apportion.load`` its driver thread and done-callbacks. Measured in the same run; the ratio
says how close the generator gets to the cheapest possible closed loop, and the open-loop rows
say which arrival rate it can still hold (achieved rate and schedule lag).

    python bench/python/bench_load.py [--seconds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import apportion as ap
from apportion import load


def noop(x):
    return x


def plain_loop(rt: ap.Runtime, seconds: float) -> float:
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        rt.submit("noop", n).result()
        n += 1
    return n / seconds


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--seconds", type=float, default=2.0, help="measurement per row")
    ap_.add_argument("--json", help="also write the rows here")
    args = ap_.parse_args()
    window = args.seconds / 3

    rows: list[dict] = []
    with ap.Runtime() as rt:
        rt.add_model("noop", model=noop, instances=2, max_queue=4096)
        rt.start()
        plain_loop(rt, 0.3)  # warm-up
        base = plain_loop(rt, args.seconds)
        rows.append({"row": "plain submit().result() loop", "req_s": base, "ratio": 1.0})
        for c in (1, 8):
            r = load.run(rt, load.ModelLoad("noop", concurrency=c), warmup_s=0.3, window_s=window,
                         max_s=0.3 + 3 * window + 0.01)["noop"]
            rows.append({"row": f"load closed x{c}", "req_s": r.throughput, "ratio": r.throughput / base,
                         "p50_ms": r.latency.p50_ms if r.latency else None})
        for rate in (1_000.0, 10_000.0, 50_000.0):
            r = load.run(rt, load.ModelLoad("noop", rate=rate), warmup_s=0.3, window_s=window,
                         max_s=0.3 + 3 * window + 0.01, seed=1)["noop"]
            rows.append({"row": f"load open {rate:g}/s", "req_s": r.throughput,
                         "ratio": r.offered_rate / rate, "lag_p99_ms": r.schedule_lag_p99_ms})

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{args.seconds:g} s per row; open-loop ratio = achieved / target rate")
    print(f"{'row':32} {'req/s':>10} {'ratio':>7}  extra")
    for r in rows:
        extra = ""
        if r.get("p50_ms") is not None:
            extra = f"p50 {r['p50_ms'] * 1e3:.1f} us"
        if r.get("lag_p99_ms") is not None:
            extra = f"schedule lag p99 {r['lag_p99_ms']:.3f} ms"
        print(f"{r['row']:32} {r['req_s']:10.0f} {r['ratio']:7.2f}  {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
