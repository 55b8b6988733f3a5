"""Typed views of the per-model counters and latency histograms kept by the native core."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _table
from ._core import HistogramSnapshot, ModelSnapshot
from .errors import QuotaError

__all__ = ["HistogramSnapshot", "LatencyStats", "ModelStats", "RuntimeStats"]


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Latency percentiles in milliseconds, from a log-bucket histogram (each within ~3% of the
    truth; ``max_ms`` exact for a whole histogram).

    ``histogram`` is the native snapshot the figures were computed from (values in
    nanoseconds): subtract an earlier snapshot of the same histogram from it to get the
    percentiles of a window (:meth:`since`). None for figures not taken from a histogram.
    """

    count: int
    """Values recorded (requests)."""
    mean_ms: float
    """Mean in milliseconds (exact: the histogram keeps the sum)."""
    p50_ms: float
    """Median in milliseconds."""
    p90_ms: float
    """90th percentile in milliseconds."""
    p99_ms: float
    """99th percentile in milliseconds."""
    p999_ms: float
    """99.9th percentile in milliseconds."""
    max_ms: float
    """Largest value in milliseconds."""
    histogram: HistogramSnapshot | None = field(default=None, repr=False, compare=False)
    """The buckets (nanoseconds) the figures come from; None when they were not taken from one."""

    @classmethod
    def from_histogram(cls, hist: HistogramSnapshot) -> LatencyStats:
        """The figures of a nanosecond histogram snapshot (or window), computed natively; all
        zero for an empty one."""
        return cls(
            count=hist.count,
            mean_ms=hist.mean / 1e6,
            p50_ms=hist.quantile(0.50) / 1e6,
            p90_ms=hist.quantile(0.90) / 1e6,
            p99_ms=hist.quantile(0.99) / 1e6,
            p999_ms=hist.quantile(0.999) / 1e6,
            max_ms=hist.max / 1e6,
            histogram=hist,
        )

    def since(self, earlier: LatencyStats) -> LatencyStats:
        """The figures of what was recorded after ``earlier`` (an earlier ``LatencyStats`` of the
        same histogram, e.g. the same field of an earlier ``rt.stats()``).

        Raises QuotaError (a ValueError) when either has no histogram, ValueError when they are
        of different histograms or ``earlier`` is the later one."""
        if self.histogram is None or earlier.histogram is None:
            raise QuotaError("LatencyStats.since: both figures need their histogram (take them from "
                             "Runtime.stats())")
        return LatencyStats.from_histogram(self.histogram.subtract(earlier.histogram))


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One model's outcome counts and latencies since it was added.

    Every submitted request is counted once as completed, failed, rejected, expired or cancelled
    once it finished; ``in_flight`` is what has not finished yet (queued or running).
    """

    name: str
    instances: int
    """Worker instances (burst instances not included)."""
    max_queue: int
    """Admission bound, in requests."""
    submitted: int
    """Requests submitted, admitted or refused (counts are requests since the model was added):
    ``submitted == completed + failed + rejected + expired + cancelled + in_flight``."""
    completed: int
    """Requests that returned a result."""
    failed: int
    """Requests that raised the model's exception (or whose worker crashed)."""
    rejected: int
    """Submissions refused at admission: QueueFull (the queue was full, or with
    ``admission="deadline"`` the request would have waited past its deadline), or
    RuntimeClosed (the model or runtime was closing)."""
    expired: int
    """Requests whose deadline passed before they started (DeadlineExceeded)."""
    cancelled: int
    """Requests cancelled before they started."""
    queued: int
    """Queue slots taken now: the requests waiting, plus cancelled or expired ones still in the
    queue beyond its spare room (``max_queue`` of them) that no worker has passed yet (see
    the README's Admission). ``max_queue`` minus this is how many more are admitted."""
    queue_wait: LatencyStats
    """From admission to the start of the call (milliseconds)."""
    compute: LatencyStats
    """Duration of the model call that served each request (milliseconds)."""
    end_to_end: LatencyStats
    """From admission to completion (milliseconds)."""
    gpu_memory_bytes: int | None = None
    """GPU memory the model's pool holds (models with a GPU memory budget), else None."""
    gpu_memory_peak_bytes: int | None = None
    """The most GPU memory the model's pool held (bytes), else None."""
    batches: int = 0
    """Model calls made (one per request without batching)."""
    mean_batch_size: float = 0.0
    """Requests per model call, on average."""
    max_batch_size: int = 0
    """Most requests served by one model call."""
    delayed: int = 0
    """Requests moved behind the others by ``on_timeout="delay"`` (each is still counted
    once by its outcome)."""
    pool_calls: int = 0
    """Model calls that ran on the scheduled shared pool (shared models; burst calls)."""
    pool_time_s: float = 0.0
    """Shared-pool time those calls used: the sum of call duration x units (intra-op threads)
    held. Its ratio between backlogged models is their achieved share."""
    burst_served: int = 0
    """Requests of an exclusive model served on the shared pool by its burst workers."""
    stolen: int = 0
    """Requests taken by an instance from another NUMA node's queue than its own (models whose
    instances span nodes keep one queue per node; an instance whose node's queue is empty
    takes from the others). Zero for a model on one node."""
    direct: int = 0
    """Requests of a process model that ``Runtime.call`` served in the calling thread, on an
    idle instance with nothing queued (no queue wait; counted in ``submitted`` and outcomes
    like any other)."""
    moves: int = 0
    """Times :meth:`Runtime.apply` moved the model to new instances while it served (its
    counters and histograms go on across moves)."""
    batch_size: HistogramSnapshot | None = field(default=None, repr=False, compare=False)
    """Requests per model call: one value per call (its histogram's unit is requests)."""
    running_calls: int = 0
    """Model calls the model's workers are in now (a batch's call counts once; not a process
    model's calls that ``Runtime.call`` runs in the caller's thread). A call ends after its
    requests complete: a caller that has its result may still see its call here, briefly."""
    oldest_call_s: float = field(default=0.0, compare=False)
    """How long the oldest of those calls has run, in seconds (0.0: none runs). A call that
    never returns (a deadlock, a hung device) grows here while nothing else moves. A reading
    of the clock: not part of equality."""
    process_restarts: int | None = None
    """Worker processes started again after one died (a crash, an exit, the OOM killer, a
    watchdog's kill) for a model of ``isolation="process"``; None for other models."""

    @property
    def in_flight(self) -> int:
        return self.submitted - (
            self.completed + self.failed + self.rejected + self.expired + self.cancelled
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable figures, ``in_flight`` included (the histogram snapshots
        left out: their buckets are the runtime's, read through ``rt.stats()``)."""
        d = asdict(self, dict_factory=lambda items: {k: v for k, v in items
                                                     if not isinstance(v, HistogramSnapshot)})
        d["in_flight"] = self.in_flight
        return d

    @classmethod
    def _from_native(cls, s: ModelSnapshot) -> ModelStats:
        return cls(
            name=s.name,
            instances=s.instances,
            max_queue=s.max_queue,
            submitted=s.submitted,
            completed=s.completed,
            failed=s.failed,
            rejected=s.rejected,
            expired=s.expired,
            cancelled=s.cancelled,
            queued=s.queued,
            queue_wait=LatencyStats.from_histogram(s.queue_wait),
            compute=LatencyStats.from_histogram(s.compute),
            end_to_end=LatencyStats.from_histogram(s.end_to_end),
            batches=s.batch_size.count,
            mean_batch_size=s.batch_size.mean,
            max_batch_size=s.batch_size.max,
            delayed=s.delayed,
            pool_calls=s.pool_calls,
            pool_time_s=s.pool_time_ns / 1e9,
            burst_served=s.burst_served,
            stolen=s.stolen,
            direct=s.direct,
            moves=s.moves,
            batch_size=s.batch_size,
            running_calls=s.running_calls,
            oldest_call_s=s.oldest_call_ns / 1e9,
        )


def same_model(before: ModelStats, after: ModelStats) -> bool:
    """Whether two stats of a model name are of one model, not of a model removed and another
    added under its name in between (their histograms differ, so no window lies between)."""
    b, a = before.end_to_end.histogram, after.end_to_end.histogram
    return b is None or a is None or b.origin == a.origin


@dataclass(frozen=True, slots=True)
class RuntimeStats(Mapping[str, ModelStats]):
    """Stats of every model, by name. ``str()`` gives a readable table."""

    models: dict[str, ModelStats]

    def __getitem__(self, name: str) -> ModelStats:
        return self.models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __str__(self) -> str:
        header = (
            "model", "inst", "submitted", "done", "failed", "rejected", "expired", "cancelled",
            "queued", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "queue p99",
        )
        rows = []
        for s in self.models.values():
            e = s.end_to_end
            rows.append((
                s.name, str(s.instances), str(s.submitted), str(s.completed), str(s.failed),
                str(s.rejected), str(s.expired), str(s.cancelled), str(s.queued),
                f"{e.p50_ms:.3f}", f"{e.p90_ms:.3f}", f"{e.p99_ms:.3f}", f"{e.p999_ms:.3f}",
                f"{e.max_ms:.3f}", f"{s.queue_wait.p99_ms:.3f}",
            ))
        return "\n".join(_table.text(header, rows))
