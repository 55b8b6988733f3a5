from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import apportion as ap


@pytest.fixture
def rt() -> Iterator[ap.Runtime]:
    runtime = ap.Runtime()
    try:
        yield runtime
    finally:
        runtime.close(drain=False)


class Gate:
    """A model that blocks until released: makes 'running' and 'queued' states deterministic."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[object] = []
        self._lock = threading.Lock()

    def __call__(self, x: object) -> object:
        with self._lock:
            self.calls.append(x)
        self.entered.set()
        assert self.release.wait(30), "gate never released"
        return x


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


class Tally:
    """Counts done-callbacks per future (every request must complete exactly once) and keeps
    the order in which tagged futures completed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: Counter[int] = Counter()
        self.order: list[Any] = []

    def watch(self, fut: ap.Future, tag: Any = None) -> ap.Future:
        key = id(fut)

        def cb(f: ap.Future) -> None:
            with self.lock:
                self.done[key] += 1
                if tag is not None:
                    self.order.append(tag)

        fut.add_done_callback(cb)
        return fut

    def check_once(self, futs: list[ap.Future], timeout: float = 60.0) -> None:
        for f in futs:
            f.exception(timeout=timeout)  # completed
        with self.lock:
            assert [self.done[id(f)] for f in futs] == [1] * len(futs)


@pytest.fixture
def tally() -> Tally:
    return Tally()
