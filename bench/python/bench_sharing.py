"""Sharing policies on torch CPU models (issue 4, item 6): batching, noisy neighbour, replicas.

Each scenario is measured against its baseline in the same run; every (scenario, mode,
repetition) runs in a fresh interpreter, so no mode inherits another's torch thread pools or
process-wide thread setting. Models are built in code with random weights.

- ``batching`` (6b): an MLP (1024-2048-2048-512) on one sample (a 1024-vector) per request, one
  exclusive core, one thread; batch 1 against ``ap.Batching(max_size=16, max_delay_ms=2)``.
  First the batch-1 capacity is measured (closed loop, 16 outstanding); then both modes get
  open-loop Poisson load at fractions of it (``--loads``, default 0.5, 1, 1.5, 2.5) and a
  closed loop of 32 outstanding (saturation). max_queue 128: beyond it arrivals are rejected.
- ``neighbour`` (6a): a latency-critical MLP (512-1024-1024-256 on 16 rows, ~1 ms on one
  thread) at a fixed open-loop rate (``--crit-rate``) next to a batch MLP (1024-4096-4096-1024
  on 64 rows, ~35 ms on one thread) kept saturated by a closed loop (8 outstanding). Modes:
  *solo* (critical model alone, exclusive core, 1 thread), *solo default* (alone, shared pool,
  torch's default threads), *unmanaged* (both on the shared pool of both cores, torch's default
  intra-op threads = one per CPU), *priority* (both on the scheduled shared pool,
  ``Runtime(shared_pool="scheduled")``: critical ``priority_class=1``, one instance, one thread;
  batch ``priority_class=0``, two instances of one thread, so it can use the whole pool while
  the critical model idles), *reserved* (as *priority*, with ``pool_reserve={1: 1}``: the
  critical class may hold one unit beyond the pool, and the batch workers run at nice +10, so a
  critical call starts at once instead of waiting for a 35 ms batch call to end), *isolated*
  (each ``isolation="exclusive", cores=1, threads=1``).
- ``replicas`` (6d): the critical MLP, two instances (one core and one thread each) pulling from
  one queue, against two single-instance models (one core each) with the client routing each
  request to one of them at random (a queue per instance). Open-loop Poisson load at ``--util``
  (default 0.8) of the capacity measured first (one-queue config, closed loop, 16 outstanding).
  Both modes use the same generator here (it routes at random), not apportion.load, because
  the p99 must be taken over all requests of both models together.

- ``fairness`` (6c): two copies of the critical MLP on the scheduled shared pool (two CPUs: two
  units), two instances of one thread each, ``weight=3`` and ``weight=1``, each kept backlogged
  by a closed loop (16 outstanding). Over the measured windows: each model's pool time
  (``stats().pool_time_s``: call duration x units) and completions; the achieved share of pool
  time against the weights' 3:1. Baseline in the same run: the same two models with
  ``shared_pool="os"`` (no weights: the OS splits the CPUs).

Every child sets ``sys.setswitchinterval`` (``--switch-interval-ms``, default 0.5 ms, as
``apportion demo`` does) in every mode: the load generator shares the interpreter with the
models' Python code. Results and their reading: bench/RESULTS.md, "Sharing policies (Python)".

    PYTHONPATH=python python bench/python/bench_sharing.py [all|batching|neighbour|replicas]
        [--reps 3] [--window 1.0] [--switch-interval-ms 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SCENARIOS = ("batching", "neighbour", "replicas", "fairness")
NEIGHBOUR_MODES = ("solo", "solo_default", "unmanaged", "priority", "reserved", "isolated")
FAIRNESS_MODES = ("weighted", "os")
WEIGHTS = {"heavy": 3.0, "light": 1.0}
REPLICA_MODES = ("one_queue", "per_instance")
BATCH_MODES = ("batch1", "batched")
BATCHING = {"max_size": 16, "max_delay_ms": 2.0}


# -- models (built in code) -------------------------------------------------------------------

def mlp(dims: tuple[int, ...], seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[Any] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def batchable_factory(ctx: Any = None) -> Any:
    return mlp((1024, 2048, 2048, 512), 1)


def batchable_input() -> Any:
    import torch

    return torch.randn(1024, generator=torch.Generator().manual_seed(1))  # one sample, no batch dim


def critical_factory(ctx: Any = None) -> Any:
    return mlp((512, 1024, 1024, 256), 2)


def critical_input() -> Any:
    import torch

    return torch.randn(16, 512, generator=torch.Generator().manual_seed(2))


def heavy_factory(ctx: Any = None) -> Any:
    return mlp((1024, 4096, 4096, 1024), 3)


def heavy_input() -> Any:
    import torch

    return torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))


# -- measuring (children) ---------------------------------------------------------------------

def _lat(m: Any) -> dict[str, Any]:
    e = m.latency
    return {
        "throughput": m.throughput, "offered_rate": m.offered_rate, "rejected": m.rejected,
        "completed": m.completed, "stable": m.stable,
        "p50_ms": None if e is None else e.p50_ms, "p99_ms": None if e is None else e.p99_ms,
        "lag_p99_ms": m.schedule_lag_p99_ms,
    }


def _run(rt: Any, loads: list[Any], a: argparse.Namespace, seed: int) -> Any:
    from apportion import load

    total = a.warmup + a.windows * a.window
    return load.run(rt, loads, warmup_s=a.warmup, window_s=a.window, stable_windows=a.windows,
                    tolerance=0.1, max_s=total + 0.01, seed=seed)


def _warm(rt: Any, name: str, x: Any, n: int = 10) -> None:
    for _ in range(n):
        rt.submit(name, x).result()


def child_batching(mode: str, a: argparse.Namespace) -> dict[str, Any]:
    import apportion as ap
    from apportion import load

    x = batchable_input()
    rt = ap.Runtime()
    rt.add_model("mlp", factory=batchable_factory, isolation="exclusive", cores=1, threads=1,
                 max_queue=128, batching=ap.Batching(**BATCHING) if mode == "batched" else None)
    rt.start()
    out: dict[str, Any] = {"mode": mode, "plan": str(rt.plan())}
    try:
        _warm(rt, "mlp", x)
        if mode == "capacity":
            r = _run(rt, [load.ModelLoad("mlp", concurrency=16, inputs=lambda: x)], a, 0)
            out["capacity"] = r["mlp"].throughput
            return out
        rows = []
        for i, frac in enumerate(a.loads):
            rate = frac * a.capacity
            r = _run(rt, [load.ModelLoad("mlp", rate=rate, inputs=lambda: x)], a, 100 + i)
            rows.append({"load": frac, "rate": rate, **_lat(r["mlp"])})
        r = _run(rt, [load.ModelLoad("mlp", concurrency=32, inputs=lambda: x)], a, 99)
        rows.append({"load": "closed", "rate": None, **_lat(r["mlp"])})
        out["rows"] = rows
        return out
    finally:
        rt.close(drain=False)


def child_neighbour(mode: str, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import apportion as ap
    from apportion import load

    default_threads = torch.get_num_threads()  # before any worker sets its own
    if mode in ("priority", "reserved"):
        rt = ap.Runtime(shared_pool="scheduled", pool_reserve={1: 1} if mode == "reserved" else None)
    else:
        rt = ap.Runtime(shared_pool="os")
    if mode in ("solo", "isolated"):
        crit_q: dict[str, Any] = dict(isolation="exclusive", cores=1, threads=1)
        heavy_q: dict[str, Any] = dict(isolation="exclusive", cores=1, threads=1)
    elif mode in ("priority", "reserved"):
        crit_q = dict(isolation="shared", threads=1, priority_class=1)
        heavy_q = dict(isolation="shared", instances=2, threads=1, priority_class=0)
    else:  # framework defaults: floating on every core, torch's default intra-op threads
        crit_q = dict(isolation="shared")
        heavy_q = dict(isolation="shared")
    rt.add_model("critical", factory=critical_factory, max_queue=256, **crit_q)
    with_heavy = mode in ("unmanaged", "priority", "reserved", "isolated")
    if with_heavy:
        rt.add_model("batch", factory=heavy_factory, max_queue=256, **heavy_q)
    rt.start()
    cx, hx = critical_input(), heavy_input()
    out: dict[str, Any] = {"mode": mode, "plan": str(rt.plan()), "torch_default_threads": default_threads}
    try:
        _warm(rt, "critical", cx)
        loads = [load.ModelLoad("critical", rate=a.crit_rate, inputs=lambda: cx)]
        if with_heavy:
            _warm(rt, "batch", hx, 3)
            loads.append(load.ModelLoad("batch", concurrency=8, inputs=lambda: hx))
        r = _run(rt, loads, a, 7)
        out["critical"] = _lat(r["critical"])
        if with_heavy:
            out["batch"] = _lat(r["batch"])
        return out
    finally:
        rt.close(drain=False)


def _open_loop(rt: Any, names: list[str], x: Any, rate: float, warmup: float, seconds: float,
               seed: int) -> dict[str, Any]:
    """Poisson arrivals at ``rate``, each sent to a model picked at random from ``names``,
    scheduled at absolute times; latency from just before submit to the done-callback."""
    from apportion.errors import QueueFull

    rng = random.Random(seed)  # arrivals: the same sequence in every mode
    route = random.Random(seed + 1)
    lat: list[int] = []
    rejected = 0
    lags: list[int] = []
    t_start = time.perf_counter_ns()
    t_measure = t_start + int(warmup * 1e9)
    t_end = t_measure + int(seconds * 1e9)
    t_next = t_start
    pending = []
    while True:
        t_next += int(rng.expovariate(rate) * 1e9)
        if t_next >= t_end:
            break
        now = time.perf_counter_ns()
        if t_next - now > 200_000:
            time.sleep((t_next - now - 100_000) / 1e9)
        while time.perf_counter_ns() < t_next:
            pass
        name = names[0] if len(names) == 1 else route.choice(names)
        t0 = time.perf_counter_ns()
        measured = t_next >= t_measure
        try:
            fut = rt.submit(name, x)
        except QueueFull:
            rejected += measured
            continue
        if measured:
            lags.append(t0 - t_next)
            fut.add_done_callback(lambda f, t0=t0: lat.append(time.perf_counter_ns() - t0))
            pending.append(fut)
    for f in pending:
        f.result()
    lat.sort()
    lags.sort()
    n = len(lat)
    return {"completed": n, "throughput": n / seconds, "rejected": rejected,
            "p50_ms": lat[n // 2] / 1e6, "p99_ms": lat[min(n - 1, int(n * 0.99))] / 1e6,
            "lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] / 1e6}


def child_replicas(mode: str, a: argparse.Namespace) -> dict[str, Any]:
    import apportion as ap
    from apportion import load

    x = critical_input()
    rt = ap.Runtime()
    if mode in ("one_queue", "capacity"):
        rt.add_model("m", factory=critical_factory, isolation="exclusive", cores=2, instances=2,
                     threads=1, max_queue=1024)
        names = ["m"]
    else:
        for n in ("m0", "m1"):
            rt.add_model(n, factory=critical_factory, isolation="exclusive", cores=1, threads=1,
                         max_queue=1024)
        names = ["m0", "m1"]
    rt.start()
    out: dict[str, Any] = {"mode": mode, "plan": str(rt.plan())}
    try:
        for n in names:
            _warm(rt, n, x)
        if mode == "capacity":
            r = _run(rt, [load.ModelLoad("m", concurrency=16, inputs=lambda: x)], a, 0)
            out["capacity"] = r["m"].throughput
            return out
        rate = a.util * a.capacity
        out["rate"] = rate
        out.update(_open_loop(rt, names, x, rate, a.warmup, a.windows * a.window, 11))
        return out
    finally:
        rt.close(drain=False)


def child_fairness(mode: str, a: argparse.Namespace) -> dict[str, Any]:
    import apportion as ap

    rt = ap.Runtime(shared_pool="scheduled" if mode == "weighted" else "os")
    for name, w in WEIGHTS.items():
        extra: dict[str, Any] = {"weight": w} if mode == "weighted" else {}
        rt.add_model(name, factory=critical_factory, instances=2, threads=1, max_queue=64, **extra)
    rt.start()
    x = critical_input()
    stop = threading.Event()

    def keep(name: str) -> None:
        # Closed loop: every completion submits the next request, 16 outstanding per model.
        def again(_f: Any) -> None:
            if not stop.is_set():
                try:
                    rt.submit(name, x).add_done_callback(again)
                except (ap.RuntimeClosed, ap.QueueFull):
                    pass

        for _ in range(16):
            rt.submit(name, x).add_done_callback(again)

    try:
        for name in WEIGHTS:
            _warm(rt, name, x)
        for name in WEIGHTS:
            keep(name)
        time.sleep(a.warmup)
        s0 = rt.stats()
        t0 = time.perf_counter()
        time.sleep(a.windows * a.window)
        s1 = rt.stats()
        seconds = time.perf_counter() - t0
        out: dict[str, Any] = {"mode": mode, "seconds": seconds}
        for name in WEIGHTS:
            out[name] = {"completed": s1[name].completed - s0[name].completed,
                         "pool_time_s": s1[name].pool_time_s - s0[name].pool_time_s,
                         "compute_s": s1[name].compute.mean_ms * s1[name].compute.count / 1e3
                         - s0[name].compute.mean_ms * s0[name].compute.count / 1e3}
        return out
    finally:
        stop.set()
        rt.close(drain=False)


CHILDREN = {"batching": child_batching, "neighbour": child_neighbour, "replicas": child_replicas,
            "fairness": child_fairness}


# -- parent -----------------------------------------------------------------------------------

def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                      if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {len(os.sched_getaffinity(0))} usable CPUs"


def spawn(scenario: str, mode: str, a: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{scenario}:{mode}",
           "--warmup", str(a.warmup), "--window", str(a.window), "--windows", str(a.windows),
           "--loads", ",".join(str(f) for f in a.loads), "--crit-rate", str(a.crit_rate),
           "--util", str(a.util), "--switch-interval-ms", str(a.switch_interval_ms)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{scenario}:{mode} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def med(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def do_batching(a: argparse.Namespace, raw: dict[str, Any]) -> None:
    cap = spawn("batching", "capacity", a)["capacity"]
    log(f"# batching: batch-1 capacity {cap:.0f}/s")
    runs: list[dict[str, Any]] = []
    for rep in range(a.reps):
        order = BATCH_MODES if rep % 2 == 0 else BATCH_MODES[::-1]
        for mode in order:
            r = spawn("batching", mode, a, capacity=cap)
            r["rep"] = rep
            runs.append(r)
            log(f"# rep {rep + 1} {mode}: " + "; ".join(
                f"{row['load']}: {row['throughput']:.0f}/s p99 {f(row['p99_ms'])}" for row in r["rows"]))
    raw["batching"] = {"capacity": cap, "runs": runs}
    print(f"### Dynamic batching (batch-1 capacity measured first: {cap:.0f} req/s; "
          f"Batching(max_size={BATCHING['max_size']}, max_delay_ms={BATCHING['max_delay_ms']:g}))\n")
    print("| load | offered req/s | batch 1 req/s | batch 1 p50 / p99 ms | batch 1 rejected "
          "| batched req/s | batched p50 / p99 ms | batched rejected | throughput ratio | p99 ratio (batched/batch 1) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    n_rows = len(runs[0]["rows"])
    for i in range(n_rows):
        cells: dict[str, dict[str, float | None]] = {}
        for mode in BATCH_MODES:
            rows = [r["rows"][i] for r in runs if r["mode"] == mode]
            cells[mode] = {k: med([row[k] for row in rows])
                           for k in ("throughput", "p50_ms", "p99_ms", "rejected", "offered_rate")}
        pairs = [(next(r for r in runs if r["rep"] == rep and r["mode"] == "batched")["rows"][i],
                  next(r for r in runs if r["rep"] == rep and r["mode"] == "batch1")["rows"][i])
                 for rep in range(a.reps)]
        tput = med([b["throughput"] / o["throughput"] for b, o in pairs if o["throughput"]])
        p99 = med([b["p99_ms"] / o["p99_ms"] for b, o in pairs if b["p99_ms"] and o["p99_ms"]])
        label = runs[0]["rows"][i]["load"]
        label = f"{label:g}x capacity (open)" if isinstance(label, (int, float)) else "closed loop, 32 outstanding"
        b1, bt = cells["batch1"], cells["batched"]
        offered = f(b1["offered_rate"], ".0f") if isinstance(runs[0]["rows"][i]["load"], (int, float)) else "-"
        print(f"| {label} | {offered} | {f(b1['throughput'], '.0f')} | {f(b1['p50_ms'])} / {f(b1['p99_ms'])} "
              f"| {f(b1['rejected'], '.0f')} | {f(bt['throughput'], '.0f')} | {f(bt['p50_ms'])} / {f(bt['p99_ms'])} "
              f"| {f(bt['rejected'], '.0f')} | {f(tput)}x | {f(p99)}x |")
    print()


def do_neighbour(a: argparse.Namespace, raw: dict[str, Any]) -> None:
    runs: list[dict[str, Any]] = []
    for rep in range(a.reps):
        order = NEIGHBOUR_MODES if rep % 2 == 0 else NEIGHBOUR_MODES[::-1]
        for mode in order:
            r = spawn("neighbour", mode, a)
            r["rep"] = rep
            runs.append(r)
            c = r["critical"]
            extra = f"; batch {r['batch']['throughput']:.1f}/s" if "batch" in r else ""
            log(f"# rep {rep + 1} {mode}: critical {c['throughput']:.0f}/s p50 {f(c['p50_ms'])} "
                f"p99 {f(c['p99_ms'])}{extra}")
    raw["neighbour"] = runs
    print(f"### Noisy neighbour (critical model open loop {a.crit_rate:g} req/s; batch model closed "
          f"loop, 8 outstanding; torch default threads {runs[0]['torch_default_threads']})\n")
    print("| mode | critical req/s | critical p50 ms | critical p99 ms | p99 / solo p99 "
          "| p99 / solo-default p99 | batch model req/s | batch / unmanaged batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def by(rep: int, mode: str) -> dict[str, Any]:
        return next(r for r in runs if r["rep"] == rep and r["mode"] == mode)

    for mode in NEIGHBOUR_MODES:
        rs = [r for r in runs if r["mode"] == mode]
        ratio = med([by(rep, mode)["critical"]["p99_ms"] / by(rep, "solo")["critical"]["p99_ms"]
                     for rep in range(a.reps)])
        ratio_d = med([by(rep, mode)["critical"]["p99_ms"] / by(rep, "solo_default")["critical"]["p99_ms"]
                       for rep in range(a.reps)])
        batch = med([r["batch"]["throughput"] for r in rs]) if "batch" in rs[0] else None
        keep = (med([by(rep, mode)["batch"]["throughput"] / by(rep, "unmanaged")["batch"]["throughput"]
                     for rep in range(a.reps)]) if "batch" in rs[0] else None)
        print(f"| {mode.replace('_', ' ')} | {f(med([r['critical']['throughput'] for r in rs]), '.0f')} "
              f"| {f(med([r['critical']['p50_ms'] for r in rs]))} | {f(med([r['critical']['p99_ms'] for r in rs]))} "
              f"| {f(ratio)}x | {f(ratio_d)}x | {f(batch, '.1f')} | {f(keep)}{'x' if keep is not None else ''} |")
    print()


def do_replicas(a: argparse.Namespace, raw: dict[str, Any]) -> None:
    cap = spawn("replicas", "capacity", a)["capacity"]
    log(f"# replicas: capacity of 2 instances {cap:.0f}/s")
    runs: list[dict[str, Any]] = []
    for rep in range(a.reps):
        order = REPLICA_MODES if rep % 2 == 0 else REPLICA_MODES[::-1]
        for mode in order:
            r = spawn("replicas", mode, a, capacity=cap)
            r["rep"] = rep
            runs.append(r)
            log(f"# rep {rep + 1} {mode}: {r['throughput']:.0f}/s p50 {f(r['p50_ms'])} p99 {f(r['p99_ms'])}")
    raw["replicas"] = {"capacity": cap, "runs": runs}
    rate = runs[0]["rate"]
    print(f"### Replicas (capacity of two instances measured first: {cap:.0f} req/s; open loop "
          f"{rate:.0f} req/s = {a.util:g} of it)\n")
    print("| mode | req/s | p50 ms | p99 ms | rejected | p99 / one-queue p99 | generator lag p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in REPLICA_MODES:
        rs = [r for r in runs if r["mode"] == mode]
        ratio = med([next(r for r in runs if r["rep"] == rep and r["mode"] == mode)["p99_ms"]
                     / next(r for r in runs if r["rep"] == rep and r["mode"] == "one_queue")["p99_ms"]
                     for rep in range(a.reps)])
        label = "one queue, 2 instances" if mode == "one_queue" else "2 models, random routing"
        print(f"| {label} | {f(med([r['throughput'] for r in rs]), '.0f')} | {f(med([r['p50_ms'] for r in rs]))} "
              f"| {f(med([r['p99_ms'] for r in rs]))} | {f(med([r['rejected'] for r in rs]), '.0f')} | {f(ratio)}x "
              f"| {f(med([r['lag_p99_ms'] for r in rs]))} |")
    print()


def do_fairness(a: argparse.Namespace, raw: dict[str, Any]) -> None:
    runs: list[dict[str, Any]] = []
    for rep in range(a.reps):
        order = FAIRNESS_MODES if rep % 2 == 0 else FAIRNESS_MODES[::-1]
        for mode in order:
            r = spawn("fairness", mode, a)
            r["rep"] = rep
            runs.append(r)
            h, li = r["heavy"], r["light"]
            log(f"# rep {rep + 1} {mode}: heavy {h['completed']} calls {h['pool_time_s']:.2f} s pool, "
                f"light {li['completed']} calls {li['pool_time_s']:.2f} s pool")
    raw["fairness"] = runs
    target = WEIGHTS["heavy"] / (WEIGHTS["heavy"] + WEIGHTS["light"])
    print(f"### Weighted fairness (two backlogged copies of the critical MLP, 2 instances x 1 thread "
          f"each, closed loop 16 outstanding; weights {WEIGHTS['heavy']:g}:{WEIGHTS['light']:g}; "
          f"{a.windows} x {a.window:g} s measured)\n")
    print("| mode | heavy req/s | light req/s | heavy share of calls | heavy share of compute time "
          "| heavy share of pool time | pool-time ratio (target 3.0) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in FAIRNESS_MODES:
        rs = [r for r in runs if r["mode"] == mode]

        def share(key: str, r: dict[str, Any]) -> float | None:
            tot = r["heavy"][key] + r["light"][key]
            return r["heavy"][key] / tot if tot else None

        pool_ratio = med([r["heavy"]["pool_time_s"] / r["light"]["pool_time_s"]
                          for r in rs if r["light"]["pool_time_s"]])
        label = "scheduled pool, weights 3:1" if mode == "weighted" else "shared_pool='os' (no weights)"
        print(f"| {label} | {f(med([r['heavy']['completed'] / r['seconds'] for r in rs]), '.0f')} "
              f"| {f(med([r['light']['completed'] / r['seconds'] for r in rs]), '.0f')} "
              f"| {f(med([share('completed', r) for r in rs]), '.3f')} "
              f"| {f(med([share('compute_s', r) for r in rs]), '.3f')} "
              f"| {f(med([share('pool_time_s', r) for r in rs]), '.3f')} | {f(pool_ratio)} |")
    print(f"\nTarget share for weights 3:1: {target:.3f}; within 10% means a pool-time ratio in "
          f"[2.7, 3.3].\n")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("scenario", nargs="?", default="all", choices=("all", *SCENARIOS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of load discarded first")
    p.add_argument("--window", type=float, default=1.0, help="seconds per measurement window")
    p.add_argument("--windows", type=int, default=3, help="windows measured per point")
    p.add_argument("--loads", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 1.0, 1.5, 2.5],
                   help="batching: open-loop loads as fractions of the batch-1 capacity")
    p.add_argument("--crit-rate", type=float, default=250.0, help="neighbour: critical model's req/s")
    p.add_argument("--util", type=float, default=0.8, help="replicas: load as a fraction of capacity")
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="sys.setswitchinterval in every child, every mode (Python's default: 5)")
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--capacity", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        # The load generator shares the interpreter with the models' Python code (a torch
        # module's forward runs Python between kernels): a shorter GIL switch interval bounds
        # how long a worker waits for it (apportion demo uses the same 0.5 ms in every mode).
        sys.setswitchinterval(a.switch_interval_ms / 1000.0)
        scenario, mode = a.child.split(":")
        print(json.dumps(CHILDREN[scenario](mode, a)))
        return

    t0 = time.time()
    load0 = os.getloadavg()
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
          f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; {a.reps} repetitions "
          f"(cells: medians), each point {a.warmup:g} s warm-up + {a.windows} x {a.window:g} s; "
          f"GIL switch interval {a.switch_interval_ms:g} ms\n")
    raw: dict[str, Any] = {"machine": machine(), "args": {k: v for k, v in vars(a).items()}}
    todo = SCENARIOS if a.scenario == "all" else (a.scenario,)
    for s in todo:
        {"batching": do_batching, "neighbour": do_neighbour, "replicas": do_replicas,
         "fairness": do_fairness}[s](a, raw)
        sys.stdout.flush()
    load1 = os.getloadavg()
    print(f"elapsed {time.time() - t0:.0f} s; load average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(raw, fh, indent=2)


if __name__ == "__main__":
    main()
