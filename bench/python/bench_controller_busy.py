"""The controller after the demo's mix shift beside busy-loop processes: a larger share of the
"os" pool for a saturated model whose threads each use under ``target`` of a CPU, taken from the
CPU time other processes (the busy loops) keep busy in the pool, against the controller that
ignores it (``outside_cpus`` not given to ``decide``: the gate of CPU per thread alone), in one
run.

Each repetition calibrates and tunes the demo's models as ``apportion demo`` does (the tuner's
budget: ``--budget-s``), then measures after the shift (conv 20% -> 70%:
``controller_arms.SHIFT_SHARES``; 6 s of the new mix, then 3 windows of 1 s): the static tuned
plan, the controller as it is, and the controller that does not count the other processes' CPU
time. Both controllers get the tuner's cost models, as in the demo. ``--busy N`` starts N
busy-loop interpreters first (killed at the end; each ends on its own after ``--max-s``).

    python bench/python/bench_controller_busy.py [--reps 3] [--busy 1]

Prints per repetition each arm's goodput within SLO, its share of the new demand, its ratio to
the static plan, and the controller's moves after the shift. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import sys
from typing import Any

from apportion import demo
from controller_arms import tuned_ab


def arm(count_outside: bool) -> type:
    class Arm(demo.Controller):  # type: ignore[misc, valid-type]
        def decide(self, *args: Any, **kw: Any) -> Any:
            if not count_outside:
                kw["outside_cpus"] = None
            return super().decide(*args, **kw)

    return Arm


def main() -> int:
    return tuned_ab(__doc__.split("\n\n")[0], arm, ("outside=counted", "outside=ignored"))


if __name__ == "__main__":
    sys.exit(main())
