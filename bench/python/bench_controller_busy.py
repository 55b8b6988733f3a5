"""The controller after the demo's mix shift beside busy-loop processes: a larger share of the
"os" pool for a saturated model whose threads each use under ``target`` of a CPU, taken from the
CPU time other processes (the busy loops) keep busy in the pool, against the controller that
ignores it (``outside_cpus`` not given to ``decide``: the gate of CPU per thread alone), in one
run.

Each repetition calibrates and tunes the demo's models as ``apportion demo`` does (the tuner's
budget: ``--budget-s``), then measures after the shift (conv 20% -> 70%:
``controller_arms.SHIFT_SHARES``; 6 s of the new mix, then 3 windows of 1 s): the static tuned plan, the controller as it is, and the controller that
does not count the other processes' CPU time. Both controllers get the tuner's cost models, as in the
demo. ``--busy N`` starts N busy-loop interpreters first (killed at the end; each ends on its
own after ``--max-s``).

    python bench/python/bench_controller_busy.py [--reps 3] [--busy 1]

Prints per repetition each arm's goodput within SLO, its share of the new demand, its ratio to
the static plan, and the controller's moves after the shift. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from apportion import demo
from apportion.tune import apply, measure_config, tune
from bench_demo_runs import busy
from controller_arms import Shift, demo_switch_interval, goodput, measure_arm, print_arm


def arm(count_outside: bool) -> type:
    class Arm(demo.Controller):  # type: ignore[misc, valid-type]
        def decide(self, *args: Any, **kw: Any) -> Any:
            if not count_outside:
                kw["outside_cpus"] = None
            return super().decide(*args, **kw)

    return Arm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the runs (default 1)")
    p.add_argument("--budget-s", type=float, default=60.0, help="the tuner's budget (default 60, as the demo)")
    p.add_argument("--max-s", type=float, default=1800.0, help="a busy loop ends on its own after this")
    args = p.parse_args()
    loops = busy(args.busy, args.max_s)
    try:
        with demo_switch_interval():
            for rep in range(1, args.reps + 1):
                shift = Shift.calibrated()
                result = tune(shift.cfg, budget_s=args.budget_s, progress=False)
                choices = result.winner.choices
                static = goodput(measure_config(apply(shift.new_mix, choices), shift.settings))
                print(f"rep {rep} ({args.busy} busy): {shift.describe()}; tuned: "
                      + "; ".join(f"{n}: {c.describe()}" for n, c in choices.items()), flush=True)
                print(f"  static:                  {static:6.0f} good/s ({static / shift.demand:.0%})", flush=True)
                for count in ((True, False) if rep % 2 else (False, True)):  # each first in turn
                    run = measure_arm(arm(count), shift, choices, result.costs)
                    print_arm(f"controller outside={'counted' if count else 'ignored'}", run, shift.demand, static)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
