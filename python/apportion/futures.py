"""``wait`` and ``as_completed`` for apportion futures, as concurrent.futures has them.

apportion.Future has the concurrent.futures.Future methods but is not a subclass (each one is a
thin native object), so ``concurrent.futures.wait`` does not accept it; these do, and accept
concurrent.futures futures too, mixed. Both are driven by done-callbacks, so nothing polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "DoneAndNotDone", "as_completed", "wait"]

FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"


class DoneAndNotDone(NamedTuple):
    done: set[Any]
    not_done: set[Any]


def _failed(f: Any) -> bool:
    return not f.cancelled() and f.exception(0) is not None


def wait(fs: Iterable[Any], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
    """Waits until ``return_when`` holds (FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED)
    or ``timeout`` seconds pass; returns the done and not-done futures, as
    ``concurrent.futures.wait`` does."""
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED, "
                         f"got {return_when!r}")
    fs = set(fs)
    cond = threading.Condition()
    finished: list[Any] = []

    def on_done(f: Any) -> None:
        with cond:
            finished.append(f)
            cond.notify_all()

    def satisfied() -> bool:
        if len(finished) == len(fs):
            return True
        if return_when == FIRST_COMPLETED:
            return bool(finished)
        if return_when == FIRST_EXCEPTION:
            return any(_failed(f) for f in finished)
        return False

    for f in fs:
        f.add_done_callback(on_done)
    with cond:
        cond.wait_for(satisfied, timeout)
        done = set(finished)
    return DoneAndNotDone(done, fs - done)


def as_completed(fs: Iterable[Any], timeout: float | None = None) -> Iterator[Any]:
    """Yields each future as it completes; raises TimeoutError if some are not done within
    ``timeout`` seconds of the call."""
    fs = set(fs)
    end = None if timeout is None else time.monotonic() + timeout
    cond = threading.Condition()
    finished: list[Any] = []

    def on_done(f: Any) -> None:
        with cond:
            finished.append(f)
            cond.notify_all()

    for f in fs:
        f.add_done_callback(on_done)
    yielded = 0
    while yielded < len(fs):
        with cond:
            remaining = None if end is None else end - time.monotonic()
            if not cond.wait_for(lambda: len(finished) > yielded,
                                 None if remaining is None else max(remaining, 0)):
                raise TimeoutError(f"{len(fs) - yielded} (of {len(fs)}) futures unfinished")
            batch = finished[yielded:]
        for f in batch:
            yielded += 1
            yield f
