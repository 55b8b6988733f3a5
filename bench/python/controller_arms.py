"""What the controller benches share (bench_controller_classes.py, bench_controller_busy.py):
the demo's models after its mix shift, measured as ``apportion demo`` measures them, with a
subclass of the controller as one arm, and how an arm's result is printed."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from apportion import demo
from apportion.config import Config
from apportion.tune import Settings

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
