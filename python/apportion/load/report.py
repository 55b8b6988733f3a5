"""What a load run found: per-window and per-model figures, the stability rule, and the
report's text and JSON forms. Pure: every function here takes tallies or histogram snapshots
and returns figures, so the report is tested without running a model."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import _table
from ..stats import HistogramSnapshot, LatencyStats, ModelStats, same_model
from .spec import SLO, ModelLoad

__all__ = ["LoadReport", "ModelReport", "Tally", "Totals", "WindowStats", "histogram_latency",
           "latency_stats", "model_report", "percentile", "summarise_window", "window_latency",
           "windows_stable"]

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
    queue_wait: LatencyStats | None = None
    """The runtime's queue-wait figures for this window alone: its native histogram at the
    window's end minus the one at its start. None when the runtime recorded nothing in it."""
    compute: LatencyStats | None = None
    """The runtime's compute figures for this window alone (as ``queue_wait``)."""
    end_to_end: LatencyStats | None = None
    """The runtime's end-to-end figures (admission to completion) for this window alone."""
    outstanding: int = 0
    """Requests sent and not yet answered at the window's end."""


@dataclass(frozen=True, slots=True)
class Totals:
    """Every request one model's load sent, over the whole run: warm-up, all windows and the
    final drain. What a server's own counters should show for the same run (``offered`` =
    ``completed + rejected + expired + failed + cancelled + unfinished``)."""

    offered: int = 0
    """Submission attempts."""
    submitted: int = 0
    """Attempts that reached the target (in-process: accepted; over the network: sent, so the
    server's refusals are among them)."""
    completed: int = 0
    rejected: int = 0
    expired: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    """Requests still unanswered when the generator stopped waiting for them."""
    errors: dict[str, int] = field(default_factory=dict)
    """Requests that did not complete, by kind (see :attr:`ModelReport.errors`)."""


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
    """Attempts the runtime accepted (over the network: requests sent; the server's refusals
    come back as responses and count here and in ``rejected``)."""
    completed: int
    """Requests that returned a result."""
    good: int
    """Completions within the SLO latency (all completions when there is no SLO)."""
    rejected: int
    """Attempts refused with QueueFull (over the network: HTTP 429, gRPC RESOURCE_EXHAUSTED)."""
    expired: int
    """Requests that completed with DeadlineExceeded (over the network: HTTP 504, gRPC
    DEADLINE_EXCEEDED)."""
    failed: int
    """Requests that raised the model's exception (over the network: any other error)."""
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
    queue_wait: LatencyStats | None
    """The runtime's queue-wait figures over the reported windows: the difference of its
    native histograms at their ends (cumulative ones when those snapshots are missing).
    None for a target that has no runtime stats (a server over the network)."""
    compute: LatencyStats | None
    """The runtime's compute figures over the reported windows (as ``queue_wait``)."""
    slo_met: bool | None
    """Whether the SLO percentile of end-to-end latency met ``slo.latency_ms``, over the
    requests admitted (expired and failed ones count as misses; refusals at admission are left
    out and shown beside the verdict); None without a latency objective or without a request
    admitted."""
    stable: bool
    windows: tuple[WindowStats, ...]
    """Every measured window (warm-up excluded), oldest first."""
    schedule_lag_p99_ms: float | None = None
    """Open loop: p99 of how late submissions were against their schedule (large values mean
    the generator, not the model, limited the offered load)."""
    inputs_exhausted: bool = False
    end_to_end: LatencyStats | None = None
    """The runtime's end-to-end figures (admission to completion) over the reported windows
    (as ``queue_wait``); ``latency`` is the generator's own, from submit to done-callback."""
    errors: dict[str, int] = field(default_factory=dict)
    """Requests of the reported windows that did not complete, by kind: the exception's
    ``kind`` where it has one (over the network: ``"http 429"``, ``"grpc UNAVAILABLE"``,
    ``"connection"``, ``"client timeout"``), else its class name (``"QueueFull"``,
    ``"DeadlineExceeded"``, the model's own exception)."""
    totals: Totals = field(default_factory=Totals)
    """Counts over the whole run (warm-up and final drain included)."""


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
    target: str | None = None
    """The server's URL for a load over the network; None in-process."""

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
        """Plain, JSON-serialisable figures (histogram buckets left out)."""
        d = dataclasses.asdict(self, dict_factory=_without_histograms)
        d["throughput"] = self.throughput
        d["goodput"] = self.goodput
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        ran_out = [m.model for m in self.models.values() if m.inputs_exhausted]
        verdict = (
            f"NOTHING measured: no request was offered in {self.windows} windows of {self.window_s:g} s"
            if self.models and not any(m.offered for m in self.models.values())
            else f"stable after {self.windows} windows of {self.window_s:g} s "
            f"(last {self.stable_windows} within {self.tolerance:.0%})"
            if self.stable
            else f"NOT stable: {'the inputs ran out' if ran_out else 'time limit'} after {self.windows} windows "
            f"of {self.window_s:g} s (reporting the last {self.stable_windows})"
        )
        header = ("model", "load", "req/s", "good/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                  "queue ms", "compute ms", "rejected", "expired", "failed", "SLO")
        rows = []
        for m in self.models.values():
            e = m.latency
            rows.append((
                m.model, m.load, f"{m.throughput:.1f}", f"{m.goodput:.1f}",
                *(("-",) * 4 if e is None else
                  (f"{e.p50_ms:.3f}", f"{e.p90_ms:.3f}", f"{e.p99_ms:.3f}", f"{e.p999_ms:.3f}")),
                _fmt_ms(m.queue_wait_mean_ms), _fmt_ms(m.compute_mean_ms),
                str(m.rejected), str(m.expired), str(m.failed), _slo_cell(m),
            ))
        if self.target is not None:
            verdict = f"{self.target}: {verdict}"
        lines = [verdict, *_table.text(header, rows, left=2)]
        lines.append(f"total: {self.throughput:.1f} req/s, goodput {self.goodput:.1f}/s "
                     "(queue and compute are means)")
        for m in self.models.values():
            if m.errors:
                kinds = ", ".join(f"{k} x{n}" for k, n in sorted(m.errors.items()))
                lines.append(f"errors of {m.model}: {kinds}")
        lines += [note for m in self.models.values() for note in _notes(m)]
        if self.target is not None:
            lines.append("queue and compute: not read over the network (end-to-end is the client's)")
            return "\n".join(lines)
        lines.append("per window, from the runtime's histograms (ms):")
        lines += _table.text(_WINDOW_HEADER, [_window_row(m.model, w) for m in self.models.values()
                                              for w in m.windows], left=2)
        return "\n".join(lines)


_WINDOW_HEADER = ("model", "window", "req/s", "queue p50", "queue p99", "compute p50", "compute p99",
                  "e2e p50", "e2e p99")


def _window_row(model: str, w: WindowStats) -> tuple[str, ...]:
    def cells(s: LatencyStats | None) -> tuple[str, str]:
        return ("-", "-") if s is None else (f"{s.p50_ms:.3f}", f"{s.p99_ms:.3f}")

    return (model, str(w.index), f"{w.throughput:.1f}", *cells(w.queue_wait), *cells(w.compute),
            *cells(w.end_to_end))


def _without_histograms(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in items if k != "histogram"}


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _slo_cell(m: ModelReport) -> str:
    if m.slo is None or m.slo.latency_ms is None:
        return "-"
    verdict = "?" if m.slo_met is None else ("met" if m.slo_met else "MISSED")
    if m.slo_met is not None and m.rejected:
        verdict += f" ({m.rejected} refused)"  # the verdict is of the requests admitted
    return f"p{m.slo.percentile:g}<={m.slo.latency_ms:g}ms {verdict}"


BEHIND = 0.95
"""An open loop that offered less than this share of its rate fell behind (reported)."""

BEHIND_JUDGED_AT = 20
"""Requests the rate asks for over the reported windows before the generator is judged behind."""


def _notes(m: ModelReport) -> list[str]:
    """What the table's figures leave out for model ``m``, one line each."""
    out = []
    if m.inputs_exhausted:
        out.append(f"{m.model}: the inputs ran out: the load stopped early, and its last window is partly empty")
    # Judged where the rate asked for enough requests over the reported windows to tell: at
    # 1e-9/s none is the schedule, not a generator behind it.
    if m.rate and m.offered_rate < BEHIND * m.rate and m.rate * m.duration_s >= BEHIND_JUDGED_AT:
        lag = "" if m.schedule_lag_p99_ms is None else f", submissions up to {m.schedule_lag_p99_ms:.0f} ms late (p99)"
        out.append(f"{m.model}: the generator fell behind: it offered {m.offered_rate:.1f}/s of the "
                   f"{m.rate:g}/s asked{lag}; the client, not the model, limited this load")
    if not m.offered:
        out.append(f"{m.model}: no request was offered in the reported windows: nothing was measured")
    waiting = m.windows[-1].outstanding if m.windows else 0
    if waiting or m.totals.unfinished:
        out.append(f"{m.model}: {waiting} request(s) still unanswered at the end of the last window, "
                   f"{m.totals.unfinished} never answered: not in the latencies (a tail longer than "
                   "the run reads short)")
    return out


def percentile(sorted_ns: Sequence[float], p: float) -> float:
    # Nearest rank: the smallest sample with at least p% of samples at or below it.
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ns)))
    return sorted_ns[min(rank, len(sorted_ns)) - 1]


