"""What the controller benches share (bench_controller_classes.py, bench_controller_busy.py,
bench_controller_noise.py): the demo's models after its mix shift, measured as ``apportion
demo`` measures them, with a subclass of the controller as one arm, how an arm's result is
printed, and the A/B run of two arms of the tuned plan beside busy loops."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from apportion import demo
from apportion.config import Config
from apportion.tune import Settings, apply, measure_config, tune
from bench_demo_runs import busy

SHIFT_SHARES = {"mlp": 0.10, "conv": 0.70, "encoder": 0.20}
"""The mix after the shift these benches measure: conv 20% -> 70% (the demo's default until
it moved to 85%; bench/RESULTS.md's figures for these benches are at this mix)."""


@dataclass(frozen=True)
class Shift:
    """One calibration of the demo's models: the load before the shift and after it, the new
    demand (requests/s), and the settings the demo measures the after-shift rows with."""

    ms: dict[str, float]
    cfg: Config
    new_mix: Config
    demand: float
    settings: Settings

    @classmethod
    def calibrated(cls, shares: dict[str, float] | None = None) -> Shift:
        """Calibrates the demo's models; the mix after the shift is ``shares`` (default
        SHIFT_SHARES)."""
        ms = demo.single_thread_ms()
        cfg = demo.demo_config(1.0, per_request_ms=ms)
        new_mix = demo.shifted(cfg, shares or SHIFT_SHARES)
        demand = sum(v for v in new_mix.demand().values() if v is not None)
        return cls(ms, cfg, new_mix, demand, demo.after_shift_settings(demo.MODE_SETTINGS))

    def describe(self) -> str:
        return ("one request on one thread: " + ", ".join(f"{n} {v:.2f} ms" for n, v in self.ms.items())
                + f"; new demand {self.demand:.0f} req/s")


@contextlib.contextmanager
def demo_switch_interval() -> Iterator[None]:
    """The interpreter's switch interval as ``apportion demo`` sets it, while inside."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(demo.SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def goodput(results: dict[str, Any]) -> float:
    """Goodput within SLO of a measurement, all models together."""
    return sum(m.goodput for m in results.values())


def measure_arm(controller: type, shift: Shift, choices: Any, costs: Any) -> demo.Adapted:
    """The demo's measurement of ``choices`` across the shift, with ``controller`` (a subclass
    of apportion.Controller) beside it."""
    base = demo.Controller
    demo.Controller = controller  # type: ignore[misc, assignment]
    try:
        return demo.measure_shift(shift.cfg, shift.new_mix, choices, shift.settings, costs)
    finally:
        demo.Controller = base  # type: ignore[misc]


def print_arm(label: str, run: demo.Adapted, demand: float, static: float) -> None:
    """One line for the arm (goodput, share of the new demand, ratio to the static plan), then
    the controller's moves."""
    g = goodput(run.results)
    print(f"  {label}: {g:6.0f} good/s ({g / demand:.0%}), {g / static:.2f}x static", flush=True)
    for line in run.describe():
        print(f"      {line[:220]}", flush=True)


def tuned_ab(description: str, arm: Callable[[bool], type], labels: tuple[str, str],
             shares: dict[str, float] | None = None, reps: int = 3) -> int:
    """The command line of an A/B bench of the tuned plan: per repetition (``--reps``) the
    demo's models calibrated and tuned (``--budget-s``), the static plan measured after the
    shift to ``shares`` (default SHIFT_SHARES), then ``arm(True)`` and ``arm(False)``, each first
    in turn, labelled ``labels``; all beside ``--busy`` busy-loop processes (each ends on its own
    after ``--max-s``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the runs (default 1)")
    p.add_argument("--budget-s", type=float, default=60.0, help="the tuner's budget (default 60, as the demo)")
    p.add_argument("--max-s", type=float, default=1800.0, help="a busy loop ends on its own after this")
    args = p.parse_args()
    loops = busy(args.busy, args.max_s)
    try:
        with demo_switch_interval():
            for rep in range(1, args.reps + 1):
                shift = Shift.calibrated(shares)
                result = tune(shift.cfg, budget_s=args.budget_s, progress=False)
                choices = result.winner.choices
                static = goodput(measure_config(apply(shift.new_mix, choices), shift.settings))
                print(f"rep {rep} ({args.busy} busy): {shift.describe()}; tuned: "
                      + "; ".join(f"{n}: {c.describe()}" for n, c in choices.items()), flush=True)
                print(f"  static:                  {static:6.0f} good/s ({static / shift.demand:.0%})", flush=True)
                for on in ((True, False) if rep % 2 else (False, True)):  # each first in turn
                    run = measure_arm(arm(on), shift, choices, result.costs)
                    print_arm(f"controller {labels[0] if on else labels[1]}", run, shift.demand, static)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    return 0
