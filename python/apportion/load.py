"""Load generator: drive models of a running :class:`~apportion.Runtime` and measure them.

perf_analyzer-style measurement for the models of a runtime the caller built::

    import apportion as ap
    from apportion import load

    report = load.run(rt, [
        load.ModelLoad("ranker", concurrency=4, inputs=make_query,
                       slo=load.SLO(latency_ms=20, percentile=99)),
        load.ModelLoad("echo", rate=500.0, inputs=[b"a", b"b"]),
    ], warmup_s=1.0, window_s=1.0, tolerance=0.1, max_s=30.0)
    print(report)                 # one table row per model
    report.to_json()              # the same, machine-readable

Each model gets either

- a **closed loop** (``concurrency=N``): N requests outstanding at all times; a completion
  lets the next one in. Throughput then reflects the model's capacity at that concurrency.
- an **open loop** (``rate=R``): arrivals at R per second (Poisson by default), scheduled at
  absolute times so that a late submission never shifts the ones after it. An arrival the
  runtime refuses (``QueueFull``) is counted as rejected and dropped, never retried: an open
  loop models independent clients, and retrying would hide overload.

After ``warmup_s`` the run is cut into windows of ``window_s``. It stops as soon as the last
``stable_windows`` windows agree, for every model, on throughput and p99 end-to-end latency
within ``tolerance`` (each window within that fraction of their mean), or when ``max_s``
would be exceeded. The report aggregates those last windows and says whether they were stable.

Where figures come from:

- end-to-end latency is measured here, per request, from just before ``submit`` to the
  moment the request's done-callback runs (exact percentiles over the reported windows);
- goodput counts completions whose end-to-end latency met the model's SLO;
- queue wait and compute come from the runtime's own histograms (``rt.stats()``): their means
  over the reported windows are exact (differences of counts and sums); their percentiles are
  the runtime's cumulative ones (since the model was added, warm-up included), because the
  runtime exposes percentiles, not histogram buckets that could be subtracted.

One driver thread per model submits requests and accounts for completions; a request's
done-callback (run by the worker that completed it) only stamps the time and hands the future
to that driver, so the model's worker spends well under a microsecond of Python per request
on the generator's behalf.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import ApportionError, DeadlineExceeded, ModelNotFound, QueueFull, RuntimeClosed
from .stats import LatencyStats, ModelStats

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "SLO",
    "LoadError",
    "LoadReport",
    "ModelLoad",
    "ModelReport",
    "WindowStats",
    "model_load",
    "parse_spec",
    "run",
    "windows_stable",
]

Arrivals = Literal["poisson", "constant"]


class LoadError(ApportionError, ValueError):
    """An invalid load description or setting. The message names the model (where there is
    one), the field and what would be valid."""


# -- description ------------------------------------------------------------------------------


def _positive_number(owner: str, fname: str, value: object, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoadError(f"{owner}: {fname} must be a positive number, got {value!r}")
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise LoadError(f"{owner}: {fname} must be a positive, finite number, got {value!r}")
    return v


@dataclass(frozen=True, slots=True)
class SLO:
    """A model's service-level objective.

    ``latency_ms``: the end-to-end latency a request must meet to count towards goodput; the
    model meets its SLO when the ``percentile`` of end-to-end latency is within it (e.g.
    ``SLO(latency_ms=20, percentile=99)`` is "p99 <= 20 ms").
    ``timeout_ms``: passed to every ``submit`` as the request's deadline (a request that has
    not started by then expires without running). With no ``latency_ms``, goodput counts
    completions within ``timeout_ms``.
    """

    latency_ms: float | None = None
    percentile: float = 99.0
    timeout_ms: float | None = None

    def validate(self, model: str) -> None:
        owner = f"model {model!r}"
        _positive_number(owner, "slo.latency_ms", self.latency_ms, allow_none=True)
        _positive_number(owner, "slo.timeout_ms", self.timeout_ms, allow_none=True)
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < float(p) <= 100):
            raise LoadError(f"{owner}: slo.percentile must be in (0, 100], got {p!r}")
        if self.latency_ms is None and self.timeout_ms is None:
            raise LoadError(f"{owner}: slo needs latency_ms and/or timeout_ms (both are None)")

    @property
    def good_ms(self) -> float | None:
        """The end-to-end latency a completion must meet to count as good."""
        return self.latency_ms if self.latency_ms is not None else self.timeout_ms


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """The load put on one model: exactly one of ``concurrency`` (closed loop) or ``rate``
    (open loop, requests per second).

    ``inputs``: what each request carries. A zero-argument callable is called once per
    request (in the model's driver thread; raising StopIteration ends the load); a sequence
    (list, tuple) is cycled through; any other iterable is consumed once, and when it runs
    dry the model's load stops (the report says so). None sends ``None``.
    ``arrivals``: for an open loop, ``"poisson"`` (exponential gaps, like independent clients)
    or ``"constant"`` (evenly spaced).
    ``priority``: passed to ``submit``.
    """

    model: str
    concurrency: int | None = None
    rate: float | None = None
    inputs: Callable[[], Any] | Iterable[Any] | None = None
    slo: SLO | None = None
    arrivals: Arrivals = "poisson"
    priority: int | None = None

    @property
    def mode(self) -> Literal["closed", "open"]:
        return "closed" if self.concurrency is not None else "open"

    def describe(self) -> str:
        """Short label: ``closed x4`` or ``open 200/s``."""
        if self.concurrency is not None:
            return f"closed x{self.concurrency}"
        return f"open {self.rate:g}/s" + ("" if self.arrivals == "poisson" else f" {self.arrivals}")

    def validate(self, models: Sequence[str]) -> None:
        """Raises ModelNotFound or LoadError (naming the model and the field)."""
        if not isinstance(self.model, str):
            raise LoadError(f"ModelLoad: model must be a model name (str), got {self.model!r}")
        owner = f"model {self.model!r}"
        if self.model not in models:
            raise ModelNotFound(
                f"{owner}: field 'model': no such model in the runtime (registered: {list(models)})"
            )
        if (self.concurrency is None) == (self.rate is None):
            raise LoadError(
                f"{owner}: give exactly one of concurrency (closed loop) or rate (open loop), "
                f"got concurrency={self.concurrency!r}, rate={self.rate!r}"
            )
        if self.concurrency is not None:
            c = self.concurrency
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise LoadError(f"{owner}: concurrency must be an integer >= 1, got {c!r}")
        else:
            _positive_number(owner, "rate (requests per second)", self.rate)
        if self.arrivals not in ("poisson", "constant"):
            raise LoadError(f"{owner}: arrivals must be 'poisson' or 'constant', got {self.arrivals!r}")
        if self.slo is not None:
            if not isinstance(self.slo, SLO):
                raise LoadError(f"{owner}: slo must be apportion.load.SLO(...) or None, got {self.slo!r}")
            self.slo.validate(self.model)
        if self.priority is not None and (isinstance(self.priority, bool) or not isinstance(self.priority, int)):
            raise LoadError(f"{owner}: priority must be an integer or None, got {self.priority!r}")
        if self.inputs is not None and not callable(self.inputs) and not isinstance(self.inputs, Iterable):
            raise LoadError(
                f"{owner}: inputs must be a zero-argument callable, an iterable or None, "
                f"got {type(self.inputs).__name__}"
            )


# Flat keys of a load as a config table or a command line gives them, with their types.
SPEC_KEYS: dict[str, type] = {
    "concurrency": int,
    "rate": float,
    "arrivals": str,
    "priority": int,
    "latency_ms": float,
    "percentile": float,
    "timeout_ms": float,
}


def model_load(model: str, settings: Mapping[str, Any], *, inputs: Any = None) -> ModelLoad:
    """A :class:`ModelLoad` from flat keys (a TOML table, parsed command-line options):
    ``concurrency`` or ``rate``, ``arrivals``, ``priority``, and the SLO's ``latency_ms``,
    ``percentile``, ``timeout_ms``. String values are converted (``"4"`` -> 4). Raises
    LoadError naming the model, the key and what is allowed; the result is validated against
    the runtime by :func:`run`.
    """
    values: dict[str, Any] = {}
    for key, raw in settings.items():
        kind = SPEC_KEYS.get(key)
        if kind is None:
            raise LoadError(f"model {model!r}: unknown key {key!r}; allowed: {', '.join(SPEC_KEYS)}")
        if isinstance(raw, str) and kind is not str:
            try:
                raw = kind(raw)
            except ValueError:
                raise LoadError(
                    f"model {model!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                    f"got {raw!r}"
                ) from None
        elif kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        values[key] = raw
    slo_keys = {k: values.pop(k) for k in ("latency_ms", "percentile", "timeout_ms") if k in values}
    slo = SLO(**slo_keys) if slo_keys else None
    if slo is not None:
        slo.validate(model)
    return ModelLoad(model, inputs=inputs, slo=slo, **values)


def parse_spec(text: str) -> ModelLoad:
    """A :class:`ModelLoad` from ``NAME:key=value,...`` as a command line gives it, e.g.
    ``ranker:concurrency=4,latency_ms=20`` or ``echo:rate=500,timeout_ms=50`` (keys as in
    :func:`model_load`)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name or not sep or not rest.strip():
        raise LoadError(
            f"load spec {text!r}: expected NAME:key=value[,key=value...], "
            "e.g. 'ranker:concurrency=4' or 'echo:rate=500,latency_ms=20'"
        )
    settings: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise LoadError(f"model {name!r}: load spec part {part!r} is not key=value")
        settings[key.strip()] = value.strip()
    return model_load(name, settings)


# -- report -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One measurement window of one model, as the stability check saw it."""

    index: int
    throughput: float
    """Completions per second."""
    goodput: float
    p99_ms: float | None
    """End-to-end p99; None when nothing completed in the window."""
    rejected: int
    expired: int
    failed: int


@dataclass(frozen=True, slots=True)
class ModelReport:
    """One model's figures over the reported windows (the last ``stable_windows``)."""

    model: str
    load: str
    """``closed x4`` or ``open 200/s``."""
    mode: Literal["closed", "open"]
    concurrency: int | None
    rate: float | None
    slo: SLO | None
    duration_s: float
    offered: int
    """Submission attempts (accepted or rejected)."""
    submitted: int
    """Attempts the runtime accepted."""
    completed: int
    """Requests that returned a result."""
    good: int
    """Completions within the SLO latency (all completions when there is no SLO)."""
    rejected: int
    """Attempts refused with QueueFull."""
    expired: int
    """Requests that completed with DeadlineExceeded."""
    failed: int
    """Requests that raised the model's exception."""
    cancelled: int
    throughput: float
    """Completions per second."""
    goodput: float
    """Good completions per second."""
    offered_rate: float
    """Attempts per second (an open loop's rate as actually achieved)."""
    latency: LatencyStats | None
    """End to end, measured by the generator; None when nothing completed."""
    queue_wait_mean_ms: float | None
    compute_mean_ms: float | None
    queue_wait: LatencyStats
    """The runtime's cumulative queue-wait histogram at the end (see module docs)."""
    compute: LatencyStats
    """The runtime's cumulative compute histogram at the end (see module docs)."""
    slo_met: bool | None
    """Whether the SLO percentile of end-to-end latency met ``slo.latency_ms``; None without
    a latency objective or without completions."""
    stable: bool
    windows: tuple[WindowStats, ...]
    """Every measured window (warm-up excluded), oldest first."""
    schedule_lag_p99_ms: float | None = None
    """Open loop: p99 of how late submissions were against their schedule (large values mean
    the generator, not the model, limited the offered load)."""
    inputs_exhausted: bool = False


@dataclass(frozen=True, slots=True)
class LoadReport(Mapping[str, ModelReport]):
    """The result of :func:`run`: a mapping of model name to :class:`ModelReport`.

    ``str()`` is a readable table; ``to_dict()``/``to_json()`` the machine-readable form.
    """

    models: dict[str, ModelReport]
    stable: bool
    """Whether every model's last ``stable_windows`` windows agreed within ``tolerance``."""
    windows: int
    """Measurement windows run (warm-up excluded)."""
    stable_windows: int
    warmup_s: float
    window_s: float
    tolerance: float
    elapsed_s: float
    unfinished: int = 0
    """Requests still running when the generator gave up waiting for them at the end."""

    def __getitem__(self, name: str) -> ModelReport:
        return self.models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def throughput(self) -> float:
        return sum(m.throughput for m in self.models.values())

    @property
    def goodput(self) -> float:
        return sum(m.goodput for m in self.models.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["throughput"] = self.throughput
        d["goodput"] = self.goodput
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        verdict = (
            f"stable after {self.windows} windows of {self.window_s:g} s "
            f"(last {self.stable_windows} within {self.tolerance:.0%})"
            if self.stable
            else f"NOT stable: time limit after {self.windows} windows of {self.window_s:g} s "
            f"(reporting the last {self.stable_windows})"
        )
        header = ("model", "load", "req/s", "good/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                  "queue ms", "compute ms", "rejected", "expired", "failed", "SLO")
        rows = [header]
        for m in self.models.values():
            e = m.latency
            rows.append((
                m.model, m.load, f"{m.throughput:.1f}", f"{m.goodput:.1f}",
                *(("-",) * 4 if e is None else
                  (f"{e.p50_ms:.3f}", f"{e.p90_ms:.3f}", f"{e.p99_ms:.3f}", f"{e.p999_ms:.3f}")),
                _fmt_ms(m.queue_wait_mean_ms), _fmt_ms(m.compute_mean_ms),
                str(m.rejected), str(m.expired), str(m.failed), _slo_cell(m),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [verdict]
        for n, r in enumerate(rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(f"total: {self.throughput:.1f} req/s, goodput {self.goodput:.1f}/s "
                     "(queue and compute are means)")
        return "\n".join(lines)


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _slo_cell(m: ModelReport) -> str:
    if m.slo is None or m.slo.latency_ms is None:
        return "-"
    verdict = "?" if m.slo_met is None else ("met" if m.slo_met else "MISSED")
    return f"p{m.slo.percentile:g}<={m.slo.latency_ms:g}ms {verdict}"


# -- statistics -------------------------------------------------------------------------------


def _percentile(sorted_ns: Sequence[int], p: float) -> int:
    # Nearest rank: the smallest sample with at least p% of samples at or below it.
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ns)))
    return sorted_ns[min(rank, len(sorted_ns)) - 1]


def _latency(samples_ns: list[int]) -> LatencyStats | None:
    if not samples_ns:
        return None
    s = sorted(samples_ns)
    return LatencyStats(
        count=len(s),
        mean_ms=sum(s) / len(s) / 1e6,
        p50_ms=_percentile(s, 50) / 1e6,
        p90_ms=_percentile(s, 90) / 1e6,
        p99_ms=_percentile(s, 99) / 1e6,
        p999_ms=_percentile(s, 99.9) / 1e6,
        max_ms=s[-1] / 1e6,
    )


def _within(values: Sequence[float], tolerance: float) -> bool:
    """Every value within ``tolerance`` (a fraction) of the values' mean."""
    mean = sum(values) / len(values)
    if mean == 0:
        return all(v == 0 for v in values)
    return max(abs(v - mean) for v in values) <= tolerance * mean


def windows_stable(windows: Sequence[WindowStats], count: int, tolerance: float) -> bool:
    """Whether the last ``count`` windows agree on throughput and p99 within ``tolerance``.

    Windows where nothing completed have no p99: they agree only with other such windows.
    """
    if len(windows) < count:
        return False
    last = windows[-count:]
    if not _within([w.throughput for w in last], tolerance):
        return False
    p99s = [w.p99_ms for w in last]
    if any(p is None for p in p99s):
        return all(p is None for p in p99s)
    return _within([p for p in p99s if p is not None], tolerance)


# -- driving ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Acc:
    """One model's tallies for one window; written only by that model's driver thread."""

    offered: int = 0
    submitted: int = 0
    rejected: int = 0
    completed: int = 0
    good: int = 0
    expired: int = 0
    failed: int = 0
    cancelled: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    lags_ns: list[int] = field(default_factory=list)


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
        self.windows: dict[int, _Acc] = {}
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

    def _acc(self, t_ns: int) -> _Acc | None:
        index = (t_ns - self.clock0_ns) // self.window_ns
        if index < 0:
            return None
        acc = self.windows.get(index)
        if acc is None:
            acc = self.windows[index] = _Acc()
        return acc

    # The callback runs in the model's worker thread: stamp the time and hand over, nothing
    # more (SimpleQueue.put never blocks and never raises).
    def _callback(self, seq: int, t0: int) -> Callable[[Any], None]:
        put = self._done.put
        clock = time.perf_counter_ns
        return lambda fut: put((seq, t0, clock(), fut))

    def _submit(self, scheduled_ns: int | None = None) -> bool:
        """One attempt. Returns False when it was rejected."""
        try:
            x = self._next_input()
        except StopIteration:
            self.inputs_exhausted = True
            self.stop.set()
            return False
        t0 = time.perf_counter_ns()
        acc = self._acc(t0)
        if acc is not None:
            acc.offered += 1
            if scheduled_ns is not None:
                acc.lags_ns.append(max(0, t0 - scheduled_ns))
        try:
            fut = self.rt.submit(self.spec.model, x, timeout_ms=self._timeout_ms, priority=self.spec.priority)
        except QueueFull:
            if acc is not None:
                acc.rejected += 1
            return False
        if acc is not None:
            acc.submitted += 1
        seq = self._seq
        self._seq += 1
        self._pending[seq] = fut
        fut.add_done_callback(self._callback(seq, t0))
        return True

    def _complete(self, item: _Completion) -> None:
        seq, t0, t1, fut = item
        self._pending.pop(seq, None)
        acc = self._acc(t1)
        if acc is None:
            return
        if fut.cancelled():
            acc.cancelled += 1
            return
        exc = fut.exception()
        if exc is None:
            latency = t1 - t0
            acc.completed += 1
            acc.latencies_ns.append(latency)
            if self._good_ns is None or latency <= self._good_ns:
                acc.good += 1
        elif isinstance(exc, DeadlineExceeded):
            acc.expired += 1
        else:
            acc.failed += 1

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

    def _main(self) -> None:
        try:
            if self.spec.concurrency is not None:
                self._closed_loop(self.spec.concurrency)
            else:
                assert self.spec.rate is not None
                self._open_loop(self.spec.rate)
        except BaseException as e:  # noqa: BLE001 - handed to run(), which re-raises it
            if isinstance(e, Exception):
                e.add_note(f"apportion.load: raised while driving model {self.spec.model!r}")
            self.error = e
            self.abort.set()
        finally:
            self._finish()

    def _closed_loop(self, concurrency: int) -> None:
        while not self.stop.is_set():
            rejected = False
            while len(self._pending) < concurrency and not self.stop.is_set():
                if not self._submit():
                    rejected = True
                    break
            # After a rejection nothing may complete soon (the queue is full of someone
            # else's work): retry the slot after a short pause rather than spin.
            self._wait(0.001 if rejected else 0.05)

    def _open_loop(self, rate: float) -> None:
        gap = (lambda: self.rng.expovariate(rate)) if self.spec.arrivals == "poisson" else (lambda: 1.0 / rate)
        # Arrival times are accumulated in float seconds from a fixed origin and never
        # re-based on "now", so submission delays do not push later arrivals back.
        origin = time.perf_counter_ns()
        offset_s = gap()
        while not self.stop.is_set():
            due = origin + int(offset_s * 1e9)
            now = time.perf_counter_ns()
            if now < due:
                self._wait((due - now) / 1e9)
                continue
            self._submit(scheduled_ns=due)
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


def _summarise_window(acc: _Acc | None, index: int, window_s: float) -> WindowStats:
    acc = acc or _Acc()
    lat = sorted(acc.latencies_ns)
    return WindowStats(
        index=index,
        throughput=acc.completed / window_s,
        goodput=acc.good / window_s,
        p99_ms=_percentile(lat, 99) / 1e6 if lat else None,
        rejected=acc.rejected,
        expired=acc.expired,
        failed=acc.failed,
    )


def _mean_delta_ms(before: LatencyStats, after: LatencyStats) -> float | None:
    n = after.count - before.count
    if n <= 0:
        return None
    return (after.mean_ms * after.count - before.mean_ms * before.count) / n


def _validate_settings(warmup_s: object, window_s: object, stable_windows: object,
                       tolerance: object, max_s: object, drain_timeout_s: object) -> None:
    def number(fname: str, v: object, minimum: float, inclusive: bool) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
                or (float(v) < minimum if inclusive else float(v) <= minimum):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise LoadError(f"load.run: {fname} must be a finite number {bound}, got {v!r}")
        return float(v)

    w = number("warmup_s", warmup_s, 0.0, True)
    win = number("window_s", window_s, 0.0, False)
    number("tolerance", tolerance, 0.0, False)
    m = number("max_s", max_s, 0.0, False)
    number("drain_timeout_s", drain_timeout_s, 0.0, True)
    if isinstance(stable_windows, bool) or not isinstance(stable_windows, int) or stable_windows < 1:
        raise LoadError(f"load.run: stable_windows must be an integer >= 1, got {stable_windows!r}")
    needed = w + stable_windows * win
    if m < needed - 1e-9:
        raise LoadError(
            f"load.run: max_s={m:g} leaves no room for warmup_s + stable_windows * window_s "
            f"= {needed:g} s; raise max_s to at least {needed:g}"
        )


def run(
    rt: Runtime,
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

    ``rt``: an :class:`apportion.Runtime` the caller built and started; models not named in
    ``loads`` keep serving whatever else is sent to them. ``warmup_s`` of load is discarded
    first; then windows of ``window_s`` run until the last ``stable_windows`` agree within
    ``tolerance`` (a fraction, 0.1 = 10%) on every model's throughput and p99, or until
    another window would end after ``max_s`` (counted from the start, warm-up included).
    ``seed`` makes Poisson arrivals repeatable. ``on_window(index, {model: WindowStats})`` is
    called from this thread after each window (progress display, early stop by raising).
    At the end, requests still queued are cancelled and running ones are waited for (up to
    ``drain_timeout_s``); neither counts in the report.

    Returns a :class:`LoadReport`. Raises ModelNotFound or LoadError for invalid input (before
    any request is sent), RuntimeClosed for a runtime that is not serving, and re-raises an
    exception from an ``inputs`` callable (with a note naming the model).
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
    _validate_settings(warmup_s, window_s, stable_windows, tolerance, max_s, drain_timeout_s)
    if getattr(rt, "closed", False):
        raise RuntimeClosed("load.run: the runtime is closed")
    if not getattr(rt, "started", True):
        raise RuntimeClosed("load.run: the runtime is not started; call rt.start() first")
    registered = list(rt.models)
    for s in specs:
        s.validate(registered)
        if isinstance(s.inputs, Sequence) and not isinstance(s.inputs, (str, bytes)) and not s.inputs:
            raise LoadError(f"model {s.model!r}: inputs is an empty sequence")

    window_ns = int(window_s * 1e9)
    master = random.Random(seed)
    abort = threading.Event()
    t_start = time.perf_counter_ns()
    clock0 = t_start + int(warmup_s * 1e9)
    limit = t_start + int(max_s * 1e9)
    drivers = {
        s.model: _Driver(rt, s, clock0, window_ns, random.Random(master.getrandbits(64)), abort)
        for s in specs
    }
    for d in drivers.values():
        d.drain_timeout_s = float(drain_timeout_s)

    history: dict[str, list[WindowStats]] = {n: [] for n in drivers}
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
            current = {
                n: _summarise_window(d.windows.get(measured), measured, window_s)
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
        accs = [d.windows.get(i) or _Acc() for i in reported]
        for i, acc in zip(reported, accs):
            history[n][i] = _summarise_window(acc, i, window_s)
        models[n] = _model_report(d.spec, accs, duration_s, history[n],
                                  windows_stable(history[n], stable_windows, tolerance),
                                  snapshots[first] if snapshots else None,
                                  snapshots[measured] if len(snapshots) > measured else None,
                                  end_stats[n], d.inputs_exhausted)
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


def _snapshot(rt: Runtime, drivers: Mapping[str, _Driver]) -> dict[str, ModelStats]:
    stats = rt.stats()
    return {n: stats[n] for n in drivers if n in stats}


def _model_report(spec: ModelLoad, accs: list[_Acc], duration_s: float, history: list[WindowStats],
                  stable: bool, before: Mapping[str, ModelStats] | None,
                  after: Mapping[str, ModelStats] | None, end: ModelStats,
                  inputs_exhausted: bool) -> ModelReport:
    latencies = [x for a in accs for x in a.latencies_ns]
    lags = sorted(x for a in accs for x in a.lags_ns)
    latency = _latency(latencies)
    completed = sum(a.completed for a in accs)
    good = sum(a.good for a in accs)
    offered = sum(a.offered for a in accs)
    slo = spec.slo
    slo_met: bool | None = None
    if slo is not None and slo.latency_ms is not None and latencies:
        slo_met = _percentile(sorted(latencies), slo.percentile) <= slo.latency_ms * 1e6
    q_mean = c_mean = None
    if before is not None and after is not None and spec.model in before and spec.model in after:
        b, a = before[spec.model], after[spec.model]
        q_mean = _mean_delta_ms(b.queue_wait, a.queue_wait)
        c_mean = _mean_delta_ms(b.compute, a.compute)
    return ModelReport(
        model=spec.model,
        load=spec.describe(),
        mode=spec.mode,
        concurrency=spec.concurrency,
        rate=None if spec.rate is None else float(spec.rate),
        slo=slo,
        duration_s=duration_s,
        offered=offered,
        submitted=sum(a.submitted for a in accs),
        completed=completed,
        good=good,
        rejected=sum(a.rejected for a in accs),
        expired=sum(a.expired for a in accs),
        failed=sum(a.failed for a in accs),
        cancelled=sum(a.cancelled for a in accs),
        throughput=completed / duration_s if duration_s else 0.0,
        goodput=good / duration_s if duration_s else 0.0,
        offered_rate=offered / duration_s if duration_s else 0.0,
        latency=latency,
        queue_wait_mean_ms=q_mean,
        compute_mean_ms=c_mean,
        queue_wait=end.queue_wait,
        compute=end.compute,
        slo_met=slo_met,
        stable=stable,
        windows=tuple(history),
        schedule_lag_p99_ms=_percentile(lags, 99) / 1e6 if lags else None,
        inputs_exhausted=inputs_exhausted,
    )
