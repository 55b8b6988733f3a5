"""The tuner's progress display (optional: imported only when a tune run shows progress)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on a stream (stderr by default); silent when disabled."""

    def __init__(self, stream: TextIO | None, budget_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.budget_s, self.clock = stream, budget_s, clock
        self.t0 = clock()

    def __call__(self, what: str) -> None:
        if self.stream is None:
            return
        spent = self.clock() - self.t0
        frac = min(1.0, spent / self.budget_s) if self.budget_s > 0 else 1.0
        bar = "#" * int(frac * 24)
        self.stream.write(f"\rtune [{bar:<24}] {spent:5.1f}/{self.budget_s:.0f}s {what[:60]:<60}")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
