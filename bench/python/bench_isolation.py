"""Two torch CPU models side by side: unmanaged (framework defaults, no pinning) vs isolated.

- **unmanaged**: what a user gets without apportion: each model served by its own
  ``concurrent.futures.ThreadPoolExecutor(max_workers=1)``, torch's default intra-op threads
  (one per CPU of the machine) in each, no pinning: both models' thread pools share every core.
- **isolated**: an ``apportion.Runtime`` with each model ``isolation="exclusive"``, ``cores=1``,
  ``threads=1``: each model's worker and threads on a core of its own.

Load is closed loop: one client per model keeps ``--outstanding`` requests in flight for
``--seconds``. Each (mode, repetition) runs in a fresh interpreter, so no mode inherits another's
thread pools or torch's process-global thread setting; modes alternate within a repetition.
Reports each model's throughput and latency percentiles, medians over the repetitions.

    python bench/python/bench_isolation.py [--seconds 5] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("unmanaged", "isolated")
MODELS = ("mlp", "convnet")


def build(name: str) -> tuple[Any, Any]:
    """The model and one request's input, built in code (nothing downloaded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 256))
        return model.eval(), torch.randn(64, 512)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )
    return model.eval(), torch.randn(4, 3, 32, 32)


def closed_loop(submit: Callable[[Any], Any], x: Any, seconds: float, outstanding: int,
                start: threading.Barrier, out: list[float]) -> None:
    """Keeps ``outstanding`` requests in flight until ``seconds`` pass; appends latencies (s)."""
    start.wait()
    end = time.perf_counter() + seconds
    inflight = [(time.perf_counter(), submit(x)) for _ in range(outstanding)]
    while inflight:
        t0, fut = inflight.pop(0)
        fut.result()
        now = time.perf_counter()
        out.append(now - t0)
        if now < end:
            inflight.append((now, submit(x)))


def run_mode(mode: str, seconds: float, outstanding: int) -> dict[str, Any]:
    import torch

    built = {name: build(name) for name in MODELS}
    closers: list[Callable[[], None]] = []
    submits: dict[str, Callable[[Any], Any]] = {}
    if mode == "unmanaged":
        for name, (model, _) in built.items():
            pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

            def call(x: Any, model: Any = model) -> Any:
                with torch.inference_mode():
                    return model(x)

            submits[name] = lambda x, pool=pool, call=call: pool.submit(call, x)
            closers.append(pool.shutdown)
    else:
        import apportion as ap

        rt = ap.Runtime()
        for name, (model, _) in built.items():
            rt.add_model(name, model=model, cores=1, isolation="exclusive", threads=1)
        rt.start()
        submits = {name: (lambda x, name=name: rt.submit(name, x)) for name in MODELS}
        closers.append(rt.close)

    try:
        for name in MODELS:  # warm-up: first calls allocate and start thread pools
            for _ in range(5):
                submits[name](built[name][1]).result()
        latencies: dict[str, list[float]] = {name: [] for name in MODELS}
        start = threading.Barrier(len(MODELS) + 1)
        clients = [threading.Thread(target=closed_loop,
                                    args=(submits[n], built[n][1], seconds, outstanding, start, latencies[n]))
                   for n in MODELS]
        for c in clients:
            c.start()
        start.wait()
        t0 = time.perf_counter()
        for c in clients:
            c.join()
        wall = time.perf_counter() - t0
    finally:
        for close in closers:
            close()

    result: dict[str, Any] = {"mode": mode, "torch_threads_default": torch.get_num_threads()}
    for name, lat in latencies.items():
        lat.sort()
        result[name] = {
            "n": len(lat),
            "throughput": len(lat) / wall,
            "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        }
    return result


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {len(os.sched_getaffinity(0))} usable CPUs"


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured load per mode and repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--outstanding", type=int, default=1, help="requests in flight per model")
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child run: one mode, JSON out
    args = p.parse_args()

    if args.one:
        print(json.dumps(run_mode(args.one, args.seconds, args.outstanding)))
        return

    here = str(Path(__file__).resolve())
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        # Alternate which mode goes first, so drift in machine load hits both alike.
        order = MODES if rep % 2 == 0 else MODES[::-1]
        for mode in order:
            out = subprocess.run([sys.executable, here, "--one", mode, "--seconds", str(args.seconds),
                                  "--outstanding", str(args.outstanding)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"the {mode} run failed:\n{out.stderr}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"# rep {rep + 1} {mode}: " + ", ".join(
                f"{m} {runs[-1][m]['throughput']:.0f}/s p99 {runs[-1][m]['p99_ms']:.2f} ms" for m in MODELS),
                file=sys.stderr)

    def med(mode: str, model: str, key: str) -> float:
        return statistics.median(r[model][key] for r in runs if r["mode"] == mode)

    load = os.getloadavg()
    print(f"machine: {machine()}; torch default threads {runs[0]['torch_threads_default']}; "
          f"{args.seconds:g} s closed loop, {args.outstanding} outstanding per model; "
          f"median of {args.reps} runs; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    print("| model | mode | throughput (req/s) | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|")
    for model in MODELS:
        for mode in MODES:
            print(f"| {model} | {mode} | {med(mode, model, 'throughput'):.0f} | "
                  f"{med(mode, model, 'p50_ms'):.2f} | {med(mode, model, 'p99_ms'):.2f} |")
    print()
    print("| model | isolated / unmanaged throughput | unmanaged / isolated p99 |")
    print("|---|---|---|")
    for model in MODELS:
        # Ratios per repetition (both modes measured back to back), then the median.
        by_rep = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
        pairs = [(a, b) if a["mode"] == "isolated" else (b, a) for a, b in by_rep]
        tput = statistics.median(iso[model]["throughput"] / un[model]["throughput"] for iso, un in pairs)
        p99 = statistics.median(un[model]["p99_ms"] / iso[model]["p99_ms"] for iso, un in pairs)
        print(f"| {model} | {tput:.2f}x | {p99:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "args": vars(args), "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
