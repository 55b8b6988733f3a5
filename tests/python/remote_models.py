"""Factories for the models `apportion serve` serves in the load-over-the-network tests."""

from __future__ import annotations

import time
from typing import Any


def slow(ctx: Any) -> Any:
    """20 ms per call: long enough for queued requests with a 1 ms deadline to expire."""
    def call(x: Any) -> Any:
        time.sleep(0.02)
        return x

    return call


def sleepy(ctx: Any) -> Any:
    """2 s per call: longer than the tests' client-side request timeout."""
    def call(x: Any) -> Any:
        time.sleep(2.0)
        return x

    return call


def fails(ctx: Any) -> Any:
    def call(x: Any) -> Any:
        raise ValueError("boom")

    return call


def pair() -> dict[str, Any]:
    """One request's inputs for the two-input model, as a mapping of name to array."""
    import numpy as np

    return {"a": np.arange(3, dtype=np.int32), "b": np.ones(3, dtype=np.float64)}


def adder(ctx: Any) -> Any:
    """Two inputs, a (INT32) and b (FP32), summed."""
    return lambda inputs: {"sum": inputs["a"].astype("float32") + inputs["b"]}


def vector() -> Any:
    import numpy as np

    return np.arange(4, dtype=np.float32)
