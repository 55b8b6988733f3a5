"""The search's pure steps: layouts of an allocation (candidates), a config with a candidate's
settings, the small moves that refine a winner, and how candidates rank. No runtime, no
clock: :func:`apportion.tune.tune` runs them against measurements."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..batching import Batching
from ..config import Config
from .allocation import Allocation, objective_value
from .cost import CostModel, Need, Shape

__all__ = ["Candidate", "Choice", "Measured", "apply", "batching_for", "best", "clearly_better",
           "first_candidates", "isolated_layout", "moves", "needs_for", "profile_shapes",
           "shared_layout"]

@dataclass(frozen=True)
class Choice:
    """One model's settings in a candidate."""

    isolation: str
    cores: int | None
    instances: int
    threads: int
    batching: Batching | None

    def describe(self) -> str:
        where = f"{self.cores} excl" if self.isolation == "exclusive" else "shared"
        b = f" b<={self.batching.max_size}/{self.batching.max_delay_ms:g}ms" if self.batching else ""
        return f"{where} {self.instances}x{self.threads}t{b}"


@dataclass(frozen=True)
class Measured:
    """One model's figures in a validation run."""

    throughput: float
    goodput: float
    p99_ms: float | None
    slo_met: bool | None
    wanted: float | None
    expired: int = 0
    rejected: int = 0

    @property
    def fraction(self) -> float:
        return self.goodput / self.wanted if self.wanted else 1.0


@dataclass
class Candidate:
    name: str
    choices: dict[str, Choice]
    why: str
    predicted: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Measured] | None = None

    def slo_ok(self) -> bool:
        return self.measured is not None and all(m.slo_met is not False for m in self.measured.values())

    def score(self, objective: str) -> float:
        if self.measured is None:
            return float("-inf")
        return objective_value({n: (m.goodput, m.wanted or m.throughput or 1.0) for n, m in self.measured.items()},
                          objective)

    def rank(self, objective: str) -> tuple[bool, float]:
        return (self.slo_ok(), self.score(objective))

    def describe(self) -> str:
        return "; ".join(f"{n}: {c.describe()}" for n, c in self.choices.items())


def batching_for(shape: Shape) -> Batching | None:
    return Batching(max_size=shape.batch, max_delay_ms=shape.delay_ms) if shape.batch > 1 else None


def shared_layout(alloc: Mapping[str, Allocation], total_cores: int) -> dict[str, Choice]:
    """Every model on one shared pool, with instances for its share of the pool."""
    out = {}
    for n, a in alloc.items():
        shape = a.shape or Shape()
        t = min(shape.threads, total_cores)
        inst = max(1, round(a.cores / t))
        out[n] = Choice("shared", None, inst, t, batching_for(shape))
    return out


def isolated_layout(alloc: Mapping[str, Allocation], total_cores: int) -> dict[str, Choice] | None:
    """Whole cores of their own for models whose share rounds to at least one core; the rest
    share what is left. None when no model earns a core or the pool would be empty."""
    want = {n: a.cores for n, a in alloc.items()}
    whole = {n: int(math.floor(c + 1e-9)) for n, c in want.items()}
    # Largest remainder: hand out the cores the floors left over.
    spare = total_cores - sum(whole.values())
    for n in sorted(want, key=lambda n: want[n] - whole[n], reverse=True):
        if spare <= 0:
            break
        if want[n] - whole[n] >= 0.5:
            whole[n] += 1
            spare -= 1
    exclusive = {n: c for n, c in whole.items() if c >= 1}
    shared = [n for n in alloc if n not in exclusive]
    if shared:
        while exclusive and total_cores - sum(exclusive.values()) < 1:
            biggest = max(exclusive, key=lambda n: exclusive[n])
            exclusive[biggest] -= 1
            if exclusive[biggest] == 0:
                del exclusive[biggest]
                shared.append(biggest)
    if not exclusive or sum(exclusive.values()) > total_cores:
        return None
    pool = total_cores - sum(exclusive.values())
    out = {}
    for n, a in alloc.items():
        shape = a.shape or Shape()
        if n in exclusive:
            c = exclusive[n]
            t = min(shape.threads, c)
            out[n] = Choice("exclusive", c, max(1, c // t), t, batching_for(shape))
        else:
            t = min(shape.threads, max(pool, 1))
            out[n] = Choice("shared", None, max(1, round(a.cores / t)), t, batching_for(shape))
    return out


def apply(config: Config, choices: Mapping[str, Choice]) -> Config:
    """``config`` with each model's quota and batching replaced by ``choices``."""
    models = {}
    for name, m in config.models.items():
        c = choices.get(name)
        if c is None:
            models[name] = m
            continue
        spec = replace(m.spec, isolation=c.isolation, instances=c.instances, threads=c.threads, cores=c.cores,
                       batching=c.batching, oversubscribe=False, burst=False, weight=None, priority_class=None,
                       watchdog_s=None, start_timeout_s=None)
        models[name] = replace(m, spec=spec)
    return replace(config, models=models)


def needs_for(config: Config, costs: Mapping[str, CostModel], total_cores: int, max_batch: int) -> list[Need]:
    demand = config.demand()
    threads = tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= total_cores) or (1,)
    batches = tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= max_batch)
    out = []
    for n, m in config.models.items():
        conc = (m.load or {}).get("concurrency")
        out.append(Need(n, costs[n], demand.get(n), conc, (m.slo or {}).get("latency_ms"), threads, batches))
    return out


