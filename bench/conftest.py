"""Shared pieces of the pytest-benchmark suite (``pytest bench/ --benchmark-only``).

Every benchmark sits in a ``group`` with the baseline it is compared with, both measured in the
same session; rounds and iterations are fixed so that the whole suite stays short on a 2-core
machine. The test suite (``python -m pytest``, testpaths = tests/python) never collects these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import apportion as ap

# One benchmark = ROUNDS timed rounds of ITERATIONS calls each (after one warm-up round).
ROUNDS = 15
ITERATIONS = 200


def noop(x: Any) -> Any:
    return x


def micro(benchmark: Any, fn: Callable[[], Any], *, rounds: int = ROUNDS, iterations: int = ITERATIONS) -> Any:
    """A bounded benchmark of ``fn`` (same shape for a subject and its baseline)."""
    return benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


@pytest.fixture(scope="module")
def noop_rt() -> Iterator[ap.Runtime]:
    rt = ap.Runtime()
    rt.add_model("noop", model=noop, max_queue=1 << 16)
    rt.start()
    try:
        yield rt
    finally:
        rt.close()