def latency_stats(samples_ns: list[int]) -> LatencyStats | None:
    if not samples_ns:
        return None
    s = sorted(samples_ns)
    return LatencyStats(
        count=len(s),
        mean_ms=sum(s) / len(s) / 1e6,
        p50_ms=percentile(s, 50) / 1e6,
        p90_ms=percentile(s, 90) / 1e6,
        p99_ms=percentile(s, 99) / 1e6,
        p999_ms=percentile(s, 99.9) / 1e6,
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

    Windows where nothing completed have no p99: they agree only with other such windows, and
    only while no request was waiting for an answer at their ends (an idle load). An empty
    window with requests outstanding is a stall (a cold first call, a stuck server), not a
    steady state.
    """
    if len(windows) < count:
        return False
    last = windows[-count:]
    if not _within([w.throughput for w in last], tolerance):
        return False
    p99s = [w.p99_ms for w in last]
    if any(p is None for p in p99s):
        return all(p is None for p in p99s) and not any(w.outstanding for w in last)
    return _within([p for p in p99s if p is not None], tolerance)



def histogram_latency(hist: HistogramSnapshot) -> LatencyStats | None:
    """The figures of a native nanosecond histogram snapshot, or of a window of one (a
    snapshot minus an earlier one): percentiles computed natively from the buckets (each within
    ~3% of the truth). None for an empty histogram."""
    return LatencyStats.from_histogram(hist) if hist.count else None


def window_latency(before: HistogramSnapshot | None, after: HistogramSnapshot) -> LatencyStats | None:
    """The figures of what a histogram recorded between two snapshots of it:
    ``after.subtract(before)`` through :func:`histogram_latency`. ``before=None`` takes
    everything since the start. Raises ValueError for snapshots of different histograms or
    ``before`` taken after ``after``."""
    return histogram_latency(after if before is None else after.subtract(before))


def runtime_window(before: ModelStats | None, after: ModelStats | None
                   ) -> tuple[LatencyStats | None, LatencyStats | None, LatencyStats | None]:
    """Queue-wait, compute and end-to-end figures of what the runtime recorded for one model
    between two of its stats (``rt.stats()[model]``); Nones when either is missing, or when
    they are of two different models of that name (removed and added again in between)."""
    if before is None or after is None or not same_model(before, after):
        return None, None, None

    def one(b: LatencyStats, a: LatencyStats) -> LatencyStats | None:
        if a.histogram is None:
            return None
        return window_latency(b.histogram, a.histogram)

    return (one(before.queue_wait, after.queue_wait), one(before.compute, after.compute),
            one(before.end_to_end, after.end_to_end))


@dataclass(slots=True)
class Tally:
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
    errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, exc: BaseException) -> None:
        kind = getattr(exc, "kind", None)
        kind = kind if isinstance(kind, str) else type(exc).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1



def summarise_window(acc: Tally | None, index: int, window_s: float, before: ModelStats | None = None,
                     after: ModelStats | None = None, outstanding: int = 0) -> WindowStats:
    """One window's figures: the generator's tallies, the runtime's own latencies between
    its stats at the window's ends (``before``/``after``; None leaves them out), and the
    requests still unanswered at its end."""
    acc = acc or Tally()
    lat = sorted(acc.latencies_ns)
    queue_wait, compute, end_to_end = runtime_window(before, after)
    return WindowStats(
        index=index,
        throughput=acc.completed / window_s,
        goodput=acc.good / window_s,
        p99_ms=percentile(lat, 99) / 1e6 if lat else None,
        rejected=acc.rejected,
        expired=acc.expired,
        failed=acc.failed,
        queue_wait=queue_wait,
        compute=compute,
        end_to_end=end_to_end,
        outstanding=outstanding,
    )


def _mean_delta_ms(before: LatencyStats, after: LatencyStats) -> float | None:
    n = after.count - before.count
    if n <= 0:
        return None
    return (after.mean_ms * after.count - before.mean_ms * before.count) / n


def model_report(spec: ModelLoad, accs: list[Tally], duration_s: float, history: list[WindowStats],
                  stable: bool, before: Mapping[str, ModelStats] | None,
                  after: Mapping[str, ModelStats] | None, end: ModelStats | None,
                  inputs_exhausted: bool, total: Tally | None = None, unfinished: int = 0) -> ModelReport:
    latencies = [x for a in accs for x in a.latencies_ns]
    lags = sorted(x for a in accs for x in a.lags_ns)
    latency = latency_stats(latencies)
    completed = sum(a.completed for a in accs)
    good = sum(a.good for a in accs)
    offered = sum(a.offered for a in accs)
    slo = spec.slo
    slo_met: bool | None = None
    expired = sum(a.expired for a in accs)
    failed = sum(a.failed for a in accs)
    if slo is not None and slo.latency_ms is not None and (latencies or expired or failed):
        # An expired or failed request was admitted and not served in time: a miss, as late as
        # any (a refusal at admission is not counted: the SLO is of the requests admitted).
        # Failures left out read "met" with most requests failing.
        ranked = sorted(latencies) + [math.inf] * (expired + failed)
        slo_met = percentile(ranked, slo.percentile) <= slo.latency_ms * 1e6
    q_mean = c_mean = None
    queue_wait = compute = end_to_end = None
    if end is not None:
        queue_wait, compute, end_to_end = end.queue_wait, end.compute, end.end_to_end
    if (before is not None and after is not None and spec.model in before and spec.model in after
            and same_model(before[spec.model], after[spec.model])):
        b, a = before[spec.model], after[spec.model]
        q_mean = _mean_delta_ms(b.queue_wait, a.queue_wait)
        c_mean = _mean_delta_ms(b.compute, a.compute)
        if all(x.histogram is not None for x in (a.queue_wait, a.compute, a.end_to_end)):
            queue_wait, compute = a.queue_wait.since(b.queue_wait), a.compute.since(b.compute)
            end_to_end = a.end_to_end.since(b.end_to_end)
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
        queue_wait=queue_wait,
        compute=compute,
        slo_met=slo_met,
        stable=stable,
        windows=tuple(history),
        schedule_lag_p99_ms=percentile(lags, 99) / 1e6 if lags else None,
        inputs_exhausted=inputs_exhausted,
        end_to_end=end_to_end,
        errors=_merged_errors(accs),
        totals=_totals(total, unfinished),
    )


def _merged_errors(accs: Sequence[Tally]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in accs:
        for k, n in a.errors.items():
            out[k] = out.get(k, 0) + n
    return out


def _totals(t: Tally | None, unfinished: int) -> Totals:
    if t is None:
        return Totals(unfinished=unfinished)
    return Totals(offered=t.offered, submitted=t.submitted, completed=t.completed, rejected=t.rejected,
                  expired=t.expired, failed=t.failed, cancelled=t.cancelled, unfinished=unfinished,
                  errors=dict(t.errors))
