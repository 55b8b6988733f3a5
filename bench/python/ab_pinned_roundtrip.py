"""Same-run A/B of the one-request round trip with the placement held still: the model on an
exclusive core, the caller pinned to the other CPUs (unpinned, the caller's CPU against the
worker's moves the round trip by more than most changes do). Prints the medians of 7 x 30,000
``rt.call``, ``rt.submit(...).result()`` and the same with a request timeout and priority
(``timeout_ms=1000.0, priority=0``, the arguments' checks) (ns). Run it alternately with two builds, as
ab_roundtrip.py says (each from an interpreter where only that build is importable):

    python bench/python/ab_pinned_roundtrip.py LABEL
"""
import os
import statistics
import sys
import time

import apportion as ap

rt = ap.Runtime()
rt.add_model("m", model=lambda x: x, isolation="exclusive", cores=1)
rt.start()
worker_cpu = rt.plan()["m"].instances[0].cpus[0]
os.sched_setaffinity(0, {c for c in os.sched_getaffinity(0) if c != worker_cpu} or {worker_cpu})


def median_ns(fn, n=30000):
    runs = []
    for _ in range(7):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(runs)


call = median_ns(lambda: rt.call("m", 1))
submit_result = median_ns(lambda: rt.submit("m", 1).result())
with_args = median_ns(lambda: rt.submit("m", 1, timeout_ms=1000.0, priority=0).result())
rt.close()
print(sys.argv[1] if len(sys.argv) > 1 else "build",
      f"call={call:.0f}ns submit_result={submit_result:.0f}ns with_args={with_args:.0f}ns")
