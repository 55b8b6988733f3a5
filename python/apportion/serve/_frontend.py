"""What the HTTP and gRPC fronts share: the models' signatures, health, request parameters,
submission and the error kinds each front maps to its own status codes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from .._private.checks import finite_number
from .._version import __version__
from ..errors import DeadlineExceeded, ModelNotFound, QueueFull, RuntimeClosed
from .tensors import OutputError, Signature, TensorError

if TYPE_CHECKING:
    from ..runtime import Runtime

NOT_FOUND = "not_found"
INVALID = "invalid"
QUEUE_FULL = "queue_full"
DEADLINE = "deadline"
INTERNAL = "internal"  # a failure of the server itself (HTTP 500, gRPC INTERNAL)
MODEL_FAILED = "model_failed"  # the model's call raised (500, INTERNAL)
OUTPUT_MISMATCH = "output_mismatch"  # the model's result does not fit its declared outputs (500, INTERNAL)
UNAVAILABLE = "unavailable"
TOO_LARGE = "too_large"
NOT_ALLOWED = "not_allowed"
UNSUPPORTED = "unsupported"  # a media type or content coding the server does not take (HTTP 415)
SLOW_BODY = "slow_body"  # a request body that did not arrive in time (HTTP 408)

OK = "ok"
"""An infer request answered with the model's outputs (as counted in :meth:`Frontend.count`)."""
DISCONNECTED = "disconnected"
"""An infer request whose client went away before its answer (HTTP: while its body was read,
or while it waited, which cancels it if still queued; gRPC: the client cancelled the call, or
its deadline passed). Its answer, if any, reaches nobody."""

WATCH_AFTER_S = 0.05
"""An HTTP request still unanswered after this long is watched for its client going away."""


class Alarms:
    """Calls ``fn(*args)`` for each key still set ``delay_s`` after :meth:`set` (up to a
    quarter of that, at most 1 s, later), from one timer per event loop.

    A loop timer per request costs the loop an extra pass each time one is cancelled (the
    HTTP front armed two a request, both almost always cancelled within a millisecond); here a
    request costs a dict entry, and the timer fires about once per ``delay_s`` under load.
    Keys are set in order of their deadlines (one delay for all), so a firing stops at the
    first key not due yet."""

    __slots__ = ("delay_s", "_slack", "_loops")

    def __init__(self, delay_s: float) -> None:
        self.delay_s = float(delay_s)
        self._slack = min(self.delay_s / 4, 1.0)
        self._loops: dict[asyncio.AbstractEventLoop, _Pending] = {}

    def set(self, key: object, fn: Callable[..., object], *args: Any) -> None:
        """Calls ``fn(*args)`` on the running loop ``delay_s`` from now unless :meth:`cancel`
        is called for ``key`` (a new key; one not set already) first."""
        loop = asyncio.get_running_loop()
        pending = self._loops.get(loop)
        if pending is None:
            for gone in [lp for lp in self._loops if lp.is_closed()]:
                del self._loops[gone]
            pending = self._loops[loop] = _Pending()
        pending.due[key] = (loop.time() + self.delay_s, fn, args)
        if pending.timer is None:
            pending.timer = loop.call_later(self.delay_s, self._fire, loop, pending)

    def cancel(self, key: object) -> None:
        """Forgets ``key`` (set from the running loop): its call will not be made."""
        pending = self._loops.get(asyncio.get_running_loop())
        if pending is not None:
            pending.due.pop(key, None)

    def _fire(self, loop: asyncio.AbstractEventLoop, pending: _Pending) -> None:
        pending.timer = None
        now = loop.time()
        due = pending.due
        while due:
            key = next(iter(due))
            when, fn, args = due[key]
            if when > now:
                pending.timer = loop.call_at(max(when, now + self._slack), self._fire, loop, pending)
                return
            del due[key]
            fn(*args)


class _Pending:
    __slots__ = ("due", "timer")

    def __init__(self) -> None:
        self.due: dict[object, tuple[float, Callable[..., object], tuple[Any, ...]]] = {}
        self.timer: asyncio.TimerHandle | None = None


def _watch(into: list[asyncio.Task[bool]], fut: Any, gone: Callable[[], Awaitable[Any]],
           settled: asyncio.Future[None]) -> None:
    if not settled.done():
        into.append(asyncio.get_running_loop().create_task(_cancel_when_gone(fut, gone)))


async def _cancel_when_gone(fut: Any, gone: Callable[[], Awaitable[Any]]) -> bool:
    """Cancels ``fut`` once its HTTP client went away; True when it did."""
    msg = await gone()
    if msg.get("type") != "http.disconnect":
        return False
    fut.cancel()  # still queued: never run; running: it finishes, and nobody reads the answer
    return True

EXTENSIONS = ["binary_tensor_data"]


