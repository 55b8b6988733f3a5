"""close() of a runtime with thousands of worker threads, against removing its models one by
one first (the baseline, in the same run).

Exiting workers each take the GIL once to release their Python state. close() wakes every
worker of every model at once; when thousands waited for the GIL together, each woke every
switch interval to ask for it, and the close took seconds to a minute (8 x 1024 instances:
7.6-66 s, against 0.25 s for the same models removed one at a time). Exiting workers now wait
for the GIL one at a time.

Per round, in a fresh interpreter each: ``--models`` models (``lambda x: x``, shared) of
``--instances`` instances, started, one call each, then either ``rt.close()`` or
``remove_model`` of each model followed by ``close()``; the time of that shutdown.

    PYTHONPATH=python python bench/python/bench_close.py [--models 4] [--instances 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(models: int, instances: int, how: str) -> None:
    import apportion as ap

    rt = ap.Runtime()
    for i in range(models):
        rt.add_model(f"m{i}", model=lambda x: x, instances=instances)
    rt.start()
    for i in range(models):
        rt.call(f"m{i}", 1)
    threads = len(os.listdir("/proc/self/task"))
    t0 = time.perf_counter()
    if how == "remove":
        for i in range(models):
            rt.remove_model(f"m{i}")
    rt.close()
    print(json.dumps({"how": how, "threads": threads, "s": time.perf_counter() - t0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--instances", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=("close", "remove"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.models, args.instances, args.child)
        return
    times: dict[str, list[float]] = {"close": [], "remove": []}
    for r in range(args.rounds):
        for how in ("close", "remove") if r % 2 == 0 else ("remove", "close"):
            out = subprocess.run([sys.executable, __file__, "--child", how, "--models", str(args.models),
                                  "--instances", str(args.instances)],
                                 capture_output=True, text=True, timeout=600, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            times[how].append(row["s"])
            print(f"round {r} {how:6s} {row['threads']} threads: {row['s']:.3f} s", flush=True)
    close, remove = statistics.median(times["close"]), statistics.median(times["remove"])
    print(f"{args.models} models x {args.instances} instances, medians of {args.rounds}: close() {close:.3f} s, "
          f"remove each then close() {remove:.3f} s, ratio {close / remove:.2f}")


if __name__ == "__main__":
    main()
