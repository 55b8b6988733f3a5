"""Runtime stats in the Prometheus text format, for a ``GET /metrics`` endpoint.

``prometheus_text(rt.stats())`` renders every model's counters, gauges and latency histograms;
:class:`StatsCollector` does the same for a ``prometheus_client`` registry of the caller's. The
histograms are the runtime's own buckets (not re-sampled): each ``le`` bound is the largest
value of one of the native log buckets, so every cumulative count is exact, and ``_sum`` and
``_count`` are the native sum and count. The native sum is a 64-bit count of nanoseconds, which
a backlogged model's queue waits can wrap within weeks; a :class:`StatsCollector` kept across
scrapes (as ``apportion serve`` keeps one) carries ``_sum`` on across the wrap, so it never
goes down while the model stays registered. Needs ``prometheus_client`` (``pip install
'apportion[serve]'``).

Metric names (each with a ``model`` label but the controller's ``running``, ``errors_total``,
``idle_cpus`` and ``outside_cpus``; README "Stats, windows and Prometheus metrics" lists them with a sample):

- ``apportion_requests_total{outcome}``: finished requests by outcome (completed, failed,
  rejected, expired, cancelled); ``apportion_requests_submitted_total``: every submission,
  finished or not; ``apportion_requests_delayed_total``, ``_stolen_total``, ``_direct_total``,
  ``_burst_total``: requests delayed by ``on_timeout="delay"``, taken from another NUMA node's
  queue, served by ``Runtime.call`` in the caller's thread, served by burst workers.
- ``apportion_queue_wait_seconds``, ``apportion_compute_seconds``,
  ``apportion_end_to_end_seconds``: latency histograms.
- ``apportion_batch_size``: requests per model call (histogram, unit: requests).
- ``apportion_queue_depth``, ``apportion_in_flight``, ``apportion_running_calls``,
  ``apportion_oldest_call_seconds``, ``apportion_instances``, ``apportion_max_queue``: gauges
  (requests, calls, seconds, instances); ``apportion_gpu_memory_bytes`` for
  models with a GPU memory budget.
- ``apportion_shared_pool_calls_total`` and ``apportion_shared_pool_seconds_total``: calls on
  the scheduled shared pool and the pool time they held (seconds x units, as ``pool_time_s``).
- ``apportion_process_restarts_total``: worker processes started again after one died, for
  models of ``isolation="process"``.
- ``apportion_model_moves_total``: live moves of the model (``rt.apply``, the online
  controller), as ``moves`` of its stats.
- ``apportion_model_cpu_seconds_total``: CPU time of each model's worker threads and the
  threads they created (:class:`CpuCollector`, from ``rt.cpu_seconds()``).
- ``apportion_controller_*`` once an online controller was started on the runtime
  (:class:`ControllerCollector`, from ``rt.controller``): ``running`` and ``errors_total``,
  ``idle_cpus`` of the shared pool and ``outside_cpus``, those other processes kept busy; per
  model it manages ``objective_seconds{percentile}``, over the last window
  ``window_latency_seconds`` (at the objective's percentile),
  ``window_arrivals_per_second`` and ``window_within_objective_ratio``; ``at_risk_windows``,
  ``on_trial``, and the counters ``moves_total``, ``undone_moves_total`` and
  ``held_windows_total``.
- ``apportion_server_requests_total{model,protocol,status}`` on a server's page
  (:class:`ServerCollector`): the infer requests its protocol fronts answered, by status.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("apportion.metrics needs prometheus_client: pip install 'apportion[serve]'") from e

from .errors import QuotaError
from .stats import HistogramSnapshot, ModelStats

_T = TypeVar("_T")

__all__ = ["CONTENT_TYPE", "ControllerCollector", "CpuCollector", "RuntimeMetrics", "ServerCollector",
           "StatsCollector", "latency_bounds_ns", "prometheus_text"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Content-Type header value for :func:`prometheus_text`'s output."""

_OUTCOMES = ("completed", "failed", "rejected", "expired", "cancelled")
_BATCH_BOUNDS = (1, 2, 4, 8, 16, 32) + tuple(2**k - 1 for k in range(6, 17))
# Batch sizes below 64 have buckets of their own, so 1..32 are exact bounds; above, a bound
# must be the top of a native bucket (2**k - 1 always is).


