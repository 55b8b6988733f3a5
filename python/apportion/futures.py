"""apportion futures among the standard library's: ``await``, ``asyncio.wrap_future``,
``concurrent.futures.wait`` and ``as_completed``; and ``wait``/``as_completed`` of our own.

An apportion.Future is a thin native object with the concurrent.futures.Future methods. It
passes ``isinstance(fut, concurrent.futures.Future)`` (it reports :class:`StdlibFuture`, a
subclass, as its ``__class__``), and carries the state the standard library's ``wait`` and
``as_completed`` use, made on first use only: a future that never meets them costs nothing
extra. ``await fut`` works in a coroutine (cancelling the awaiting task cancels a request that
is still queued). :func:`wait` and :func:`as_completed` below do the same as the standard
library's, driven by done-callbacks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
import typing
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from . import _core
from .errors import RequestCancelled

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "DoneAndNotDone", "as_completed", "wait"]

FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"


class DoneAndNotDone(NamedTuple):
    done: set[Any]
    not_done: set[Any]


def _failed(f: Any) -> bool:
    return not f.cancelled() and f.exception(0) is not None


def _refuse_own_wait(f: Any) -> None:
    """Raises, as ``result()`` does, when a wait for ``f`` (not done) could not end:
    ApportionError when the calling thread is a worker of the model of ``f`` (or a
    done-callback it runs): only a worker of that model can complete it, and with one instance
    that worker is the one waiting; RuntimeClosed in a process forked since ``f`` was submitted,
    where no worker exists to complete it."""
    if isinstance(f, _core.Future):
        f._refuse_own_wait()


def wait(fs: Iterable[Any], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
    """Waits until ``return_when`` holds (FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED)
    or ``timeout`` seconds pass; returns the done and not-done futures, as
    ``concurrent.futures.wait`` does."""
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED, "
                         f"got {return_when!r}")
    fs = set(fs)
    for f in fs:
        _refuse_own_wait(f)
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
    for f in fs:
        _refuse_own_wait(f)
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


# -- the standard library's view ------------------------------------------------------------------

class StdlibFuture(cf.Future):  # type: ignore[type-arg]
    """What an apportion.Future reports as its ``__class__``, so that ``isinstance(fut,
    concurrent.futures.Future)`` holds and the standard library accepts it. Never instantiated
    by apportion (``type(fut)`` is ``apportion.Future``)."""


class _Interop:
    """What the standard library's waits keep on a future (``_condition``, ``_waiters``), and
    whether the waiters were told of its completion."""

    __slots__ = ("condition", "waiters", "notified")

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.waiters: list[Any] = []
        self.notified = False


def _notify_stdlib_waiters(f: Any) -> None:
    # Done-callback: tells the waiters that concurrent.futures.wait/as_completed installed, as
    # concurrent.futures.Future does when it completes.
    state = f._interop
    with state.condition:
        state.notified = True
        for waiter in list(state.waiters):
            if f.cancelled():
                waiter.add_cancelled(f)
            elif f.exception(0) is not None:
                waiter.add_exception(f)
            else:
                waiter.add_result(f)
        state.condition.notify_all()


def _stdlib_state(f: Any) -> _Interop:
    state = f._interop
    if state is None:
        fresh = _Interop()
        state = f._interop_setdefault(fresh)  # one winner if two threads get here at once
        if state is fresh:
            # Registered before any waiter can be installed: the standard library checks the
            # state under the condition, then installs its waiter; a completion in between
            # notifies under the same condition, after the waiter is in.
            f.add_done_callback(_notify_stdlib_waiters)
    return state  # type: ignore[no-any-return]


def _stdlib_status(f: Any) -> str:
    if not f.done():
        return cf._base.RUNNING if f.running() else cf._base.PENDING  # type: ignore[attr-defined]
    state = f._interop
    if state is not None and not state.notified:
        # Done, but its callbacks (the waiters' notice among them) have not all run: a wait
        # that counted it finished now and installed its waiter would count it again when the
        # notice comes, and return before the others are done.
        return cf._base.RUNNING  # type: ignore[attr-defined]
    return cf._base.CANCELLED_AND_NOTIFIED if f.cancelled() else cf._base.FINISHED  # type: ignore[attr-defined]


def on_loop(f: Any, loop: asyncio.AbstractEventLoop, model: str | None = None) -> asyncio.Future[Any]:
    """An asyncio future of ``loop`` that ends as the apportion future ``f`` does, settled on
    the loop's thread (the worker that completes ``f`` only hands it over). A model's
    StopIteration becomes a RuntimeError, as for a coroutine that raises it: asyncio futures
    refuse StopIteration (asyncio.wrap_future's callback fails on it and the awaiter waits
    for ever). A cancelled ``f`` raises RequestCancelled: asyncio.CancelledError would read
    as the awaiting task's own cancellation (a TaskGroup drops such a task silently). Raises
    ApportionError at once, as ``result()`` does, on a worker of ``f``'s own model (a loop run
    inside the model): only that worker could complete it."""
    _refuse_own_wait(f)
    waiter = loop.create_future()

    def transfer(done: Any) -> None:
        if waiter.done():
            return
        if done.cancelled():
            whose = f"model {model!r}: the request" if model is not None else "the request"
            waiter.set_exception(RequestCancelled(
                f"{whose} was cancelled before it ran (Future.cancel(), or the model removed or the runtime "
                "closed without draining, or the model failed to start)"))
            return
        exc = done.exception()
        if exc is None:
            waiter.set_result(done.result())
        elif isinstance(exc, StopIteration):
            err = RuntimeError(f"model {model!r} raised StopIteration" if model is not None
                               else "the model raised StopIteration")
            err.__cause__ = exc
            waiter.set_exception(err)
        else:
            waiter.set_exception(exc)

    def on_done(done: Any) -> None:
        # Runs in the worker thread: hand over to the loop's thread, never touch it here.
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(transfer, done)
            except RuntimeError:  # loop closed between the check and the call
                pass

    f.add_done_callback(on_done)
    return waiter


def _await(f: Any) -> typing.Generator[Any, None, Any]:
    waiter = on_loop(f, asyncio.get_running_loop(), f.model)
    try:
        return (yield from waiter.__await__())
    except asyncio.CancelledError:
        f.cancel()  # the awaiting task was cancelled: a queued request is never run
        raise


# concurrent.futures.wait/as_completed take the condition first, before they block on the
# future: a wait on the model's own request is refused there. (No return type, as the lambda
# below: the module's generated stubs show none; tools/stub_overrides.py types the properties
# as concurrent.futures.Future declares them, hence the ignores.)
def _stdlib_condition(f: Any):
    _refuse_own_wait(f)
    return _stdlib_state(f).condition


_core.Future._condition = property(_stdlib_condition)  # type: ignore[assignment]
_core.Future._waiters = property(lambda f: _stdlib_state(f).waiters)  # type: ignore[assignment]
_core.Future._state = property(_stdlib_status)  # type: ignore[assignment]
_core.Future.__await__ = _await  # type: ignore[method-assign, assignment]
_core._set_future_class(StdlibFuture)
