"""Checks of argument values that several modules share."""

from __future__ import annotations

import math
from typing import Any


def finite_number(value: Any) -> bool:
    """A real number (an int or a float, not a bool) that is neither NaN nor infinite; an int
    beyond every float counts as infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond every float
        return False