log = logging.getLogger("apportion.serve")
"""Where the fronts report failures: the models' (their exceptions with their tracebacks, and
results that do not fit the declared outputs) and the server's own, at ERROR, a few at a time
(:class:`Failures`). ``apportion serve`` prints them on stderr."""

REPORT_EVERY_S = 10.0
"""A model's failures of one kind are logged at most once per this many seconds; the next line
says how many were not."""


_Key = TypeVar("_Key", bound=Hashable)


class Throttle(Generic[_Key]):
    """Lets a line of each key through at most once per :data:`REPORT_EVERY_S`, counting those
    held back in between. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[_Key, float] = {}  # key -> when a line was last let through
        self._held: dict[_Key, int] = {}  # lines since then, held back

    def admit(self, key: _Key) -> str | None:
        """None when a line of ``key`` went through within REPORT_EVERY_S (this one is held
        back); else what to add to the line: how many were held back since the last, or ""."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < REPORT_EVERY_S:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            held = self._held.pop(key, 0)
            self._last[key] = now
        return f" ({held} more since the last line about it, {now - last:.0f} s ago)" if held and last else ""

    def held(self) -> dict[_Key, int]:
        """The lines held back since the last of each key, taken: counted afresh from now."""
        with self._lock:
            held, self._held = self._held, {}
        return held


