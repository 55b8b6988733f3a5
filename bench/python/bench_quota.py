"""A container's CPU limit: workers on every allowed CPU against workers on ``ceil(quota)`` CPUs.

A cgroup CPU quota (``cpu.max``, ``cpu.cfs_quota_us``: what a container's CPU limit sets) lets
the process run on every allowed CPU but only for ``quota`` CPU-seconds per period; a process
that keeps more CPUs busy is stopped, all of it, until the period ends. ``apportion.topology()``
narrows the usable CPUs to ``ceil(quota)`` (see its module text); before, the runtime placed
its workers on every allowed CPU.

Each round runs in a fresh interpreter that first moves itself into a new cgroup with the
quota (``--quota`` CPUs per 100 ms period), then serves one model (``--instances`` instances
on the shared pool, one intra-op thread) to ``--clients`` closed-loop threads calling ``rt.call`` for ``--window`` seconds after a warm-up. ``--model``: *sha*
(default: SHA-256 of ``--kib`` KiB, pure CPU with the GIL released, so instances scale with
CPUs) or *mlp* (a torch MLP 256-1024-1024-256 on ``--rows`` rows). Modes, alternated:

- *every CPU*: ``Runtime(cpus=<every allowed CPU>)``, the placement before the quota was read;
- *quota*: ``Runtime()``, placed on ``ceil(quota)`` CPUs; the client threads run anywhere;
- *quota, pinned*: as *quota*, with the process (so the client threads too) first confined to
  ``ap.topology().usable``, as the README advises for an application's own busy threads.

Per round: completed req/s, p50 and p99 of the round trip, and the cgroup's own count of
throttled periods and throttled time over the window. Needs root and a writable cgroup with the
cpu controller (v1 or v2); says so and exits 2 otherwise.

    PYTHONPATH=python python bench/python/bench_quota.py [--quota 1.0] [--rounds 3]
        [--window 5] [--clients 8] [--instances 2] [--model sha|mlp] [--kib 1024] [--rows 64]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

PERIOD_US = 100_000


def cpu_cgroup_base() -> tuple[Path, bool] | None:
    """(a writable directory with the cpu controller under this process's cgroup, is v2)."""
    if os.geteuid() != 0:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            root = Path("/sys/fs/cgroup")
            if "cpu" not in (root / "cgroup.controllers").read_text(errors="ignore").split():
                continue
            base, v2 = root / group.lstrip("/"), True
        elif "cpu" in controllers.split(","):
            base, v2 = Path("/sys/fs/cgroup") / controllers / group.lstrip("/"), False
        else:
            continue
        if base.is_dir() and os.access(base, os.W_OK):
            return base, v2
    return None


def make_group(base: Path, v2: bool, quota: float) -> Path:
    group = base / f"apportion-bench-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    if v2:
        (group / "cpu.max").write_text(f"{int(quota * PERIOD_US)} {PERIOD_US}")
    else:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(int(quota * PERIOD_US)))
    return group


