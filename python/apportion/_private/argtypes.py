"""argparse types the command line shares."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .checks import finite_number


def _finite(kind: Callable[[str], Any], ok: Callable[[Any], bool], bound: str) -> Callable[[str], Any]:
    """An argparse type: a finite number of ``kind`` for which ``ok`` holds (``bound`` says
    which, as "> 0"); anything else is a usage error naming the option (exit 2)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (finite_number(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value
    return parse


def above_zero(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: a finite number of ``kind`` (int or float) > 0."""
    return _finite(kind, lambda v: v > 0, "> 0")


MAX_SECONDS = 1e9
"""The longest a seconds option may be (31 years): beyond it a sleep or a timeout overflows
the platform's time_t."""


seconds: Callable[[str], float] = _finite(float, lambda v: 0 < v <= MAX_SECONDS,
                                          f"> 0 and at most {MAX_SECONDS:g} (seconds)")
"""An argparse type: a number of seconds, a finite float in (0, MAX_SECONDS]."""


def at_least(low: float) -> Callable[[str], float]:
    """An argparse type: a finite float >= ``low``."""
    return _finite(float, lambda v: v >= low, f">= {low:g}")


def between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high]."""
    return _finite(float, lambda v: low <= v <= high, f"in [{low:g}, {high:g}]")


def in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an int in [low, high]; anything else is a usage error naming the
    option (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value
    return parse
