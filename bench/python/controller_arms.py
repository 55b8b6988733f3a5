"""What the controller benches share (bench_controller_classes.py, bench_controller_busy.py):
the demo's after-shift measurement of the controller, with a subclass of it as one arm, and
how an arm's result is printed."""

from __future__ import annotations

from typing import Any

from apportion import demo
from apportion.tune import Settings, apply


def goodput(results: dict[str, Any]) -> float:
    """Goodput within SLO of a measurement, all models together."""
    return sum(m.goodput for m in results.values())


def measure_arm(controller: type, cfg: Any, new_mix: Any, choices: Any, settings: Settings,
                costs: Any) -> demo.Adapted:
    """``demo.measure_adaptive`` of ``choices`` across the demo's shift from ``cfg`` to
    ``new_mix``, with ``controller`` (a subclass of apportion.Controller) beside it."""
    base = demo.Controller
    demo.Controller = controller  # type: ignore[misc]
    try:
        return demo.measure_adaptive(apply(cfg, choices), apply(new_mix, choices), before_s=4.0,
                                     settings=settings, control_window_s=0.5, costs=costs)
    finally:
        demo.Controller = base  # type: ignore[misc]


def print_arm(label: str, run: demo.Adapted, demand: float, static: float) -> None:
    """One line for the arm (goodput, share of the new demand, ratio to the static plan), then
    the controller's moves."""
    g = goodput(run.results)
    print(f"  {label}: {g:6.0f} good/s ({g / demand:.0%}), {g / static:.2f}x static", flush=True)
    for line in run.describe():
        print(f"      {line[:220]}", flush=True)
