"""Process isolation: a process instance against a thread instance and the stdlib's process
tools (multiprocessing Pipe, Pool, Queue; concurrent.futures.ProcessPoolExecutor), one run.

Every mode serves the same module-level function with one worker (one instance, one pool
process), and every mode is measured in each repetition, interleaved; the tables report the
median over repetitions of each repetition's median (round trips) or rate (throughput).

- ``noop``: echo of a small int. Round trip: submit one request, wait for it (``--rtt-n``
  times). Throughput: ``--n`` requests submitted at once, then all collected. The process
  instance is measured twice: ``submit(...).result()`` (through the worker thread) and
  ``Runtime.call`` (the caller talks to the idle instance's child itself; its throughput is
  one call at a time, like the Pipe's).
- ``tensor``: echo of a 1 MiB float32 numpy array, same measures (fewer requests).
- ``cpu``: a pure-Python loop that holds the GIL (``--work`` iterations, ~10 ms), two process
  instances against two thread instances of one model, ``--cpu-n`` requests in flight.
- ``threshold``: the transport alone (pickle + channel + unpickle, both ends in this process)
  for a numpy array of each size, in-band versus out-of-band, to place
  ``payload.OUT_OF_BAND_BYTES``.

    PYTHONPATH=python python bench/python/bench_process.py [--reps 5] [--json out.json] [--hog 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # children import this module


def echo(x: Any) -> Any:
    return x


def echo_factory(ctx: Any) -> Callable[[Any], Any]:
    return echo


def work(n: int) -> int:
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return acc


def work_factory(ctx: Any) -> Callable[[int], int]:
    return work


def _pipe_child(conn: Any) -> None:
    while True:
        x = conn.recv()
        if x is None:
            return
        conn.send(x)


def _queue_child(inq: Any, outq: Any) -> None:
    while True:
        x = inq.get()
        if x is None:
            return
        outq.put(x)


def _hog() -> None:
    while True:
        pass


def round_trip(call: Callable[[Any], Any], x: Any, n: int) -> float:
    """Median microseconds of one call-and-wait."""
    samples = []
    for _ in range(n):
        t = time.perf_counter_ns()
        call(x)
        samples.append(time.perf_counter_ns() - t)
    samples.sort()
    return samples[len(samples) // 2] / 1e3


def rate(run: Callable[[int], None], n: int) -> float:
    t = time.perf_counter()
    run(n)
    return n / (time.perf_counter() - t)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def transport_threshold(sizes: list[int], reps: int) -> dict[str, dict[int, float]]:
    from apportion import _core
    from apportion._private import payload

    name = f"/apportion-bench-{os.getpid()}"
    tx = _core.ShmChannel.create(name, 64 << 20)
    rx = _core.ShmChannel.open(name)
    tx.unlink()
    out: dict[str, dict[int, float]] = {"in_band": {}, "out_of_band": {}}
    saved = payload.OUT_OF_BAND_BYTES
    try:
        for size in sizes:
            a = np.ones(size // 4, dtype=np.float32)
            n = max(50, min(5000, (64 << 20) // max(size, 1) // 4))
            for mode, limit in (("in_band", 1 << 62), ("out_of_band", 0)):
                payload.OUT_OF_BAND_BYTES = limit
                times = []
                for _ in range(reps):
                    t = time.perf_counter_ns()
                    for _ in range(n):
                        tx.send(payload.dumps(a), 0.0, None)
                        payload.loads(rx.receive(0.0, 1.0))
                    times.append((time.perf_counter_ns() - t) / n / 1e3)
                out[mode][size] = med(times)
    finally:
        payload.OUT_OF_BAND_BYTES = saved
        rx.close()
        tx.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rtt-n", type=int, default=2000, help="no-op round trips per repetition")
    p.add_argument("--n", type=int, default=10000, help="no-op requests per throughput repetition")
    p.add_argument("--tensor-n", type=int, default=200, help="1 MiB echoes per repetition")
    p.add_argument("--work", type=int, default=400_000, help="loop iterations of a CPU-bound request")
    p.add_argument("--cpu-n", type=int, default=40, help="CPU-bound requests per repetition")
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--hog", type=int, default=0,
                   help="processes that keep a CPU busy throughout (a loaded machine)")
    args = p.parse_args()

    import apportion as ap

    ctx = mp.get_context("spawn")
    hogs = [ctx.Process(target=_hog, daemon=True) for _ in range(args.hog)]
    for h in hogs:
        h.start()
    rt = ap.Runtime()
    rt.add_model("proc", factory="bench_process:echo_factory", isolation="process", max_queue=1 << 20)
    rt.add_model("thread", factory=echo_factory, max_queue=1 << 20)
    rt.add_model("cpu_proc", factory="bench_process:work_factory", isolation="process", instances=2)
    rt.add_model("cpu_thread", factory=work_factory, instances=2)
    rt.start()
    a, b = ctx.Pipe()
    pipe_child = ctx.Process(target=_pipe_child, args=(b,))
    pipe_child.start()
    inq, outq = ctx.Queue(), ctx.Queue()
    queue_child = ctx.Process(target=_queue_child, args=(inq, outq))
    queue_child.start()
    pool = ctx.Pool(1)
    ppe = cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx)
    ppe2 = cf.ProcessPoolExecutor(max_workers=2, mp_context=ctx)

    def pipe_call(x: Any) -> Any:
        a.send(x)
        return a.recv()

    def queue_call(x: Any) -> Any:
        inq.put(x)
        return outq.get()

    calls: dict[str, Callable[[Any], Any]] = {
        "process instance, call()": lambda x: rt.call("proc", x),
        "process instance": lambda x: rt.submit("proc", x).result(),
        "thread instance": lambda x: rt.submit("thread", x).result(),
        "mp.Pipe": pipe_call,
        "mp.Queue": queue_call,
        "mp.Pool": lambda x: pool.apply_async(echo, (x,)).get(),
        "ProcessPoolExecutor": lambda x: ppe.submit(echo, x).result(),
    }

    def batch(model: str) -> Callable[[int, Any], None]:
        def run(n: int, x: Any) -> None:
            for f in [rt.submit(model, x) for _ in range(n)]:
                f.result()
        return run

    def pipe_batch(n: int, x: Any) -> None:  # one message in flight: a pipe has no queue of its own
        for _ in range(n):
            pipe_call(x)

    def queue_batch(n: int, x: Any) -> None:
        for _ in range(n):
            inq.put(x)
        for _ in range(n):
            outq.get()

    def call_batch(n: int, x: Any) -> None:  # one call at a time: call() waits for each
        for _ in range(n):
            rt.call("proc", x)

    batches: dict[str, Callable[[int, Any], None]] = {
        "process instance, call()": call_batch,
        "process instance": batch("proc"),
        "thread instance": batch("thread"),
        "mp.Pipe": pipe_batch,
        "mp.Queue": queue_batch,
        "mp.Pool": lambda n, x: [r.get() for r in [pool.apply_async(echo, (x,)) for _ in range(n)]] and None,
        "ProcessPoolExecutor": lambda n, x: [f.result() for f in [ppe.submit(echo, x) for _ in range(n)]] and None,
    }
    tensor = np.ones(1 << 18, dtype=np.float32)  # 1 MiB
    raw: dict[str, dict[str, list[float]]] = {k: {m: [] for m in calls} for k in
                                              ("noop_rtt_us", "noop_rate", "tensor_rtt_us", "tensor_rate")}
    raw["cpu_rate"] = {"2 process instances": [], "2 thread instances": [], "ProcessPoolExecutor(2)": []}

    for call in calls.values():  # warm-up: imports, first pages, pool processes started
        for _ in range(50):
            call(1)
            call(tensor)
    for rep in range(args.reps):
        for mode, call in calls.items():
            raw["noop_rtt_us"][mode].append(round_trip(call, 1, args.rtt_n))
            raw["tensor_rtt_us"][mode].append(round_trip(call, tensor, args.tensor_n))
        for mode, run in batches.items():
            raw["noop_rate"][mode].append(rate(lambda n: run(n, 1), args.n))
            raw["tensor_rate"][mode].append(rate(lambda n: run(n, tensor), args.tensor_n))
        for mode, model in (("2 process instances", "cpu_proc"), ("2 thread instances", "cpu_thread")):
            raw["cpu_rate"][mode].append(rate(lambda n: batch(model)(n, args.work), args.cpu_n))
        raw["cpu_rate"]["ProcessPoolExecutor(2)"].append(rate(
            lambda n: [f.result() for f in [ppe2.submit(work, args.work) for _ in range(n)]] and None, args.cpu_n))
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)

    a.send(None)
    pipe_child.join()
    inq.put(None)
    queue_child.join()
    pool.close()
    pool.join()
    ppe.shutdown()
    ppe2.shutdown()
    rt.close()
    for h in hogs:
        h.kill()
        h.join()
    threshold = transport_threshold([4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20], args.reps)

    print(f"# {platform.node()} {platform.python_implementation()} {platform.python_version()}, "
          f"nproc={os.cpu_count()}, reps={args.reps} (medians), busy-loop processes={args.hog}")
    print("\n| mode | no-op round trip | no-op throughput | 1 MiB round trip | 1 MiB throughput |")
    print("|---|---:|---:|---:|---:|")
    for mode in calls:
        print(f"| {mode} | {med(raw['noop_rtt_us'][mode]):.1f} us | {med(raw['noop_rate'][mode]):,.0f}/s "
              f"| {med(raw['tensor_rtt_us'][mode]):.0f} us | {med(raw['tensor_rate'][mode]):,.0f}/s |")
    pipe_noop = med(raw["noop_rtt_us"]["mp.Pipe"])
    ppe_tensor = med(raw["tensor_rtt_us"]["ProcessPoolExecutor"])
    for mode in ("process instance, call()", "process instance"):
        print(f"\nno-op round trip, {mode} / mp.Pipe: "
              f"{med(raw['noop_rtt_us'][mode]) / pipe_noop:.2f}x (target <= 0.5x)")
        print(f"1 MiB round trip, {mode} / ProcessPoolExecutor: "
              f"{med(raw['tensor_rtt_us'][mode]) / ppe_tensor:.2f}x (target <= 0.33x)")
    print("\n| CPU-bound (pure Python, GIL held) | requests/s |")
    print("|---|---:|")
    for mode, xs in raw["cpu_rate"].items():
        print(f"| {mode} | {med(xs):.1f} |")
    print(f"\nprocess / thread instances: "
          f"{med(raw['cpu_rate']['2 process instances']) / med(raw['cpu_rate']['2 thread instances']):.2f}x")
    print("\n| array bytes | in-band (pickled) | out-of-band (shm part) |")
    print("|---:|---:|---:|")
    for size in threshold["in_band"]:
        print(f"| {size:,} | {threshold['in_band'][size]:.1f} us | {threshold['out_of_band'][size]:.1f} us |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": raw, "threshold": threshold, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
