"""Consecutive `apportion demo` runs, as a user runs them, optionally beside busy-loop processes;
one Markdown row per run against the done-when targets (tuned meets every SLO for the requests
it admits, goodput >= 1.3x unmanaged and >= 1.15x equal split), with the CPUs the hypervisor
took from this machine during the run (steal time, mean over the run; /proc/stat).

    python bench/python/bench_demo_runs.py [--runs 5] [--busy 0] [--out DIR] [-- DEMO ARGS...]

Each run is a fresh `python -m apportion demo --quiet --out DIR/runN` process; its full output
is kept in DIR/runN.txt (the tuner's report in DIR/runN/tune/report.md). ``--busy N`` starts N
`while True: pass` interpreters before the first run and kills them after the last (they end on
their own after --max-s at the latest).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = ("unmanaged", "equal split", "tuned")


def parse(text: str) -> dict[str, dict[str, tuple[float, str]]]:
    """{mode: {model: (goodput, met)}} from the demo's table ("TOTAL" included)."""
    out: dict[str, dict[str, tuple[float, str]]] = {}
    for line in text.splitlines():
        mode = next((m for m in MODES if line.startswith(m + " ")), None)
        if mode is None:
            continue
        cells = line[len(mode):].split()
        if len(cells) < 5 or cells[0].endswith(":"):
            continue  # the ratio line ("tuned goodput: ...")
        model, good, met = cells[0], float(cells[3]), cells[-1]
        out.setdefault(mode, {})[model] = (good, met)
    return out


def busy(n: int, max_s: float) -> list[subprocess.Popen[bytes]]:
    code = f"import time\nend = time.monotonic() + {max_s}\nwhile time.monotonic() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def steal_s() -> float:
    """Steal seconds of this process's CPUs so far (0 where /proc/stat cannot be read)."""
    from apportion._private.cputime import cpus_busy_and_steal_s

    both = cpus_busy_and_steal_s(os.sched_getaffinity(0))
    return both[1] if both else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the runs")
    p.add_argument("--out", default="/tmp/apportion-demo-runs")
    p.add_argument("--max-s", type=float, default=1800.0, help="busy loops end by themselves after this")
    p.add_argument("demo_args", nargs="*", help="passed to `apportion demo` (after --)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = busy(args.busy, args.max_s)
    rows = []
    try:
        time.sleep(0.5 if procs else 0.0)
        for i in range(1, args.runs + 1):
            t0 = time.strftime("%H:%M:%S", time.gmtime())
            load = os.getloadavg()[0]
            s0, w0 = steal_s(), time.monotonic()
            r = subprocess.run([sys.executable, "-m", "apportion", "demo", "--quiet", "--out", str(out / f"run{i}"),
                                *args.demo_args], capture_output=True, text=True, timeout=900)
            stolen = (steal_s() - s0) / max(time.monotonic() - w0, 1e-9)
            (out / f"run{i}.txt").write_text(r.stdout + r.stderr)
            res = parse(r.stdout)
            if r.returncode != 0 or set(res) != set(MODES):
                rows.append(f"| {i} | {t0} | {load:.1f} | {stolen:.2f} | failed (exit {r.returncode}; see {out / f'run{i}.txt'}) |")
                continue
            demand = next((line.split("req/s in total")[0].split()[-1] for line in r.stdout.splitlines()
                           if "req/s in total" in line), "?")
            tuner = next((line[len("tuner: "):] for line in r.stdout.splitlines() if line.startswith("tuner: ")), "")
            total = {m: res[m]["TOTAL"][0] for m in MODES}
            met = {m: sum(v[1] == "yes" for k, v in res[m].items() if k != "TOTAL") for m in MODES}
            n = len(res["tuned"]) - 1
            ratio_u = total["tuned"] / total["unmanaged"] if total["unmanaged"] else float("inf")
            ratio_e = total["tuned"] / total["equal split"] if total["equal split"] else float("inf")
            ok = met["tuned"] == n and ratio_u >= 1.3 and ratio_e >= 1.15
            conf = tuner.split("confidence ")[1].split(".")[0] if "confidence " in tuner else "?"
            if "other processes kept " in tuner:
                conf += ", others " + tuner.split("other processes kept ")[1].split(" CPUs")[0]
            rows.append(f"| {i} | {t0} | {load:.1f} | {stolen:.2f} | {demand} | {total['unmanaged']:.0f} ({met['unmanaged']} of {n}) "
                        f"| {total['equal split']:.0f} ({met['equal split']} of {n}) | {total['tuned']:.0f} "
                        f"({met['tuned']} of {n}) | {ratio_u:.2f}x | {ratio_e:.2f}x | {conf} | "
                        f"{'yes' if ok else 'no'} |")
            print(rows[-1], file=sys.stderr, flush=True)  # progress; the table goes to stdout
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    print("\n| run | start UTC | load avg | steal CPUs | demand req/s | unmanaged good/s (SLOs met) | equal split good/s (SLOs "
          "met) | tuned good/s (SLOs met) | tuned / unmanaged | tuned / equal | tuner confidence, others' busy CPUs "
          "| target met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
