"""Two models that only sleep (a known service time): factories for examples and tests.

``slow`` takes 4 ms per call, ``fast`` 1 ms; both return their input (also for a batch: the
list of inputs), and sleeping releases the GIL, so instances run in parallel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def _sleeping(ms: float) -> Callable[[Any], Any]:
    def serve(x: Any) -> Any:
        time.sleep(ms / 1000.0)
        return x

    return serve


def slow(ctx: Any) -> Callable[[Any], Any]:
    return _sleeping(4.0)


def fast(ctx: Any) -> Callable[[Any], Any]:
    return _sleeping(1.0)
