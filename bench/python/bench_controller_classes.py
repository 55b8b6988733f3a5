"""The controller after the demo's mix shift on a plan with priority classes (scheduled pool):
with and without class moves (``Controller(classes=...)``), against the static plan, in one run.

The plan is the kind the tuner picks in about one run in ten: the demo's three models on the
scheduled shared pool, one instance of one thread each, batches of up to 8, conv in the top
class (2), mlp in class 1, encoder in class 0. After the shift (conv 20% -> 70%:
``controller_arms.SHIFT_SHARES``) conv needs more than the one unit its instance holds, and
another instance in its class would hold every unit and starve the classes below it. Each
repetition measures, after the shift as ``apportion demo`` does (6 s of the new mix, then 3
windows of 1 s): the static plan, the controller with
``classes=True`` (it may move conv into a lower class with an instance more) and with
``classes=False``. The controller is given a cost model for conv (alpha 0.41 ms, beta 0.9 ms a
request, fitted to its calibrated one-request and batch-8 times), as the demo gives it the
tuner's, so it makes no batching move that saves conv little.

    python bench/python/bench_controller_classes.py [--reps 3]

Prints per repetition each arm's goodput within SLO, its share of the new demand and its ratio
to the static plan, and the controller's moves after the shift. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import apportion as ap
from apportion import demo
from apportion.tune import Choice, CostModel, apply, measure_config
from controller_arms import Shift, demo_switch_interval, goodput, measure_arm, print_arm


def plan() -> dict[str, Choice]:
    b = ap.Batching
    return {"mlp": Choice("shared", None, 1, 1, b(8, 4.0), 19, 1),
            "conv": Choice("shared", None, 1, 1, b(8, 3.1), 17, 2),
            "encoder": Choice("shared", None, 1, 1, b(8, 2.2), 20, 0)}


def arm(classes: bool) -> type:
    class Arm(demo.Controller):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kw: Any) -> None:
            kw["classes"] = classes
            super().__init__(*args, **kw)

    return Arm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    with demo_switch_interval():
        for rep in range(1, args.reps + 1):
            shift = Shift.calibrated()
            static = goodput(measure_config(apply(shift.new_mix, plan()), shift.settings))
            print(f"rep {rep}: {shift.describe()}", flush=True)
            print(f"  static:                {static:6.0f} good/s ({static / shift.demand:.0%})", flush=True)
            for classes in (True, False):
                run = measure_arm(arm(classes), shift, plan(), {"conv": CostModel(0.41, 0.9)})
                print_arm(f"controller classes={classes!s:5}", run, shift.demand, static)
    return 0


if __name__ == "__main__":
    sys.exit(main())
