"""The controller's trials beside busy-loop processes: verdicts that allow for the windows' own
spread and holds that the load's moving lifts, against verdicts and holds without either, in
one run.

Beside a busy loop the share of arrivals served within SLO moves from window to window by
itself, and a move judged on a fall within that spread was undone and held for ``tabu_s``
(30 s, longer than the demo's measurement). A move undone before the shift held the model after
it too, when the new mix wanted the very move. Each repetition calibrates and tunes the demo's
models as ``apportion demo`` does (the tuner's budget: ``--budget-s``), then measures the tuned
plan across the demo's default shift as the demo does (the old mix, the shift, 6 s of the new
mix, then 3 windows of 1 s): the static plan, the controller as it is, and the controller whose
verdict needs only a fall beyond ``tolerance`` and whose holds last ``tabu_s`` whatever the load
does. Both controllers get the tuner's cost models, as in the demo. ``--busy N`` starts N
busy-loop interpreters first (killed at the end; each ends on its own after ``--max-s``).

    python bench/python/bench_controller_noise.py [--reps 4] [--busy 1]

Prints per repetition each arm's goodput within SLO, its share of the new demand, its ratio to
the static plan, and the controller's moves (undone ones among them). Results: bench/RESULTS.md.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from apportion import controller as ctl
from apportion import demo
from controller_arms import tuned_ab


def arm(noise_aware: bool) -> type:
    class Arm(demo.Controller):  # type: ignore[misc, valid-type]
        def lift_stale(self) -> Any:
            return super().lift_stale() if noise_aware else []

        def verdict(self, *args: Any, **kw: Any) -> Any:
            if noise_aware:
                return super().verdict(*args, **kw)
            kept = ctl.SPREAD_MIN_ARRIVALS
            ctl.SPREAD_MIN_ARRIVALS = math.inf  # no window counts toward the spread: it is 0
            try:
                return super().verdict(*args, **kw)
            finally:
                ctl.SPREAD_MIN_ARRIVALS = kept

    return Arm


def main() -> int:
    return tuned_ab(__doc__.split("\n\n")[0], arm, ("spread+lift", "strict     "), demo.SHIFTED_SHARES, reps=4)


if __name__ == "__main__":
    sys.exit(main())
