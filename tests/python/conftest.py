from __future__ import annotations

import threading
from collections.abc import Iterator

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
