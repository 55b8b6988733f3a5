"""Typed views of the per-model counters and latency histograms kept by the native core."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LatencyStats", "ModelStats", "RuntimeStats"]


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Latency percentiles in milliseconds (log-bucket histogram: values within ~3%)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def _from_native(cls, d: Mapping[str, Any]) -> LatencyStats:
        return cls(
            count=int(d["count"]),
            mean_ms=d["mean_ns"] / 1e6,
            p50_ms=d["p50_ns"] / 1e6,
            p90_ms=d["p90_ns"] / 1e6,
            p99_ms=d["p99_ns"] / 1e6,
            p999_ms=d["p999_ns"] / 1e6,
            max_ms=d["max_ns"] / 1e6,
        )


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One model's outcome counts and latencies since it was added.

    Every submitted request is counted once as completed, failed, rejected, expired or cancelled
    once it finished; ``in_flight`` is what has not finished yet (queued or running).
    """

    name: str
    instances: int
    max_queue: int
    submitted: int
    completed: int
    failed: int
    rejected: int
    expired: int
    cancelled: int
    queued: int
    queue_wait: LatencyStats
    compute: LatencyStats
    end_to_end: LatencyStats
    gpu_memory_bytes: int | None = None
    """GPU memory the model's pool holds (models with a GPU memory budget), else None."""
    gpu_memory_peak_bytes: int | None = None
    batches: int = 0
    """Model calls made (one per request without batching)."""
    mean_batch_size: float = 0.0
    max_batch_size: int = 0
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

    @property
    def in_flight(self) -> int:
        return self.submitted - (
            self.completed + self.failed + self.rejected + self.expired + self.cancelled
        )

    @classmethod
    def _from_native(cls, name: str, d: Mapping[str, Any]) -> ModelStats:
        return cls(
            name=name,
            instances=int(d["instances"]),
            max_queue=int(d["max_queue"]),
            submitted=int(d["submitted"]),
            completed=int(d["completed"]),
            failed=int(d["failed"]),
            rejected=int(d["rejected"]),
            expired=int(d["expired"]),
            cancelled=int(d["cancelled"]),
            queued=int(d["queued"]),
            queue_wait=LatencyStats._from_native(d["queue_wait"]),
            compute=LatencyStats._from_native(d["compute"]),
            end_to_end=LatencyStats._from_native(d["end_to_end"]),
            batches=int(d.get("batches", 0)),
            mean_batch_size=float(d["batch_size"]["mean_ns"]) if "batch_size" in d else 0.0,
            max_batch_size=int(d["batch_size"]["max_ns"]) if "batch_size" in d else 0,
            delayed=int(d.get("delayed", 0)),
            pool_calls=int(d.get("pool_calls", 0)),
            pool_time_s=float(d.get("pool_busy_ns", 0)) / 1e9,
            burst_served=int(d.get("burst_served", 0)),
            stolen=int(d.get("stolen", 0)),
            direct=int(d.get("direct", 0)),
        )


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
        rows = [header]
        for s in self.models.values():
            e = s.end_to_end
            rows.append((
                s.name, str(s.instances), str(s.submitted), str(s.completed), str(s.failed),
                str(s.rejected), str(s.expired), str(s.cancelled), str(s.queued),
                f"{e.p50_ms:.3f}", f"{e.p90_ms:.3f}", f"{e.p99_ms:.3f}", f"{e.p999_ms:.3f}",
                f"{e.max_ms:.3f}", f"{s.queue_wait.p99_ms:.3f}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = []
        for n, r in enumerate(rows):
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
            lines.append("  ".join(cells))
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)
