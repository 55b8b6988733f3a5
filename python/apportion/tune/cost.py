"""The cost model: what one call of a model costs on t threads with a batch of b, fitted from
profile samples, and what a model could serve on a share of cores. Pure functions of numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .._private.checks import finite_number
from ..errors import QuotaError

__all__ = ["RHO", "CostModel", "Need", "Sample", "Shape"]

RHO = 0.85
"""Highest utilisation the allocator plans for: queueing above it breaks tail latencies."""


@dataclass(frozen=True)
class Sample:
    """One profiling measurement of one model alone: ``threads`` per instance, batches of up to
    ``batch`` (1: no batching), ``call_ms`` per model call, ``mean_batch`` requests per call."""

    threads: int
    batch: int
    call_ms: float
    mean_batch: float = 1.0
    throughput: float = 0.0
    p99_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("threads", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QuotaError(f"Sample: {name} must be an int >= 1, got {v!r}")
        for name, v, least in (("call_ms", self.call_ms, None), ("mean_batch", self.mean_batch, None),
                               ("throughput", self.throughput, 0.0)):
            if not finite_number(v) or (v <= 0 if least is None else v < least):
                raise QuotaError(f"Sample: {name} must be a finite number {'> 0' if least is None else '>= 0'}, "
                                 f"got {v!r}")
        if self.p99_ms is not None and not (finite_number(self.p99_ms) and self.p99_ms >= 0):
            raise QuotaError(f"Sample: p99_ms must be a finite number >= 0 or None, got {self.p99_ms!r}")


@dataclass(frozen=True)
class CostModel:
    """Time of one model call: ``(alpha_ms + beta_ms * b) * (serial + (1 - serial) / t)`` for a
    batch of ``b`` requests on ``t`` intra-op threads."""

    alpha_ms: float
    beta_ms: float
    serial: float = 1.0
    batchable: bool = True

    def __post_init__(self) -> None:
        for name in ("alpha_ms", "beta_ms"):
            v = getattr(self, name)
            if not finite_number(v) or v < 0:
                raise QuotaError(f"CostModel: {name} must be a finite number >= 0, got {v!r}")
        if self.alpha_ms + self.beta_ms <= 0:
            raise QuotaError("CostModel: a call must take some time: alpha_ms + beta_ms must be > 0")
        if not (finite_number(self.serial) and 0 <= self.serial <= 1):
            raise QuotaError(f"CostModel: serial must be a number in [0, 1], got {self.serial!r}")

    def call_ms(self, threads: int, batch: float = 1) -> float:
        return (self.alpha_ms + self.beta_ms * batch) * (self.serial + (1.0 - self.serial) / threads)

    def core_ms(self, threads: int, batch: int = 1) -> float:
        """CPU time one request costs (ms of one core)."""
        return threads * self.call_ms(threads, batch) / batch

    @classmethod
    def fit(cls, samples: Sequence[Sample]) -> CostModel:
        """Fits the model to profile samples. Without two batch sizes the model is treated as
        not gaining from batching (beta only); without two thread counts, as not gaining from
        threads (serial = 1): the tuner never plans on a gain it did not see."""
        if not samples:
            raise QuotaError("CostModel.fit: no samples")
        one = [s for s in samples if s.threads == 1] or list(samples)
        by_batch: dict[float, list[float]] = {}
        for s in one:
            by_batch.setdefault(s.mean_batch, []).append(s.call_ms)
        points = sorted((b, sum(v) / len(v)) for b, v in by_batch.items())
        if len(points) >= 2:
            (b0, c0), (b1, c1) = points[0], points[-1]
            beta = max(0.0, (c1 - c0) / (b1 - b0))
            alpha = max(0.0, c0 - beta * b0)
            if beta == 0.0 and alpha == 0.0:
                beta = c0 / b0
            batchable = True
        else:
            b0, c0 = points[0]
            alpha, beta, batchable = 0.0, c0 / b0, False
        base = cls(alpha, beta, 1.0, batchable)
        serials = []
        for s in samples:
            if s.threads > 1:
                speedup = base.call_ms(1, s.mean_batch) / s.call_ms
                # Amdahl: speedup = 1 / (serial + (1 - serial) / t)
                serials.append((1.0 / max(speedup, 1e-9) - 1.0 / s.threads) / (1.0 - 1.0 / s.threads))
        serial = min(1.0, max(0.0, sum(serials) / len(serials))) if serials else 1.0
        return cls(alpha, beta, serial, batchable)


@dataclass(frozen=True)
class Shape:
    """How one instance of a model serves: intra-op ``threads`` and batches of up to ``batch``
    (1: no batching) gathered for at most ``delay_ms``."""

    threads: int = 1
    batch: int = 1
    delay_ms: float = 0.0

    def describe(self) -> str:
        return f"t={self.threads}" + (f" b<={self.batch}" if self.batch > 1 else "")


@dataclass(frozen=True)
class Need:
    """What the allocator knows about one model: its cost model, demand (requests/s; None for
    a closed loop of ``concurrency``), latency objective and the shapes it may use."""

    name: str
    cost: CostModel
    demand: float | None = None
    concurrency: int | None = None
    slo_ms: float | None = None
    threads: tuple[int, ...] = (1,)
    batches: tuple[int, ...] = (1,)
    max_queue: int | None = None
    """The config's own admission bound: the tuner never sets one above it (None: no limit)."""

    def p99_ms(self, shape: Shape) -> float:
        """Predicted tail latency: a request may wait for the call in progress and then run in
        its own (plus the batching delay)."""
        return 2.0 * self.cost.call_ms(shape.threads, shape.batch) + (shape.delay_ms if shape.batch > 1 else 0.0)

    def shapes(self, max_threads: float) -> list[Shape]:
        """Shapes whose predicted p99 meets the SLO, cheapest CPU time per request first."""
        out = []
        for t in self.threads:
            if t > max(1, math.ceil(max_threads - 1e-9)):
                continue
            for b in self.batches if self.cost.batchable else (1,):
                delay = 0.0 if b == 1 else _delay_ms(self, t, b)
                s = Shape(t, b, delay)
                if self.slo_ms is None or self.p99_ms(s) <= self.slo_ms:
                    out.append(s)
        return sorted(out, key=lambda s: (self.cost.core_ms(s.threads, s.batch), s.threads, s.batch))

    def wanted(self, shape: Shape) -> float:
        """Requests/s this model could use: its rate, or what its closed loop can push."""
        if self.demand is not None:
            return self.demand
        n = self.concurrency or 1
        return n * 1000.0 / self.cost.call_ms(shape.threads, min(shape.batch, n))

    def served(self, cores: float) -> tuple[float, Shape | None]:
        """Requests/s within the SLO on ``cores`` (at RHO utilisation), and the shape used."""
        best, best_shape = 0.0, None
        if cores <= 0:
            return 0.0, None
        for s in self.shapes(cores):
            v = min(self.wanted(s), RHO * cores * 1000.0 / self.cost.core_ms(s.threads, s.batch))
            if v > best + 1e-9:
                best, best_shape = v, s
        return best, best_shape


def _delay_ms(need: Need, threads: int, batch: int) -> float:
    # Wait at most as long as a few calls of one: long enough to fill a batch under load,
    # short enough to stay a small part of the SLO.
    d = 2.0 * need.cost.call_ms(threads, 1)
    if need.slo_ms is not None:
        d = min(d, need.slo_ms / 10.0)
    return round(max(0.5, d), 2)