def throttled(group: Path) -> tuple[int, float]:
    """(throttled periods, throttled seconds) from the group's cpu.stat."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    if "throttled_usec" in stat:  # v2
        return int(stat["nr_throttled"]), int(stat["throttled_usec"]) / 1e6
    return int(stat["nr_throttled"]), int(stat["throttled_time"]) / 1e9


def child(args: argparse.Namespace) -> None:
    group = Path(args.group)
    (group / "cgroup.procs").write_text(str(os.getpid()))
    import apportion as ap

    every = sorted(os.sched_getaffinity(0))
    if args.mode == "pinned":
        os.sched_setaffinity(0, ap.topology().usable)  # before any thread: they inherit it
    rt = ap.Runtime(cpus=every) if args.mode == "every" else ap.Runtime()

    if args.model == "mlp":
        import torch

        torch.set_num_threads(1)

        def build(ctx: Any) -> Any:
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                       torch.nn.ReLU(), torch.nn.Linear(1024, 256)).eval()

        x: Any = torch.randn(args.rows, 256)
    else:
        def build(ctx: Any) -> Any:
            return lambda data: hashlib.sha256(data).digest()

        x = b"x" * (args.kib << 10)
    rt.add_model("mlp", build, instances=args.instances, threads=1, warmup=[x])
    cpus = sorted({c for m in rt.plan().models for c in m.cpus})
    with rt:
        stop = threading.Event()
        measuring = threading.Event()
        lat: list[list[float]] = [[] for _ in range(args.clients)]

        def client(i: int) -> None:
            mine = lat[i]
            while not stop.is_set():
                t0 = time.perf_counter()
                rt.call("mlp", x)
                if measuring.is_set():
                    mine.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.warmup)
        before = throttled(group)
        t0 = time.perf_counter()
        measuring.set()
        time.sleep(args.window)
        measuring.clear()
        elapsed = time.perf_counter() - t0
        after = throttled(group)
        stop.set()
        for t in threads:
            t.join()
    all_lat = sorted(v for mine in lat for v in mine)
    n = len(all_lat)
    print(json.dumps({
        "mode": args.mode, "cpus": cpus, "rps": n / elapsed,
        "p50_ms": all_lat[n // 2] * 1e3, "p99_ms": all_lat[min(n - 1, int(n * 0.99))] * 1e3,
        "throttled_periods": after[0] - before[0], "throttled_s": after[1] - before[1],
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quota", type=float, default=1.0, help="CPUs per period (default 1.0)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--model", choices=("sha", "mlp"), default="sha")
    p.add_argument("--kib", type=int, default=1024, help="sha: KiB hashed per request (default 1024)")
    p.add_argument("--rows", type=int, default=64, help="mlp: rows per request (default 64)")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=("every", "quota", "pinned"), dest="mode", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        child(args)
        return
    found = cpu_cgroup_base()
    if found is None:
        sys.exit("bench_quota: needs root and a writable cgroup with the cpu controller")
    base, v2 = found
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ("every", "quota", "pinned") if r % 2 == 0 else ("pinned", "quota", "every")
        for mode in order:
            group = make_group(base, v2, args.quota)
            try:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--group", str(group),
                     "--window", str(args.window), "--warmup", str(args.warmup),
                     "--clients", str(args.clients), "--instances", str(args.instances),
                     "--rows", str(args.rows), "--model", args.model, "--kib", str(args.kib)],
                    capture_output=True, text=True, timeout=120 + args.window, check=False)
            finally:
                for _ in range(50):
                    try:
                        group.rmdir()
                        break
                    except OSError:
                        time.sleep(0.1)
            if out.returncode != 0:
                sys.exit(f"bench_quota: round {r} {mode} failed:\n{out.stderr}")
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"round": r}
            rows.append(row)
            print(f"round {r} {mode:6s} cpus {row['cpus']}: {row['rps']:8.0f} req/s  p50 {row['p50_ms']:6.2f} ms"
                  f"  p99 {row['p99_ms']:7.2f} ms  throttled {row['throttled_periods']} periods,"
                  f" {row['throttled_s']:.2f} s", flush=True)
    print(f"\nquota {args.quota:g} CPUs of {len(os.sched_getaffinity(0))}, {args.model} ({args.kib} KiB / {args.rows} rows), "
          f"{args.clients} clients, "
          f"{args.instances} instances, {args.window:g} s windows, {args.rounds} rounds ({platform.node()})")
    med = {m: {k: statistics.median(r[k] for r in rows if r["mode"] == m)
               for k in ("rps", "p50_ms", "p99_ms", "throttled_periods", "throttled_s")}
           for m in ("every", "quota", "pinned")}
    print("| mode | req/s | p50 ms | p99 ms | throttled periods | throttled s |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, name in (("every", "every allowed CPU"), ("quota", "ceil(quota) CPUs"),
                    ("pinned", "ceil(quota) CPUs, clients pinned there too")):
        d = med[m]
        print(f"| {name} | {d['rps']:.0f} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | "
              f"{d['throttled_periods']:.0f} | {d['throttled_s']:.2f} |")
    for m in ("quota", "pinned"):
        print(f"{m} / every: throughput {med[m]['rps'] / med['every']['rps']:.2f}x, "
              f"p99 {med[m]['p99_ms'] / med['every']['p99_ms']:.2f}x (medians)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "medians": med}, indent=2))


if __name__ == "__main__":
    main()