def clearly_better(a: Candidate, b: Candidate, objective: str) -> bool:
    if a.slo_ok() != b.slo_ok():
        return a.slo_ok()
    sa, sb = a.score(objective), b.score(objective)
    return sa > sb + 0.01 * abs(sb)


def moves(w: Candidate, needs: Iterable[Need], total_cores: int) -> list[Candidate]:
    """Small changes to the winner for the models it serves worst: one more instance, a larger
    or a smaller batch."""
    if w.measured is None:
        return []
    order = sorted(w.measured, key=lambda n: (w.measured[n].slo_met is not False, w.measured[n].fraction))  # type: ignore[index]
    out = []
    for n in order:
        m = w.measured[n]
        if m.slo_met is not False and m.fraction >= 0.95:
            continue
        c = w.choices[n]
        if c.isolation == "shared" and (c.instances + 1) * c.threads <= 2 * total_cores:
            out.append(Candidate(f"{w.name} +1 {n} instance", {**w.choices, n: replace(c, instances=c.instances + 1)},
                                 f"refined from '{w.name}': {n} served {m.fraction:.0%} of its demand"))
        b = c.batching
        if b is not None and b.max_size < 32:
            out.append(Candidate(f"{w.name}, {n} batch {b.max_size * 2}",
                                 {**w.choices, n: replace(c, batching=Batching(b.max_size * 2, b.max_delay_ms))},
                                 f"refined from '{w.name}': larger batches for {n}"))
        if b is not None and b.max_size > 2:
            out.append(Candidate(f"{w.name}, {n} batch {b.max_size // 2}",
                                 {**w.choices, n: replace(c, batching=Batching(b.max_size // 2, b.max_delay_ms))},
                                 f"refined from '{w.name}': smaller batches for {n} (latency)"))
    return out


def profile_shapes(total_cores: int, max_batch: int) -> list[Shape]:
    """The shapes each model is profiled on alone: one thread; up to four threads (when the
    machine has more than one core); a batch of ``max_batch`` (when batching is allowed)."""
    shapes = [Shape(1, 1)]
    if total_cores > 1:
        shapes.append(Shape(min(total_cores, 4), 1))
    if max_batch > 1:
        shapes.append(Shape(1, max_batch, 2.0))
    return shapes


def first_candidates(alloc: Mapping[str, Allocation], total_cores: int, limit: int) -> list[Candidate]:
    """The layouts of an allocation worth validating, most promising first, at most ``limit``
    (at least one): everything on a shared pool; whole cores for the models that earned them;
    the shared pool without batching (in case batching's predicted gain does not hold)."""
    predicted = {n: a.served for n, a in alloc.items()}
    shared = shared_layout(alloc, total_cores)
    out = [Candidate("shared pool", shared, "every model floats on all cores with the "
                     "allocated instances, threads and batching", predicted)]
    iso = isolated_layout(alloc, total_cores)
    if iso is not None and iso != shared:
        out.append(Candidate("isolated", iso, "models that earned whole cores get them "
                             "exclusively; the rest share the remainder", predicted))
    if any(c.batching for c in shared.values()):
        plain = {n: replace(c, batching=None) for n, c in shared.items()}
        out.append(Candidate("shared, no batching", plain, "as 'shared pool' without batching "
                             "(in case batching's predicted gain does not hold)"))
    return out[:max(1, limit)]


def best(candidates: Sequence[Candidate], objective: str) -> Candidate:
    """The winner: every SLO met first, then the objective's score."""
    return max(candidates, key=lambda c: c.rank(objective))
