"""Running a load: one driver thread per model submits requests and tallies outcomes by
window; :func:`run` steps the windows, checks stability and builds the report (see the
package documentation for the method)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DeadlineExceeded, QueueFull, RuntimeClosed
from ..stats import ModelStats
from .remote import RemoteError, RemoteTarget
from .report import LoadReport, ModelReport, Tally, WindowStats, model_report, summarise_window, windows_stable
from .spec import LoadError, ModelLoad, validate_settings

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["failed_model", "run"]

_FAILED_MODEL = "_apportion_load_model"


def failed_model(error: BaseException) -> str | None:
    """The model whose load raised ``error`` (an exception :func:`run` re-raised from an
    ``inputs`` callable), or None for any other exception."""
    model = getattr(error, _FAILED_MODEL, None)
    return model if isinstance(model, str) else None


_Completion = tuple[int, int, int, Any]  # (sequence number, submit ns, done ns, future)


class _Driver:
    """Submits one model's requests from its own thread and accounts for their outcomes.

    Outcomes are attributed to windows by when they happened: completions by the time their
    done-callback ran, submissions and rejections by the attempt's time. Windows before 0 are
    warm-up and are not kept.
    """

    def __init__(self, rt: Runtime, spec: ModelLoad, clock0_ns: int, window_ns: int,
                 rng: random.Random, abort: threading.Event) -> None:
        self.rt = rt
        self.spec = spec
        self.clock0_ns = clock0_ns  # start of window 0 (end of warm-up)
        self.window_ns = window_ns
        self.rng = rng
        self.abort = abort
        self.stop = threading.Event()
        self.windows: dict[int, Tally] = {}
        self.total = Tally()  # every request of the run, warm-up and the final drain included
        self._rejected_since_wait = False
        self.error: BaseException | None = None
        self.inputs_exhausted = False
        self.unfinished = 0
        self.caught_up_ns = 0
        self.drain_timeout_s = 10.0
        self._done: queue.SimpleQueue[_Completion | None] = queue.SimpleQueue()
        self._pending: dict[int, Any] = {}
        self._seq = 0
        slo = spec.slo
        self._good_ns = None if slo is None or slo.good_ms is None else int(slo.good_ms * 1e6)
        self._timeout_ms = None if slo is None else slo.timeout_ms
        self._next_input = self._input_source(spec.inputs)
        self.thread = threading.Thread(target=self._main, name=f"apportion-load-{spec.model}", daemon=True)

    @staticmethod
    def _input_source(inputs: Any) -> Callable[[], Any]:
        if inputs is None:
            return lambda: None
        if callable(inputs):
            return inputs
        if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
            items = list(inputs)  # validated non-empty by run()
            counter = itertools.count()
            return lambda: items[next(counter) % len(items)]
        it = iter(inputs)
        return lambda: next(it)

    def _acc(self, t_ns: int) -> Tally | None:
        index = (t_ns - self.clock0_ns) // self.window_ns
        if index < 0:
            return None
        acc = self.windows.get(index)
        if acc is None:
            acc = self.windows[index] = Tally()
        return acc

    # The callback runs in the model's worker thread: stamp the time and hand over, nothing
    # more (SimpleQueue.put never blocks and never raises).
    def _callback(self, seq: int, t0: int) -> Callable[[Any], None]:
        put = self._done.put
        clock = time.perf_counter_ns
        return lambda fut: put((seq, t0, clock(), fut))

    def _offered(self, scheduled_ns: int | None) -> tuple[int, Tally | None]:
        """Counts an attempt made now (and, in an open loop, how late after its scheduled
        time); returns its time and its window's tally (None in warm-up)."""
        t0 = time.perf_counter_ns()
        acc = self._acc(t0)
        self.total.offered += 1
        if acc is not None:
            acc.offered += 1
            if scheduled_ns is not None:
                acc.lags_ns.append(max(0, t0 - scheduled_ns))
        return t0, acc

    def _submitted(self, acc: Tally | None) -> None:
        self.total.submitted += 1
        if acc is not None:
            acc.submitted += 1

    def _submit(self, scheduled_ns: int | None = None) -> bool:
        """One attempt. Returns False when it was rejected."""
        try:
            x = self._next_input()
        except StopIteration:
            self.inputs_exhausted = True
            self.stop.set()
            return False
        t0, acc = self._offered(scheduled_ns)
        try:
            fut = self.rt.submit(self.spec.model, x, timeout_ms=self._timeout_ms, priority=self.spec.priority)
        except QueueFull as e:
            for a in (self.total, acc):
                if a is not None:
                    a.rejected += 1
                    a.count_error(e)
            return False
        self._submitted(acc)
        seq = self._seq
        self._seq += 1
        self._pending[seq] = fut
        fut.add_done_callback(self._callback(seq, t0))
        return True

    def _complete(self, item: _Completion) -> None:
        seq, t0, t1, fut = item
        self._pending.pop(seq, None)
        cancelled = fut.cancelled()
        self._account(t0, t1, None if cancelled else fut.exception(), cancelled)

    def _account(self, t0: int, t1: int, exc: BaseException | None, cancelled: bool) -> None:
        """One request's outcome: submitted at ``t0``, ended at ``t1`` (ns)."""
        acc = self._acc(t1)
        # A target over the network answers a refusal after the fact: it lands here, not
        # as a QueueFull from submit.
        if isinstance(exc, QueueFull):
            self._rejected_since_wait = True
        for a in (self.total, acc):
            if a is None:
                continue
            if cancelled:
                a.cancelled += 1
            elif exc is None:
                a.completed += 1
            else:
                if isinstance(exc, QueueFull):
                    a.rejected += 1
                elif isinstance(exc, DeadlineExceeded):
                    a.expired += 1
                else:
                    a.failed += 1
                a.count_error(exc)
        if acc is not None and exc is None and not cancelled:
            latency = t1 - t0
            acc.latencies_ns.append(latency)
            if self._good_ns is None or latency <= self._good_ns:
                acc.good += 1

    def _wait(self, timeout_s: float) -> None:
        """Accounts for completions until one arrives or ``timeout_s`` passes, then for any
        others already queued."""
        if self._done.empty():
            self.caught_up_ns = time.perf_counter_ns()
        try:
            item = self._done.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return
        while item is not None:
            self._complete(item)
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break

    def wake(self) -> None:
        self._done.put(None)

    def outstanding(self) -> int:
        """Requests sent and not answered yet (read from another thread: a moment's view)."""
        return len(self._pending)

    def _main(self) -> None:
        try:
            self._drive()
        except BaseException as e:  # noqa: BLE001 - handed to run(), which re-raises it
            if isinstance(e, Exception):
                e.add_note(f"apportion.load: raised while driving model {self.spec.model!r}")
                with contextlib.suppress(AttributeError, TypeError):  # an exception without a __dict__
                    setattr(e, _FAILED_MODEL, self.spec.model)
            self.error = e
            self.abort.set()
        finally:
            self._finish()

    def _drive(self) -> None:
        if self.spec.concurrency is not None:
            self._closed_loop(self.spec.concurrency)
        else:
            assert self.spec.rate is not None
            self._open_loop(self.spec.rate)

    def _closed_loop(self, concurrency: int) -> None:
        while not self.stop.is_set():
            rejected = False
            while len(self._pending) < concurrency and not self.stop.is_set():
                if not self._submit():
                    rejected = True
                    break
            # After a rejection nothing may complete soon (the queue is full of someone
            # else's work): retry the slot after a short pause rather than spin.
            rejected = rejected or self._rejected_since_wait
            self._rejected_since_wait = False
            self._wait(0.001 if rejected else 0.05)

    def _gaps(self, rate: float) -> Callable[[], float]:
        """The time to the next arrival, in seconds, for the load's arrival process."""
        if self.spec.arrivals == "poisson":
            return lambda: self.rng.expovariate(rate)
        return lambda: 1.0 / rate

    def _open_loop(self, rate: float) -> None:
        gap = self._gaps(rate)
        # Arrival times are accumulated in float seconds from a fixed origin and never
        # re-based on "now", so submission delays do not push later arrivals back.
        origin = time.perf_counter_ns()
        offset_s = gap()
        while not self.stop.is_set():
            # Compared in float seconds: at a tiny rate the next arrival may lie beyond any
            # clock (and any int); the wait is capped so it stays a short, bounded sleep.
            ahead_s = offset_s - (time.perf_counter_ns() - origin) / 1e9
            if ahead_s > 0:
                self._wait(min(ahead_s, 0.05))
                continue
            self._submit(scheduled_ns=origin + int(offset_s * 1e9))
            offset_s += gap()
            self._wait(0.0)  # account for what completed meanwhile; never blocks

    def _finish(self) -> None:
        # Queued requests are cancelled (they would only be measured after the end); running
        # ones are waited for, so that the next measurement does not inherit them.
        for fut in list(self._pending.values()):
            fut.cancel()
        deadline = time.monotonic() + self.drain_timeout_s
        while self._pending and time.monotonic() < deadline:
            try:
                item = self._done.get(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if item is not None:
                self._complete(item)
        self.unfinished = len(self._pending)
        self.caught_up_ns = time.perf_counter_ns()



class _LoopDriver(_Driver):
    """A :class:`RemoteTarget`'s load, driven on the target's own event loop: each request is
    sent and its answer accounted for on that loop, with no hand-off between threads (a
    driver thread and the loop thread would pass every request and every answer across, and
    wake each other, at more CPU per request than a fast server spends on it). The thread
    only waits for the loop's work to end. Windows, tallies and the stop protocol are
    :class:`_Driver`'s."""

    def __init__(self, target: RemoteTarget, spec: ModelLoad, clock0_ns: int, window_ns: int,
                 rng: random.Random, abort: threading.Event) -> None:
        super().__init__(target, spec, clock0_ns, window_ns, rng, abort)  # type: ignore[arg-type]
        self.target = target
        self._loop = target.loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unanswered = 0  # sent and not yet answered (changed on the loop only)
        self._woken: asyncio.Event | None = None
        self._failure: Exception | None = None

    def _drive(self) -> None:
        asyncio.run_coroutine_threadsafe(self._run(), self._loop).result()

    def _finish(self) -> None:  # done on the loop, at the end of _run
        pass

    def wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop is closed: nothing left to wake
            pass

    def _on_wake(self) -> None:
        # Every answer the loop took in before this callback is accounted for.
        self.caught_up_ns = time.perf_counter_ns()
        if self._woken is not None and self.stop.is_set():
            self._woken.set()

    async def _run(self) -> None:
        self._woken = asyncio.Event()
        try:
            if self.spec.concurrency is not None:
                self._tasks.update(asyncio.create_task(self._client()) for _ in range(self.spec.concurrency))
                await self._woken.wait()  # run() stopped the load, the inputs ran out, or one failed
            else:
                assert self.spec.rate is not None
                await self._arrivals(self.spec.rate)
        finally:
            await self._drain()
        if self._failure is not None:
            raise self._failure

    def _halt(self, failure: Exception | None = None) -> None:
        """Ends the load: the inputs ran out, or ``failure`` was raised (the run aborts at
        once; _run re-raises it after the drain, and _main reports it as for _Driver)."""
        if failure is not None:
            self._failure = self._failure or failure
            self.abort.set()
        self.stop.set()
        assert self._woken is not None
        self._woken.set()

    def _prepare(self) -> tuple[list[Any], dict[str, Any]] | None:
        """The next request's tensors and options; None when the inputs ran out."""
        try:
            x = self._next_input()
        except StopIteration:
            self.inputs_exhausted = True
            self._halt()
            return None
        return self.target.request(self.spec.model, x, self._timeout_ms, self.spec.priority)

    def outstanding(self) -> int:
        return self._unanswered

    def _sent(self, scheduled_ns: int | None) -> int:
        # A server's refusal arrives as an answer (see _account): every attempt is sent.
        t0, acc = self._offered(scheduled_ns)
        self._submitted(acc)
        return t0

    async def _one(self, request: tuple[list[Any], dict[str, Any]], t0: int) -> BaseException | None:
        self._unanswered += 1
        try:
            await self.target.send(self.spec.model, *request)
        except RemoteError as e:
            exc: BaseException | None = e
        else:
            exc = None
        finally:
            self._unanswered -= 1
        self._account(t0, time.perf_counter_ns(), exc, False)
        return exc

    async def _client(self) -> None:
        """One closed-loop client: a request, its answer, the next request."""
        try:
            while not self.stop.is_set():
                request = self._prepare()
                if request is None:
                    return
                exc = await self._one(request, self._sent(None))
                if isinstance(exc, QueueFull) or getattr(exc, "kind", None) == "connection":
                    # The queue is full of others' work, or the server cannot be reached: retry
                    # after a short pause, not at once (a refused connection fails in
                    # microseconds, and the failures would count the retries' spin).
                    await asyncio.sleep(0.001)
        except Exception as e:  # noqa: BLE001 - handed to run()
            self._halt(e)

    async def _arrivals(self, rate: float) -> None:
        gap = self._gaps(rate)
        origin = time.perf_counter_ns()  # arrivals are never re-based on "now", as in _Driver
        offset_s = gap()
        while not self.stop.is_set():
            ahead_s = offset_s - (time.perf_counter_ns() - origin) / 1e9  # as in _Driver._open_loop
            if ahead_s > 0:
                # The loop's timers have ~1 ms resolution: an arrival is sent up to that late,
                # and the lag is recorded as for a late submission.
                await asyncio.sleep(min(ahead_s, 0.05))
                continue
            due = origin + int(offset_s * 1e9)
            try:
                request = self._prepare()
            except Exception as e:  # noqa: BLE001 - handed to run()
                self._halt(e)
                return
            if request is None:
                return
            task = asyncio.create_task(self._one(request, self._sent(due)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            offset_s += gap()
            # Behind schedule, this loop would create tasks without ever letting one run (no
            # await in between): nothing was sent, the windows read idle, and neither max_s
            # nor the drain's timeout could fire. While the next arrival is already due, each
            # lets the loop run once, and no more than OPEN_LOOP_IN_FLIGHT wait at a time:
            # beyond that the generator falls behind, which the schedule lag reports. (On
            # schedule the sleep until the next arrival lets it run.)
            if offset_s <= (time.perf_counter_ns() - origin) / 1e9:
                await asyncio.sleep(0)
            while len(self._tasks) >= OPEN_LOOP_IN_FLIGHT and not self.stop.is_set():
                await asyncio.sleep(0.001)

    async def _drain(self) -> None:
        # Requests in flight cannot be taken back: wait for their answers (up to the drain
        # timeout); those still unanswered are counted as unfinished and dropped.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.drain_timeout_s)
        self.unfinished = sum(1 for t in self._tasks if not t.done())
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()
        self.caught_up_ns = time.perf_counter_ns()


OPEN_LOOP_IN_FLIGHT = 10_000
"""Requests an open loop over the network keeps unanswered at most; arrivals beyond wait (and
are reported late: the client limited the load)."""


def run(
    rt: Runtime | RemoteTarget,
    loads: ModelLoad | Iterable[ModelLoad],
    *,
    warmup_s: float = 1.0,
    window_s: float = 1.0,
    stable_windows: int = 3,
    tolerance: float = 0.1,
    max_s: float = 30.0,
    seed: int | None = None,
    drain_timeout_s: float = 10.0,
    on_window: Callable[[int, Mapping[str, WindowStats]], None] | None = None,
) -> LoadReport:
    """Puts ``loads`` on a started runtime and measures until stable or ``max_s``.

    ``rt``: an :class:`apportion.Runtime` the caller built and started, or a
    :class:`RemoteTarget` (a KServe v2 server over the network); models not named in
    ``loads`` keep serving whatever else is sent to them. ``warmup_s`` of load is discarded
    first; then windows of ``window_s`` run until the last ``stable_windows`` agree within
    ``tolerance`` (a fraction, 0.1 = 10%) on every model's throughput and p99, or until
    another window would end after ``max_s`` (counted from the start, warm-up included).
    ``seed`` makes Poisson arrivals repeatable. ``on_window(index, {model: WindowStats})`` is
    called from this thread after each window (progress display, early stop by raising).
    At the end, requests still queued are cancelled and running ones are waited for (up to
    ``drain_timeout_s``); neither counts in the reported windows (each model's
    ``ModelReport.totals`` includes them).

    Returns a :class:`LoadReport`. Raises ModelNotFound or LoadError for invalid input (before
    any request is sent), RuntimeClosed for a runtime that is not serving, and re-raises an
    exception from an ``inputs`` callable (with a note naming the model; :func:`failed_model`
    gives the model's name).
    """
    specs = [loads] if isinstance(loads, ModelLoad) else list(loads)
    if not specs:
        raise LoadError("load.run: loads is empty; give at least one ModelLoad")
    for s in specs:
        if not isinstance(s, ModelLoad):
            raise LoadError(f"load.run: loads must hold ModelLoad objects, got {s!r}")
    names = [s.model for s in specs]
    for s in specs:
        if names.count(s.model) > 1:
            raise LoadError(f"model {s.model!r}: field 'model': appears more than once in loads")
    validate_settings(warmup_s, window_s, stable_windows, tolerance, max_s, drain_timeout_s)
    if getattr(rt, "closed", False):
        raise RuntimeClosed("load.run: the runtime is closed")
    if not getattr(rt, "started", True):
        raise RuntimeClosed("load.run: the runtime is not started; call rt.start() first")
    registered = list(rt.models)
    for s in specs:
        s.validate(registered)
        if isinstance(s.inputs, Sequence) and not isinstance(s.inputs, (str, bytes)) and not s.inputs:
            raise LoadError(f"model {s.model!r}: inputs is an empty sequence")
        if s.priority is not None and not isinstance(rt, RemoteTarget):  # a server checks its own
            levels = rt.spec(s.model).priority_levels
            if not 0 <= s.priority < levels:
                raise LoadError(f"model {s.model!r}: priority must be in [0, {levels}) (the model's "
                                f"priority_levels is {levels}; 0 is the highest), got {s.priority!r}")
    if isinstance(rt, RemoteTarget) and rt.scheme == "http":
        clients = sum(s.concurrency or 0 for s in specs)
        if clients > rt.connections:
            # One request in flight per connection: the clients beyond would wait for one in
            # the client, and that wait would read as the server's latency.
            raise LoadError(f"load.run: {clients} closed-loop clients need as many HTTP connections; the target "
                            f"keeps {rt.connections} (RemoteTarget(connections=...))")

    window_ns = int(window_s * 1e9)
    master = random.Random(seed)
    abort = threading.Event()
    t_start = time.perf_counter_ns()
    clock0 = t_start + int(warmup_s * 1e9)
    limit = t_start + int(max_s * 1e9)
    kind = _LoopDriver if isinstance(rt, RemoteTarget) else _Driver
    drivers = {
        s.model: kind(rt, s, clock0, window_ns, random.Random(master.getrandbits(64)), abort)  # type: ignore[arg-type]
        for s in specs
    }
    for d in drivers.values():
        d.drain_timeout_s = float(drain_timeout_s)

    history: dict[str, list[WindowStats]] = {n: [] for n in drivers}
    outstanding: dict[str, list[int]] = {n: [] for n in drivers}  # at each window's end
    snapshots: list[dict[str, ModelStats]] = []
    stable = False
    measured = 0
    try:
        for d in drivers.values():
            d.thread.start()
        _sleep_until(clock0, abort)
        snapshots.append(_snapshot(rt, drivers))
        while not abort.is_set():
            end = clock0 + (measured + 1) * window_ns
            if end > limit:
                break
            _sleep_until(end, abort)
            if abort.is_set():
                break
            _await_drivers(drivers, end)
            snapshots.append(_snapshot(rt, drivers))
            for n, d in drivers.items():
                outstanding[n].append(d.outstanding())
            current = {
                n: summarise_window(d.windows.get(measured), measured, window_s,
                                    snapshots[-2].get(n), snapshots[-1].get(n), outstanding[n][measured])
                for n, d in drivers.items()
            }
            for n, w in current.items():
                history[n].append(w)
            measured += 1
            # Older windows are never reported: drop their samples to bound memory.
            for d in drivers.values():
                # list() of a dict's keys is one step under the GIL; iterating the dict itself
                # while the driver adds a window would raise.
                for i in list(d.windows.keys()):
                    if i < measured - stable_windows:
                        d.windows.pop(i, None)
            if on_window is not None:
                on_window(measured - 1, current)
            if all(windows_stable(h, stable_windows, tolerance) for h in history.values()):
                stable = True
                break
            if all(d.stop.is_set() for d in drivers.values()):
                break
    finally:
        for d in drivers.values():
            d.stop.set()
            d.wake()
        for d in drivers.values():
            d.thread.join()
    for d in drivers.values():
        if d.error is not None:
            raise d.error

    first = max(0, measured - stable_windows)
    reported = range(first, measured)
    duration_s = len(reported) * window_s
    end_stats = _snapshot(rt, drivers)
    models: dict[str, ModelReport] = {}
    for n, d in drivers.items():
        # Re-read the reported windows now that every driver has accounted for everything.
        accs = [d.windows.get(i) or Tally() for i in reported]
        for i, acc in zip(reported, accs):
            history[n][i] = summarise_window(acc, i, window_s, snapshots[i].get(n), snapshots[i + 1].get(n),
                                             outstanding[n][i])
        models[n] = model_report(d.spec, accs, duration_s, history[n],
                                  windows_stable(history[n], stable_windows, tolerance),
                                  snapshots[first] if snapshots else None,
                                  snapshots[measured] if len(snapshots) > measured else None,
                                  end_stats.get(n), d.inputs_exhausted, d.total, d.unfinished)
    return LoadReport(
        models=models,
        stable=stable and measured >= stable_windows,
        windows=measured,
        stable_windows=stable_windows,
        warmup_s=float(warmup_s),
        window_s=float(window_s),
        tolerance=float(tolerance),
        elapsed_s=(time.perf_counter_ns() - t_start) / 1e9,
        unfinished=sum(d.unfinished for d in drivers.values()),
        target=rt.url if isinstance(rt, RemoteTarget) else None,
    )


def _sleep_until(t_ns: int, abort: threading.Event) -> None:
    while True:
        left = (t_ns - time.perf_counter_ns()) / 1e9
        if left <= 0 or abort.wait(left):
            return


def _await_drivers(drivers: Mapping[str, _Driver], t_ns: int) -> None:
    # Give each driver a moment to account for completions stamped before the boundary, so
    # the stability check sees whole windows. The final report re-reads the windows after
    # the drivers stopped, so this only affects when the run stops, never the figures.
    deadline = time.perf_counter_ns() + 50_000_000
    for d in drivers.values():
        while d.caught_up_ns < t_ns and not d.stop.is_set() and time.perf_counter_ns() < deadline:
            d.wake()
            time.sleep(0.0005)


def _snapshot(rt: Runtime | RemoteTarget, drivers: Mapping[str, _Driver]) -> dict[str, ModelStats]:
    stats = rt.stats()
    return {n: stats[n] for n in drivers if n in stats}