class Failures:
    """Logs failures on :data:`log`, per model and kind at most once per
    :data:`REPORT_EVERY_S` (a model that fails every request writes a line every ten seconds,
    not one per request); each line after a quiet spell says how many failures it stood for."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._throttle: Throttle[tuple[str, str]] = Throttle(clock)

    def report(self, model: str, kind: str, message: str, error: BaseException | None = None) -> bool:
        """Logs ``message`` (with ``error``'s traceback) unless one of this model and kind was
        logged within REPORT_EVERY_S; returns whether it was."""
        more = self._throttle.admit((model, kind))
        if more is None:
            return False
        log.error("%s%s", message, more,
                  exc_info=(type(error), error, error.__traceback__) if error is not None else None)
        return True

    def flush(self) -> None:
        """Logs how many failures of each model and kind were held back since their last line
        (at a server's stop: no later line would say so)."""
        for (model, kind), n in sorted(self._throttle.held().items()):
            log.error("%s: %d more failure(s) (%s) since the last line about it", f"model {model!r}" if model
                      else "the server", n, kind)


class ServeError(Exception):
    """A request that ends in an error response: ``kind`` (one of the constants above) and a
    message for the client."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Frontend:
    """One runtime's models as the protocol sees them, shared by the HTTP and gRPC fronts of a
    server: they go unready and refuse new requests together while the server drains."""

    def __init__(self, rt: Runtime, signatures: Mapping[str, Signature]) -> None:
        if not isinstance(signatures, Mapping):
            raise TypeError(f"signatures must be a mapping of model name -> Signature, got {signatures!r}")
        for name, sig in signatures.items():
            if not isinstance(sig, Signature):
                raise TypeError(f"model {name!r}: signature must be apportion.serve.Signature, got {sig!r}")
        self.rt = rt
        self.signatures = dict(signatures)
        self.draining = False
        self.in_flight = 0
        self.reading: set[asyncio.Task[Any]] = set()
        """HTTP requests whose body is still arriving (not admitted yet): :meth:`cut` ends
        them when the drain begins."""
        self._cut: dict[asyncio.Task[Any], str] = {}  # reading tasks stopped, and the error kind why
        self.grpc_calls: set[asyncio.Task[Any]] = set()
        """gRPC infer calls in progress: cancelled when the drain ends with them still waiting,
        they answer UNAVAILABLE (gRPC's own stop cancelled them: CANCELLED, read as the
        client's doing)."""
        self.watch_alarms = Alarms(WATCH_AFTER_S)
        """Starts watching HTTP requests unanswered after :data:`WATCH_AFTER_S`."""
        self._answers: dict[tuple[str, str, str], int] = {}
        self._answers_lock = threading.Lock()  # the fronts may run on several event loops
        self.failures = Failures()
        """Logs the models' failures (and the server's own) as they happen, a few at a time."""

    # -- what the fronts answered ---------------------------------------------------------------
    def count(self, name: str, protocol: str, status: str) -> None:
        """Counts one infer request ``protocol`` ("http" or "grpc") answered with ``status``
        (:data:`OK`, :data:`DISCONNECTED` or an error kind) for model ``name``; a name that is
        no served model counts as "" (a client's misspelling makes no series of its own)."""
        key = (name if name in self.signatures else "", protocol, status)
        with self._answers_lock:
            self._answers[key] = self._answers.get(key, 0) + 1

    def refused(self, name: str, protocol: str, e: ServeError) -> None:
        """Counts an infer request answered with error ``e``; one whose result did not fit the
        declared outputs is also logged (a model's exception is logged where it is caught)."""
        self.count(name, protocol, e.kind)
        if e.kind == OUTPUT_MISMATCH:
            self.failures.report(name, e.kind, e.message)

    def answers(self) -> dict[tuple[str, str, str], int]:
        """Infer requests answered so far, by (model, protocol, status): see :meth:`count`."""
        with self._answers_lock:
            return dict(self._answers)

    # -- health and metadata ------------------------------------------------------------------
    def live(self) -> bool:
        # A runtime inherited through fork (gunicorn --preload) serves nothing here: every
        # request would get 503 while probes read live and ready.
        return not self.rt.closed and not self.rt._forked

    def model_ready(self, name: str) -> bool:
        """Serving: the runtime runs, the model is registered with its instances built and
        warmed (Runtime.serving), and the server is not draining."""
        return not self.draining and name in self.signatures and self.rt.serving(name)

    def ready(self) -> bool:
        return bool(self.signatures) and all(self.model_ready(n) for n in self.signatures)

    def signature(self, name: str) -> Signature:
        sig = self.signatures.get(name)
        if sig is None:
            raise ServeError(NOT_FOUND, f"unknown model {name!r}; models: {sorted(self.signatures)}")
        return sig

    def check_version(self, name: str, version: str) -> None:
        if version not in ("", "1"):
            raise ServeError(NOT_FOUND, f"model {name!r} has no version {version!r} (only '1')")

    @staticmethod
    def server_metadata() -> dict[str, Any]:
        return {"name": "apportion", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str) -> dict[str, Any]:
        sig = self.signature(name)
        return {"name": name, "versions": ["1"], "platform": f"apportion_{sig.tensor}",
                "inputs": [s.metadata() for s in sig.inputs],
                "outputs": [s.metadata() for s in sig.outputs]}

    # -- inference ----------------------------------------------------------------------------
    @staticmethod
    def request_options(name: str, timeout: Any, priority: Any) -> tuple[float | None, int | None]:
        """``timeout`` in microseconds (Triton's convention; 0 or absent: the model's default)
        and ``priority`` (Triton's: 0 or absent is the default, 1 the highest level, so v2
        priority p is apportion priority p - 1) -> (timeout_ms, priority)."""
        timeout_ms = None
        if timeout is not None:
            if not (finite_number(timeout) and timeout >= 0):
                raise ServeError(INVALID, f"model {name!r}: parameter 'timeout' must be a finite "
                                          f"number of microseconds >= 0, got {timeout!r}"[:300])
            timeout_ms = timeout / 1000.0 if timeout > 0 else None
        level = None
        if priority is not None:
            if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
                raise ServeError(INVALID, f"model {name!r}: parameter 'priority' must be an int "
                                          f">= 0 (1 is the highest, 0 the default), got {priority!r}")
            level = priority - 1 if priority > 0 else None
        return timeout_ms, level

    async def infer(self, name: str, arrays: Mapping[str, np.ndarray], timeout_ms: float | None,
                    priority: int | None, gone: Callable[[], Awaitable[Any]] | None = None) -> dict[str, np.ndarray]:
        """Runs one checked request; every failure is a ServeError. ``gone``: awaits the
        client's going away (HTTP's ``receive``, which then answers ``http.disconnect``); a
        request still waiting after :data:`WATCH_AFTER_S` is watched with it, and cancelled
        if still queued when its client leaves."""
        sig = self.signature(name)
        if self.draining:
            raise ServeError(UNAVAILABLE, f"model {name!r}: the server is shutting down")
        if not self.rt.started and not self.rt.closed:
            # The runtime would queue it until start(): the client would wait without an answer.
            raise ServeError(UNAVAILABLE, f"model {name!r} is not ready: the runtime is not started")
        try:
            inputs = sig.to_model(name, arrays)
        except TensorError as e:
            raise ServeError(INVALID, str(e)) from None
        try:
            fut = self.rt.submit(name, inputs, timeout_ms=timeout_ms, priority=priority)
        except QueueFull as e:
            raise ServeError(QUEUE_FULL, str(e)) from None
        except (ModelNotFound, RuntimeClosed) as e:
            raise ServeError(UNAVAILABLE, f"model {name!r} is not ready: {e}") from None
        except ValueError as e:  # priority beyond the model's levels
            raise ServeError(INVALID, self._priority_error(name, priority, e)) from None
        # Submission and waiting are separate steps (not rt.infer): a refusal at submission is
        # the client's error, while anything raised once admitted is the model's own (500),
        # including a ValueError.
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            settled = loop.create_future()

            def wake(_: Any) -> None:  # runs in the worker thread that completed the request
                try:
                    loop.call_soon_threadsafe(_settle, settled)
                except RuntimeError:  # the loop closed meanwhile: nobody awaits any more
                    pass

            fut.add_done_callback(wake)
            # Most requests are answered before the watch would start: an alarm each, no task.
            watching: list[asyncio.Task[bool]] = []
            if gone is not None:
                self.watch_alarms.set(settled, _watch, watching, fut, gone, settled)
            try:
                await settled
            except asyncio.CancelledError:
                fut.cancel()  # the client went away: a queued request is never run
                raise
            finally:
                if gone is not None:
                    self.watch_alarms.cancel(settled)
                    for watcher in watching:
                        watcher.cancel()
            # Whether the watch saw its client go away (then cancelled it, if still queued).
            left = any(w.done() and not w.cancelled() and w.result() for w in watching)
            if fut.cancelled():
                # The watch's own cancel (nobody reads this answer), or the runtime's.
                if left:
                    raise ServeError(DISCONNECTED, f"model {name!r}: the request was cancelled: its client went away")
                raise ServeError(UNAVAILABLE, f"model {name!r}: the request was cancelled before it ran (the model "
                                              "was removed or failed to start, or the runtime closed)")
            try:
                result = fut.result(0)
            except DeadlineExceeded as e:
                raise ServeError(DEADLINE, str(e)) from None
            except RuntimeClosed as e:
                raise ServeError(UNAVAILABLE, str(e)) from None
            except BaseException as e:  # noqa: BLE001 - the model's own, SystemExit and KeyboardInterrupt too:
                # the request's failure, not the server's (raised here it ended the loop)
                notes = " ".join(str(n) for n in getattr(e, "__notes__", ()))  # a batch shared: say so
                message = f"model {name!r} failed: {type(e).__name__}: {e}" + (f" ({notes})" if notes else "")
                self.failures.report(name, MODEL_FAILED, message, e)
                raise ServeError(MODEL_FAILED, message) from None
            if left:  # it ran: its client went away meanwhile, and nobody reads the answer
                raise ServeError(DISCONNECTED, f"model {name!r}: the request ran, but its client went away")
            try:
                return sig.from_model(name, result)
            except OutputError as e:  # logged by refused() (the fronts find their own too, encoding)
                raise ServeError(OUTPUT_MISMATCH, str(e)) from None
        finally:
            self.in_flight -= 1

    def _priority_error(self, name: str, priority: int | None, e: ValueError) -> str:
        """The runtime's refusal of a priority level, in the protocol's numbering."""
        try:
            levels = self.rt.spec(name).priority_levels
        except Exception:  # noqa: BLE001 - the model went away meanwhile: the runtime's words
            return str(e)
        if priority is None:
            return str(e)
        allowed = "1" if levels == 1 else f"1 (the highest) to {levels}"
        return (f"model {name!r}: parameter 'priority' is {priority + 1}, but the model has {levels} "
                f"priority level{'s' if levels > 1 else ''}: send {allowed}, or 0 for the default")

    def cut(self) -> None:
        """Stops admitting requests (readiness goes false) and ends the HTTP requests whose
        body is still arriving: they were not admitted, and a client that sends slowly or
        stopped halfway would hold the shutdown. Each gets 503 (see :meth:`was_cut`)."""
        self.draining = True
        for task in list(self.reading):
            self.stop_reading(task, UNAVAILABLE)

    def stop_reading(self, task: asyncio.Task[Any], kind: str) -> None:
        """Ends the reading of ``task``'s body (one of :attr:`reading`): it is cancelled, and
        answers with an error of ``kind`` (see :meth:`was_cut`). Once per task."""
        if task in self.reading and task not in self._cut:
            self._cut[task] = kind
            task.cancel()

    def was_cut(self, task: asyncio.Task[Any] | None) -> str | None:
        """The error kind ``task`` (cancelled while reading its body) was stopped for, when
        :meth:`stop_reading` alone cancelled it: the cancellation is then withdrawn, and the
        request answered with that error. None for any other cancellation, which the caller
        lets through."""
        kind = self._cut.pop(task, None) if task is not None else None
        return kind if kind is not None and task is not None and task.uncancel() == 0 else None

    def done_reading(self, task: asyncio.Task[Any]) -> None:
        """``task``'s body is in (or its reading ended otherwise)."""
        self.reading.discard(task)
        self._cut.pop(task, None)

    async def drain(self, timeout_s: float | None) -> bool:
        """Stops admitting requests (readiness goes false, :meth:`cut`) and waits until the
        admitted ones have completed; False if ``timeout_s`` passed first."""
        self.cut()
        loop = asyncio.get_running_loop()
        end = None if timeout_s is None else loop.time() + timeout_s
        while self.in_flight:
            if end is not None and loop.time() >= end:
                return False
            await asyncio.sleep(0.005)
        return True


def _settle(f: asyncio.Future[None]) -> None:
    if not f.done():
        f.set_result(None)
