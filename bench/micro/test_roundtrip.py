"""No-op round trip and throughput: apportion against the stdlib's thread hand-offs.

Groups: ``round trip`` (one request, then wait for it) and ``throughput`` (BATCH requests
submitted, then all collected); every group holds apportion and the baselines a user would
otherwise pick (concurrent.futures.ThreadPoolExecutor; a worker thread behind queue.Queue).
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import apportion as ap

from ..conftest import micro, noop

BATCH = 1000


class QueueWorker:
    """The hand-rolled baseline: one thread serving a queue.Queue, answering on another."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (x := self.inbox.get()) is not StopIteration:
            self.outbox.put(noop(x))

    def call(self, x: Any) -> Any:
        self.inbox.put(x)
        return self.outbox.get()

    def close(self) -> None:
        self.inbox.put(StopIteration)
        self.thread.join()


@pytest.fixture(scope="module")
def pool() -> Iterator[cf.ThreadPoolExecutor]:
    with cf.ThreadPoolExecutor(max_workers=1) as p:
        yield p


@pytest.fixture(scope="module")
def worker() -> Iterator[QueueWorker]:
    w = QueueWorker()
    yield w
    w.close()


@pytest.mark.benchmark(group="round trip")
def test_apportion_submit_result(benchmark: Any, noop_rt: ap.Runtime) -> None:
    assert micro(benchmark, lambda: noop_rt.submit("noop", 1).result()) == 1


@pytest.mark.benchmark(group="round trip")
def test_apportion_call(benchmark: Any, noop_rt: ap.Runtime) -> None:
    assert micro(benchmark, lambda: noop_rt.call("noop", 1)) == 1


@pytest.mark.benchmark(group="round trip")
def test_baseline_threadpoolexecutor(benchmark: Any, pool: cf.ThreadPoolExecutor) -> None:
    assert micro(benchmark, lambda: pool.submit(noop, 1).result()) == 1


@pytest.mark.benchmark(group="round trip")
def test_baseline_queue_queue_thread(benchmark: Any, worker: QueueWorker) -> None:
    assert micro(benchmark, lambda: worker.call(1)) == 1


def _collect(futs: list[Any]) -> int:
    for f in futs:
        f.result()
    return len(futs)


@pytest.mark.benchmark(group=f"throughput ({BATCH} no-op requests)")
def test_apportion_submit_batch(benchmark: Any, noop_rt: ap.Runtime) -> None:
    run = lambda: _collect([noop_rt.submit("noop", i) for i in range(BATCH)])  # noqa: E731
    assert micro(benchmark, run, rounds=10, iterations=1) == BATCH


@pytest.mark.benchmark(group=f"throughput ({BATCH} no-op requests)")
def test_apportion_submit_many(benchmark: Any, noop_rt: ap.Runtime) -> None:
    run = lambda: _collect(noop_rt.submit_many("noop", range(BATCH)))  # noqa: E731
    assert micro(benchmark, run, rounds=10, iterations=1) == BATCH


@pytest.mark.benchmark(group=f"throughput ({BATCH} no-op requests)")
def test_baseline_threadpoolexecutor_batch(benchmark: Any, pool: cf.ThreadPoolExecutor) -> None:
    run = lambda: _collect([pool.submit(noop, i) for i in range(BATCH)])  # noqa: E731
    assert micro(benchmark, run, rounds=10, iterations=1) == BATCH
