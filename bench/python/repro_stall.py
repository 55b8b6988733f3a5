"""Serves a config's models under its load for a few seconds, many times over, and counts the
runs in which a model stopped serving: it completed fewer requests than expired (issue 13,
item 5). Each run is a fresh interpreter, as ``apportion run CONFIG --duration 3 --json`` is.

    python bench/python/repro_stall.py PLAN.toml [--runs 20] [--duration 3] [--pause 0.2] [--load-between 0]

A run counts as stalled when a model completed fewer requests than expired, or fewer than half
of those submitted to it (issue 13: "no model serving under half its demand").

PLAN.toml: the demo's tuned plan (``apportion demo`` writes ``apportion-demo/tune/plan.toml``)
without ``warmup``. The stall showed on a machine with other load; run it beside some.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--pause", type=float, default=0.2, help="seconds between runs")
    p.add_argument("--load-between", type=float, default=0.0, metavar="S",
                   help="between runs, keep every CPU busy for S seconds (one busy-loop process per CPU)")
    a = p.parse_args()
    stalled_runs = 0
    for i in range(a.runs):
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-m", "apportion", "run", a.config, "--duration", str(a.duration),
                              "--json"], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        stats = json.loads(out.stdout)["stats"]
        counts = {m: (s["completed"], s["expired"]) for m, s in stats.items()}
        stalled = [m for m, s in stats.items() if s["completed"] < s["expired"] or 2 * s["completed"] < s["submitted"]]
        stalled_runs += bool(stalled)
        print(f"run {i + 1}: load {load:.1f}; completed/expired {counts}"
              f"{'; STALLED ' + ', '.join(stalled) if stalled else ''}", flush=True)
        if a.load_between > 0:
            burn = f"import time\nend = time.monotonic() + {a.load_between}\nwhile time.monotonic() < end: pass"
            procs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(os.cpu_count() or 1)]
            for proc in procs:
                proc.wait()
        time.sleep(a.pause)
    print(f"{stalled_runs} of {a.runs} runs had a model that completed fewer requests than expired or than "
          f"half of those submitted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