def latency_bounds_ns(per_octave: int = 2, low_exp: int = 10, high_exp: int = 36) -> tuple[int, ...]:
    """The ``le`` bounds (ns) of the latency histograms: ``per_octave`` bounds per power of two
    from ``2**low_exp`` ns to ``2**high_exp`` ns (default ~1 us to ~69 s, steps of x1.5/x1.33).
    Each is the largest value of a native bucket (``2**e * (1 + j / per_octave) - 1``), so the
    cumulative count up to it is exact. ``per_octave`` must divide 32 (the native buckets per
    power of two)."""
    if per_octave not in (1, 2, 4, 8, 16, 32):
        raise QuotaError(f"per_octave must divide 32 (1, 2, 4, 8, 16 or 32), got {per_octave!r}")
    if not 5 <= low_exp < high_exp <= 44:
        raise QuotaError(f"need 5 <= low_exp < high_exp <= 44, got {low_exp}, {high_exp}")
    bounds = [2**e + j * (2**e // per_octave) - 1 for e in range(low_exp, high_exp) for j in range(per_octave)]
    return (*bounds, 2**high_exp - 1)


def _cumulative(hist: HistogramSnapshot, bounds: Sequence[int], per_unit: float) -> list[tuple[str, float]]:
    """(le, values <= le) for each bound (in the native unit; ``le`` is it / ``per_unit``),
    then +Inf: exact, from the native buckets."""
    upper = hist.upper_bounds
    running = list(itertools.accumulate(hist.counts))
    out = []
    for b in bounds:
        i = bisect.bisect_right(upper, b) - 1
        if upper[i] != b:
            raise QuotaError(f"histogram bound {b} is not the top of a native bucket (nearest below: {upper[i]})")
        out.append((floatToGoString(b / per_unit), float(running[i])))
    out.append(("+Inf", float(hist.count)))
    return out


class _Sums:
    """Each histogram's native sum (uint64, modulo 2**64) carried on across its wrap from one
    scrape to the next (the caller serialises the scrapes: each reads its stats and totals
    them before the next, so none is older than the one before). A count that went down is a
    new series: the model removed and added again. A sum that went down with the count up
    is a wrap when the growth modulo 2**64 is what the new values could add (at most their
    count times the largest value), and a new series otherwise."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[int, int, int]] = {}  # (raw sum, count, total)

    def total(self, key: tuple[str, str], hist: HistogramSnapshot) -> int:
        raw, count = int(hist.sum), int(hist.count)
        prev = self._seen.get(key)
        if prev is None or count < prev[1]:
            total = raw
        elif raw >= prev[0]:
            total = prev[2] + raw - prev[0]
        elif (raw - prev[0]) % 2**64 <= (count - prev[1]) * int(hist.max):
            total = prev[2] + (raw - prev[0]) % 2**64
        else:
            total = raw
        self._seen[key] = (raw, count, total)
        return total

    def keep(self, models: set[str]) -> None:
        """Forgets the series of models no longer reported."""
        for key in [k for k in self._seen if k[0] not in models]:
            del self._seen[key]


class StatsCollector(Collector):
    """A ``prometheus_client`` collector of a runtime's stats: register it in a registry and
    each scrape calls ``source()`` (e.g. ``rt.stats``) once and renders what it returns. Keep
    one across scrapes: it carries each histogram's ``_sum`` on across the native sum's wrap.

    ``per_octave``: latency buckets per power of two (see :func:`latency_bounds_ns`)."""

    def __init__(self, source: Callable[[], Mapping[str, ModelStats]], *, per_octave: int = 2) -> None:
        self._source = source
        self._latency_bounds = latency_bounds_ns(per_octave)
        self._sums = _Sums()
        # Scrapes one at a time: two at once (two Prometheus replicas) could total an older
        # reading after a newer one, which reads as a new series and loses the carry.
        self._scrape = threading.Lock()

    def describe(self) -> list[Metric]:
        # Nothing to check at registration: reading the stats there would be a scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        with self._scrape:
            metrics = list(self._collect(self._source()))
        yield from metrics

    def _collect(self, stats: Mapping[str, ModelStats]) -> Iterator[Metric]:
        m = ["model"]

        def counter(name: str, doc: str, labels: Sequence[str] = m) -> CounterMetricFamily:
            return CounterMetricFamily(f"apportion_{name}", doc, labels=labels)

        requests = counter("requests", "Finished requests by outcome.", ["model", "outcome"])
        submitted = counter("requests_submitted", "Requests submitted (finished or not).")
        delayed = counter("requests_delayed", 'Requests moved behind the others by on_timeout="delay".')
        stolen = counter("requests_stolen", "Requests an instance took from another NUMA node's queue.")
        direct = counter("requests_direct", "Requests served by Runtime.call in the calling thread.")
        burst = counter("requests_burst", "Requests served by burst workers on the shared pool.")
        pool_calls = counter("shared_pool_calls", "Model calls that ran on the scheduled shared pool.")
        moves = counter("model_moves", "Times the model moved while it served (Runtime.apply, the online "
                        "controller): new instances, threads, cores or batching; a new admission bound alone "
                        "is no move.")
        pool_s = counter("shared_pool_seconds",
                         "Shared-pool time held by those calls: call seconds x units (intra-op threads).")
        depth = GaugeMetricFamily("apportion_queue_depth",
                                  "Queue slots taken: requests waiting, plus cancelled or expired ones "
                                  "beyond the queue's spare room that no worker has passed yet.", labels=m)
        in_flight = GaugeMetricFamily("apportion_in_flight", "Requests submitted and not finished "
                                      "(queued or running).", labels=m)
        instances = GaugeMetricFamily("apportion_instances", "Worker instances of the model.", labels=m)
        running = GaugeMetricFamily("apportion_running_calls", "Model calls the workers are in now.", labels=m)
        oldest = GaugeMetricFamily("apportion_oldest_call_seconds", "How long the oldest running model call has "
                                   "run (0: none runs).", labels=m)
        max_queue = GaugeMetricFamily("apportion_max_queue", "Admission bound (requests).", labels=m)
        gpu = GaugeMetricFamily("apportion_gpu_memory_bytes", "GPU memory the model's pool holds.", labels=m)
        restarts = counter("process_restarts", "Worker processes started again after one died (models of "
                           'isolation="process").')
        latencies = {
            "queue_wait": HistogramMetricFamily(
                "apportion_queue_wait_seconds", "Time from admission to the start of the call.", labels=m),
            "compute": HistogramMetricFamily(
                "apportion_compute_seconds", "Duration of the model call that served each request.", labels=m),
            "end_to_end": HistogramMetricFamily(
                "apportion_end_to_end_seconds", "Time from admission to completion.", labels=m),
        }
        batch = HistogramMetricFamily("apportion_batch_size", "Requests per model call.", labels=m)

        for name, s in stats.items():
            for outcome in _OUTCOMES:
                requests.add_metric([name, outcome], getattr(s, outcome))
            submitted.add_metric([name], s.submitted)
            delayed.add_metric([name], s.delayed)
            stolen.add_metric([name], s.stolen)
            direct.add_metric([name], s.direct)
            burst.add_metric([name], s.burst_served)
            pool_calls.add_metric([name], s.pool_calls)
            pool_s.add_metric([name], s.pool_time_s)
            moves.add_metric([name], s.moves)
            depth.add_metric([name], s.queued)
            in_flight.add_metric([name], s.in_flight)
            instances.add_metric([name], s.instances)
            running.add_metric([name], s.running_calls)
            oldest.add_metric([name], s.oldest_call_s)
            max_queue.add_metric([name], s.max_queue)
            if s.gpu_memory_bytes is not None:
                gpu.add_metric([name], s.gpu_memory_bytes)
            if s.process_restarts is not None:
                restarts.add_metric([name], s.process_restarts)
            for field, family in latencies.items():
                hist = getattr(s, field).histogram
                if hist is not None:
                    family.add_metric([name], _cumulative(hist, self._latency_bounds, 1e9),
                                      self._sums.total((name, field), hist) / 1e9)
            if s.batch_size is not None:
                batch.add_metric([name], _cumulative(s.batch_size, _BATCH_BOUNDS, 1.0),
                                 float(self._sums.total((name, "batch_size"), s.batch_size)))
        self._sums.keep(set(stats))
        yield from (requests, submitted, delayed, stolen, direct, burst, *latencies.values(), batch, depth,
                    in_flight, running, oldest, instances, max_queue, pool_calls, pool_s, moves)
        if gpu.samples:
            yield gpu
        if restarts.samples:
            yield restarts


class _FromSource(Collector, Generic[_T]):
    """A collector of what ``source()`` gives at each scrape (nothing to read at registration:
    that would be a scrape)."""

    def __init__(self, source: Callable[[], _T]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []


class CpuCollector(_FromSource[Mapping[str, float]]):
    """``apportion_model_cpu_seconds_total{model}`` from ``source()`` (e.g.
    ``rt.cpu_seconds``): CPU time of each model's worker threads and the threads they created."""

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily("apportion_model_cpu_seconds",
                                  "CPU time (user + system) of the model's worker threads and the "
                                  "threads they created (intra-op pools).", labels=["model"])
        for name, secs in self._source().items():
            cpu.add_metric([name], float(secs))
        yield cpu


_CONTROLLER_FAMILIES: tuple[tuple[str, type[GaugeMetricFamily] | type[CounterMetricFamily], list[str], str], ...] = (
    ("running", GaugeMetricFamily, [], "1 while the online controller runs, 0 once stopped."),
    ("errors", CounterMetricFamily, [], "Failures of the controller: moves the runtime refused, windows that failed."),
    ("idle_cpus", GaugeMetricFamily, [], "CPUs of the shared pool that sat idle over the last window."),
    ("outside_cpus", GaugeMetricFamily, [],
     "CPUs of the shared pool that other processes kept busy over the last window."),
    ("objective_seconds", GaugeMetricFamily, ["model", "percentile"],
     "The model's latency objective, at the percentile it is about."),
    ("window_latency_seconds", GaugeMetricFamily, ["model"],
     "End-to-end latency at the objective's percentile over the last window (models that completed requests "
     "in it)."),
    ("window_arrivals_per_second", GaugeMetricFamily, ["model"], "Requests submitted per second over the last window."),
    ("window_within_objective_ratio", GaugeMetricFamily, ["model"],
     "Share of the last window's arrivals completed within the objective (models with arrivals in it)."),
    ("at_risk_windows", GaugeMetricFamily, ["model"],
     "Consecutive windows, up to the last, in which the model's objective was at risk."),
    ("on_trial", GaugeMetricFamily, ["model"],
     "1 while a move of the model is being judged (undone if the models serve less after it)."),
    ("moves", CounterMetricFamily, ["model"], "Moves the controller made of the model (undoings included)."),
    ("undone_moves", CounterMetricFamily, ["model"], "Moves that undid the model's move before (it served less)."),
    ("held_windows", CounterMetricFamily, ["model"],
     "Windows in which the model was at risk and no move was found for it (see Controller.held for why)."),
)
"""The controller's families: (name after ``apportion_controller_``, kind, labels, help)."""


class ControllerCollector(_FromSource["_ControllerSource | None"]):
    """``apportion_controller_*`` from ``source()`` (e.g. ``lambda: rt.controller``): the state of
    the online controller (:class:`apportion.Controller`) that moves capacity between the
    runtime's models, for the models it manages (those with an objective). Nothing while
    ``source()`` gives None (no controller was started)."""

    def collect(self) -> Iterator[Metric]:
        controller = self._source()
        if controller is None:
            return
        state = controller.stats()  # one reading, taken at once
        slos, percentiles = dict(controller.slos), dict(controller.percentiles)
        f = {key: kind(f"apportion_controller_{key}", doc, labels=labels)
             for key, kind, labels, doc in _CONTROLLER_FAMILIES}
        f["running"].add_metric([], 1.0 if state["running"] else 0.0)
        f["errors"].add_metric([], float(state["error_count"]))
        for key in ("idle_cpus", "outside_cpus"):
            if state[key] is not None:
                f[key].add_metric([], float(state[key]))
        windows, counts, trial = state["windows"], state["counts"], set(state["on_trial"])
        for name in sorted(slos):
            f["objective_seconds"].add_metric([name, f"{percentiles.get(name, 99.0):.10g}"], slos[name] / 1e3)
            w = windows.get(name)
            if w is not None:
                f["window_arrivals_per_second"].add_metric([name], w.rate)
                if w.completed > 0:
                    f["window_latency_seconds"].add_metric([name], w.objective_ms / 1e3)
                if w.arrivals > 0 and w.good is not None:
                    f["window_within_objective_ratio"].add_metric([name], min(w.good, w.arrivals) / w.arrivals)
            f["at_risk_windows"].add_metric([name], float(state["at_risk_streak"].get(name, 0)))
            f["on_trial"].add_metric([name], 1.0 if name in trial else 0.0)
            c = counts.get(name, {})
            for key, count in (("moves", "moves"), ("undone_moves", "undone"), ("held_windows", "held")):
                f[key].add_metric([name], float(c.get(count, 0)))
        # Every family, a model's with no sample too, but the idle CPUs when not measured.
        yield from (family for key, family in f.items() if key != "idle_cpus" or family.samples)


class ServerCollector(_FromSource[Mapping[tuple[str, str, str], int]]):
    """``apportion_server_requests_total{model,protocol,status}`` from ``source()``: the infer
    requests a protocol front answered, by model ("" for a name that is no served model),
    protocol ("http", "grpc") and status ("ok", "disconnected", or the error: "invalid",
    "not_found", "queue_full", "deadline", "model_failed", "output_mismatch", "unavailable",
    "too_large", "unsupported", "slow_body", "internal"). What the clients saw, beside the
    runtime's own outcomes: a request refused before it reached the runtime (a bad input, an
    unknown model) counts here only, and one whose model's result did not fit its declared
    outputs is ``completed`` for the runtime and ``output_mismatch`` here. Not counted: what
    grpc itself refuses before the front sees it (a message over the size limit, calls beyond
    the server's bound), and requests to routes other than infer."""

    def collect(self) -> Iterator[Metric]:
        answered = CounterMetricFamily("apportion_server_requests",
                                       "Infer requests the protocol front answered, by model, protocol and status "
                                       "(ok, disconnected, or the error).", labels=["model", "protocol", "status"])
        for (model, protocol, status), n in sorted(self._source().items()):
            answered.add_metric([model, protocol, status], float(n))
        yield answered


def prometheus_text(stats: Mapping[str, ModelStats], *, per_octave: int = 2,
                    cpu_seconds: Mapping[str, float] | None = None,
                    controller: _ControllerSource | None = None) -> str:
    """``stats`` (``rt.stats()``) in the Prometheus text exposition format (serve it with
    ``Content-Type: CONTENT_TYPE``); with ``cpu_seconds`` (``rt.cpu_seconds()``) also each
    model's CPU time, with ``controller`` (``rt.controller``) its state. One call sees one
    reading: each ``_sum`` is the native one, which wraps (see the module's docs); a scrape
    endpoint keeps a :class:`RuntimeMetrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(lambda: stats, per_octave=per_octave))
    if cpu_seconds is not None:
        registry.register(CpuCollector(lambda: cpu_seconds))
    if controller is not None:
        registry.register(ControllerCollector(lambda: controller))
    return generate_latest(registry).decode()


class RuntimeMetrics:
    """A runtime's ``/metrics`` page, scrape after scrape: ``text()`` reads ``rt.stats()``,
    ``rt.cpu_seconds()`` and the state of ``rt.controller`` (and ``collectors``, such as a
    server's :class:`ServerCollector`) and renders them as :func:`prometheus_text` does,
    through collectors kept from one scrape to the next (so each ``_sum`` carries on across the
    native wrap). Safe to call from several threads at once."""

    def __init__(self, rt: _StatsSource, *, per_octave: int = 2, collectors: Iterable[Collector] = ()) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(StatsCollector(rt.stats, per_octave=per_octave))
        self._registry.register(CpuCollector(rt.cpu_seconds))
        # Looked up at each scrape: a controller started after the page was made shows too.
        self._registry.register(ControllerCollector(lambda: getattr(rt, "controller", None)))
        for collector in collectors:
            self._registry.register(collector)

    def text(self) -> bytes:
        """The page, in the Prometheus text format (``Content-Type: CONTENT_TYPE``)."""
        return generate_latest(self._registry)


class _ControllerSource(Protocol):
    slos: Mapping[str, float]
    percentiles: Mapping[str, float]

    def stats(self) -> dict[str, Any]: ...


class _StatsSource(Protocol):
    def stats(self) -> Mapping[str, ModelStats]: ...

    def cpu_seconds(self) -> Mapping[str, float]: ...
