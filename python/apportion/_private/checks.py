"""Checks of argument values that several modules share."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, TypeGuard


def finite_number(value: Any) -> TypeGuard[int | float]:
    """A real number (an int or a float, not a bool) that is neither NaN nor infinite; an int
    beyond every float counts as infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond every float
        return False


def real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (any ``numbers.Real``: numpy scalars too,
    not a bool), else None. An int beyond every float is +-inf, so that a range check refuses
    it instead of ``float()`` raising OverflowError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond every float
        return -math.inf if value < 0 else math.inf


ASYNC_MODEL = ("the runtime calls a model in its worker thread and would not await the coroutine it returns; "
               "give a plain function (inside it, run the coroutine with asyncio.run or on a loop of your own)")


def is_async_callable(obj: Any) -> bool:
    """Whether calling ``obj`` returns a coroutine: an ``async def`` function, or an object whose
    ``__call__`` is one."""
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(getattr(obj, "__call__", None))
