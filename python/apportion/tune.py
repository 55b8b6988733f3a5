"""The tuner: find cores, isolation, instances, threads and batching for every model at once.

Brute force is out of reach (cores x instances x threads x batching x isolation per model,
multiplied over models), so the tuner works in four cheap steps:

1. **profile** each model alone on a few shapes (one instance; 1 thread, k threads, and a
   batch of ``max_batch`` where batching is available) with short closed-loop runs;
2. **fit** a cost model per model: one call of ``b`` requests on ``t`` threads takes
   ``(alpha + beta * b) * (serial + (1 - serial) / t)`` ms (a fixed and a per-request part,
   and an Amdahl curve over threads);
3. **allocate** cores by marginal gain: each step gives the next slice of cores to the model
   whose objective gains most per core, choosing for it the cheapest shape (threads, batch)
   whose predicted p99 meets its SLO; a model is never given more than its demand needs
   (leftover cores become headroom);
4. **validate** the best few layouts of that allocation (everything on a shared pool; whole
   cores of their own for models that earned them; without batching) under the real mixed
   load with :mod:`apportion.load`, then **refine** the winner by small moves (one more
   instance, a larger or smaller batch) while the time budget lasts.

The cost model and the allocator are pure functions (:class:`CostModel`, :func:`allocate`):
tests feed them synthetic curves. ``tune`` also takes ``profiles=`` (skip step 1) and
``measure=`` (replace step 4's load runs), so the whole search runs without timing.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TextIO

from .batching import Batching
from .config import Config, ConfigError, ModelConfig

__all__ = [
    "Allocation",
    "Candidate",
    "CostModel",
    "Measured",
    "Need",
    "Sample",
    "Shape",
    "TuneResult",
    "allocate",
    "measure_config",
    "tune",
]

Objective = Literal["goodput", "min_fraction"]
OBJECTIVES: tuple[str, ...] = ("goodput", "min_fraction")

RHO = 0.85
"""Highest utilisation the allocator plans for: queueing above it breaks tail latencies."""


# -- the cost model (pure) ------------------------------------------------------------------------

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


@dataclass(frozen=True)
class CostModel:
    """Time of one model call: ``(alpha_ms + beta_ms * b) * (serial + (1 - serial) / t)`` for a
    batch of ``b`` requests on ``t`` intra-op threads."""

    alpha_ms: float
    beta_ms: float
    serial: float = 1.0
    batchable: bool = True

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
            raise ValueError("CostModel.fit: no samples")
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


def _score(needs: Sequence[Need], given: Mapping[str, int], step: float, objective: str) -> tuple[float, float]:
    served = {n.name: n.served(given[n.name] * step)[0] for n in needs}
    total = sum(served.values())
    if objective == "goodput":
        return (total, 0.0)
    fracs = []
    for n in needs:
        shape = n.served(max(given[n.name], 1) * step)[1]
        w = n.wanted(shape) if shape is not None else (n.demand or 0.0)
        fracs.append(served[n.name] / w if w > 0 else 1.0)
    return (min(fracs), total)


def _polish(needs: Sequence[Need], given: dict[str, int], step: float, objective: str,
            rounds: int = 200) -> None:
    """Local search after the greedy pass: move k slices from one model to another while that
    improves the objective (the greedy pass can stop short where a model's curve is not
    concave, e.g. a cheaper shape that only fits at a larger share)."""
    current = _score(needs, given, step, objective)
    for _ in range(rounds):
        improved = False
        for a, b in itertools.permutations([n.name for n in needs], 2):
            for k in range(1, given[a] + 1):
                given[a] -= k
                given[b] += k
                score = _score(needs, given, step, objective)
                if score > tuple(c + 1e-9 for c in current):
                    current, improved = score, True
                    break
                given[a] += k
                given[b] -= k
            if improved:
                break
        if not improved:
            return


@dataclass(frozen=True)
class Allocation:
    """One model's share: ``cores`` (fractional: a share of a pool), the shape, and the
    requests/s predicted within its SLO against what it wants."""

    name: str
    cores: float
    shape: Shape | None
    served: float
    wanted: float

    @property
    def fraction(self) -> float:
        return self.served / self.wanted if self.wanted > 0 else 1.0


def _objective(values: Mapping[str, tuple[float, float]], objective: str) -> float:
    """values: model -> (served, wanted)."""
    if objective == "goodput":
        return sum(v[0] for v in values.values())
    return min((v[0] / v[1] if v[1] > 0 else 1.0) for v in values.values())


def allocate(needs: Sequence[Need], cores: float, objective: Objective = "goodput",
             step: float | None = None) -> dict[str, Allocation]:
    """Divides ``cores`` between ``needs`` by marginal gain, in slices of ``step`` cores
    (default: a quarter core up to 8 cores, else one core).

    Each round gives the model with the best gain per core the next ``k`` slices (k >= 1 looks
    past plateaus, e.g. a model that needs two threads to meet its SLO gains nothing from the
    first core alone). ``goodput`` maximises the total requests/s within SLOs; ``min_fraction``
    raises the worst-served model first. Cores no model can use are spread as headroom.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if step is None:
        step = 0.25 if cores <= 8 else 1.0
    units = int(round(cores / step))
    given = {n.name: 0 for n in needs}
    by = {n.name: n for n in needs}

    def value(name: str, u: int) -> float:
        return by[name].served(u * step)[0]

    def wanted(name: str, u: int) -> float:
        shape = by[name].served(max(u, 1) * step)[1]
        return by[name].wanted(shape) if shape is not None else (by[name].demand or 0.0)

    left = units
    while left > 0:
        best: tuple[float, float, str, int] | None = None
        for n in needs:
            u = given[n.name]
            now = value(n.name, u)
            frac = now / max(wanted(n.name, u), 1e-9)
            for k in range(1, left + 1):
                gain = value(n.name, u + k) - now
                if gain <= 1e-9:
                    continue
                if objective == "goodput":
                    key = (gain / k, -frac)
                else:
                    # Water-filling: the worst-served model, by the fewest slices that help it.
                    key = (-frac, -k)
                if best is None or key > (best[0], best[1]):
                    best = (key[0], key[1], n.name, k)
                if objective != "goodput":
                    break
        if best is None:
            break
        given[best[2]] += best[3]
        left -= best[3]
    _polish(needs, given, step, objective)
    left = units - sum(given.values())
    # Headroom: the rest goes, a slice at a time, to whoever runs closest to its capacity.
    while left > 0 and needs:
        def load(n: Need) -> float:
            s, shape = n.served(given[n.name] * step)
            if shape is None:
                return 0.0
            cap = given[n.name] * step * 1000.0 / n.cost.core_ms(shape.threads, shape.batch)
            return s / cap if cap else 0.0
        target = max(needs, key=load)
        given[target.name] += 1
        left -= 1
    out = {}
    for n in needs:
        a = given[n.name] * step
        served, shape = n.served(a)
        if shape is None and a > 0:
            shapes = n.shapes(max(a, 1.0))
            shape = shapes[0] if shapes else Shape(1, 1)
        out[n.name] = Allocation(n.name, a, shape, served, n.wanted(shape) if shape else (n.demand or 0.0))
    return out


# -- layouts and candidates -----------------------------------------------------------------------

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
        return _objective({n: (m.goodput, m.wanted or m.throughput or 1.0) for n, m in self.measured.items()},
                          objective)

    def rank(self, objective: str) -> tuple[bool, float]:
        return (self.slo_ok(), self.score(objective))

    def describe(self) -> str:
        return "; ".join(f"{n}: {c.describe()}" for n, c in self.choices.items())


def _batching(shape: Shape) -> Batching | None:
    return Batching(max_size=shape.batch, max_delay_ms=shape.delay_ms) if shape.batch > 1 else None


def shared_layout(alloc: Mapping[str, Allocation], total_cores: int) -> dict[str, Choice]:
    """Every model on one shared pool, with instances for its share of the pool."""
    out = {}
    for n, a in alloc.items():
        shape = a.shape or Shape()
        t = min(shape.threads, total_cores)
        inst = max(1, round(a.cores / t))
        out[n] = Choice("shared", None, inst, t, _batching(shape))
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
            out[n] = Choice("exclusive", c, max(1, c // t), t, _batching(shape))
        else:
            t = min(shape.threads, max(pool, 1))
            out[n] = Choice("shared", None, max(1, round(a.cores / t)), t, _batching(shape))
    return out


def apply(config: Config, choices: Mapping[str, Choice]) -> Config:
    """``config`` with each model's quota and batching replaced by ``choices``."""
    models = {}
    for name, m in config.models.items():
        c = choices.get(name)
        if c is None:
            models[name] = m
            continue
        quota = {k: v for k, v in m.quota.items() if k in ("numa", "smt", "memory_policy")}
        quota.update(isolation=c.isolation, instances=c.instances, threads=c.threads)
        if c.cores is not None:
            quota["cores"] = c.cores
        models[name] = replace(m, quota=quota, batching=c.batching)
    return replace(config, models=models)


# -- measuring ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Load-run lengths (seconds)."""

    warmup_s: float = 0.5
    window_s: float = 0.5
    stable_windows: int = 3
    max_s: float = 4.0

    @classmethod
    def for_budget(cls, budget_s: float, runs: int) -> Settings:
        per_run = max(1.0, budget_s / max(runs, 1))
        window = min(2.0, max(0.2, per_run / 6.0))
        return cls(warmup_s=window, window_s=window, stable_windows=3, max_s=max(per_run, 4 * window))


def measure_config(config: Config, settings: Settings = Settings(), *, topology_root: str = "/",
                   seed: int | None = 0) -> dict[str, Measured]:
    """Serves ``config`` and puts its load on it (:func:`apportion.load.run`); per model figures."""
    from . import load as ld

    loads = config.model_loads()
    if not loads:
        raise ConfigError(config.path, "models", "no model has a load; add load = { rate = ... } "
                          "or { concurrency = ... } to the models to measure")
    demand = config.demand()
    rt = config.runtime(topology_root=topology_root, start=True)
    try:
        report = ld.run(rt, loads, warmup_s=settings.warmup_s, window_s=settings.window_s,
                        stable_windows=settings.stable_windows, tolerance=0.15,
                        max_s=max(settings.max_s, settings.warmup_s + settings.stable_windows * settings.window_s),
                        seed=seed)
    finally:
        rt.close(drain=False)
    out = {}
    for name, r in report.items():
        out[name] = Measured(throughput=r.throughput, goodput=r.goodput,
                             p99_ms=r.latency.p99_ms if r.latency else None,
                             slo_met=r.slo_met if r.slo_met is not None else (False if r.slo and r.slo.latency_ms else None),
                             wanted=demand.get(name), expired=r.expired, rejected=r.rejected)
    return out


def profile_model(config: Config, name: str, shape: Shape, settings: Settings, *,
                  topology_root: str = "/", total_cores: int = 1) -> Sample | None:
    """Runs model ``name`` alone, one instance of ``shape``, under a closed loop that keeps it
    busy; None when it fails (e.g. it does not accept batched input)."""
    from . import load as ld

    m = config.models[name]
    exclusive = shape.threads < total_cores
    quota: dict[str, Any] = {"instances": 1, "threads": shape.threads,
                             "isolation": "exclusive" if exclusive else "shared"}
    if exclusive:
        quota["cores"] = shape.threads
    alone = replace(m, quota=quota, batching=_batching(shape), max_queue=max(64, 4 * shape.batch),
                    timeout_ms=None, slo=None, load={"concurrency": 2 * shape.batch})
    cfg = replace(config, models={name: alone})
    rt = cfg.runtime(topology_root=topology_root, start=True)
    try:
        report = ld.run(rt, cfg.model_loads(), warmup_s=settings.warmup_s, window_s=settings.window_s,
                        stable_windows=settings.stable_windows, tolerance=0.15,
                        max_s=max(settings.max_s, settings.warmup_s + settings.stable_windows * settings.window_s))
        st = rt.stats()[name]
    finally:
        rt.close(drain=False)
    r = report[name]
    if r.failed or not r.completed:
        return None
    mean_batch = st.mean_batch_size if shape.batch > 1 and st.mean_batch_size > 0 else 1.0
    return Sample(shape.threads, shape.batch, 1000.0 * mean_batch / r.throughput, mean_batch, r.throughput,
                  r.latency.p99_ms if r.latency else None)


# -- the search -----------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on a stream (stderr by default); silent when disabled."""

    def __init__(self, stream: TextIO | None, budget_s: float) -> None:
        self.stream, self.budget_s, self.t0 = stream, budget_s, time.monotonic()

    def __call__(self, what: str) -> None:
        if self.stream is None:
            return
        spent = time.monotonic() - self.t0
        frac = min(1.0, spent / self.budget_s) if self.budget_s > 0 else 1.0
        bar = "#" * int(frac * 24)
        self.stream.write(f"\rtune [{bar:<24}] {spent:5.1f}/{self.budget_s:.0f}s {what[:60]:<60}")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class TuneResult:
    """What :func:`tune` found: the winning plan (``config``), every candidate tried, the
    profiles, the fitted cost models and the allocation they gave."""

    config: Config
    winner: Candidate
    candidates: list[Candidate]
    profiles: dict[str, list[Sample]]
    costs: dict[str, CostModel]
    allocation: dict[str, Allocation]
    objective: str
    elapsed_s: float
    budget_s: float
    total_cores: int

    def report(self) -> str:
        """Markdown: the workload, the profiles and fits, every candidate and why the winner won."""
        obj = "total goodput (req/s within SLO)" if self.objective == "goodput" else "minimum fraction of demand served"
        lines = ["# apportion tune report", "",
                 f"Objective: maximise {obj}. {self.total_cores} cores. "
                 f"Search took {self.elapsed_s:.1f} s of a {self.budget_s:.0f} s budget; "
                 f"{len(self.candidates)} candidates validated under the mixed load.", "",
                 "## Workload", "", "| model | demand | SLO |", "|---|---|---|"]
        demand = self.config.demand()
        for n, m in self.config.models.items():
            d = demand.get(n)
            load = (f"{d:.0f} req/s" if d is not None else f"closed x{(m.load or {}).get('concurrency', '?')}")
            slo = f"p{m.slo['percentile']:g} <= {m.slo['latency_ms']:g} ms" if m.slo else "-"
            lines.append(f"| {n} | {load} | {slo} |")
        lines += ["", "## Profiles (each model alone) and fitted cost models", "",
                  "| model | threads | batch | call ms | req/call | req/s |", "|---|---|---|---|---|---|"]
        for n, samples in self.profiles.items():
            for s in samples:
                lines.append(f"| {n} | {s.threads} | {s.batch} | {s.call_ms:.2f} | {s.mean_batch:.1f} | {s.throughput:.0f} |")
        lines += ["", "| model | alpha ms | beta ms/req | serial fraction | batchable | allocated cores | shape | predicted req/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, c in self.costs.items():
            a = self.allocation.get(n)
            lines.append(f"| {n} | {c.alpha_ms:.3f} | {c.beta_ms:.3f} | {c.serial:.2f} | {c.batchable} | "
                         f"{a.cores if a else 0:.2f} | {a.shape.describe() if a and a.shape else '-'} | "
                         f"{a.served if a else 0:.0f} |")
        names = list(self.config.models)
        lines += ["", "## Candidates", "",
                  "| # | candidate | settings | " + " | ".join(f"{n} good/s (p99 ms)" for n in names)
                  + " | all SLOs | objective |",
                  "|---|---|---|" + "---|" * len(names) + "---|---|"]
        ranked = sorted(self.candidates, key=lambda c: c.rank(self.objective), reverse=True)
        for i, c in enumerate(self.candidates):
            cells = []
            for n in names:
                m = (c.measured or {}).get(n)
                if m is None:
                    cells.append("-")
                else:
                    p = "-" if m.p99_ms is None else f"{m.p99_ms:.1f}"
                    cells.append(f"{m.goodput:.0f} ({p}{'' if m.slo_met is not False else ' MISSED'})")
            mark = " **winner**" if c is self.winner else ""
            lines.append(f"| {i + 1} | {c.name}{mark} | {c.describe()} | " + " | ".join(cells)
                         + f" | {'yes' if c.slo_ok() else 'no'} | {c.score(self.objective):.3g} |")
        lines += ["", "## Why the winner won", "", self.why(ranked), ""]
        return "\n".join(lines)

    def why(self, ranked: list[Candidate] | None = None) -> str:
        ranked = ranked or sorted(self.candidates, key=lambda c: c.rank(self.objective), reverse=True)
        w = self.winner
        text = (f"'{w.name}' ({w.why}) scored {w.score(self.objective):.3g} "
                f"{'with every model within its SLO' if w.slo_ok() else 'but missed an SLO (no candidate met all)'}.")
        others = [c for c in ranked if c is not w]
        if others:
            r = others[0]
            if w.slo_ok() and not r.slo_ok():
                text += f" The runner-up '{r.name}' missed an SLO."
            else:
                s_w, s_r = w.score(self.objective), r.score(self.objective)
                rel = f" ({(s_w / s_r - 1) * 100:+.0f}%)" if s_r > 0 else ""
                text += f" The runner-up '{r.name}' scored {s_r:.3g}{rel}."
        return text

    def plot(self, path: str | Path) -> Path:
        """Bar charts of throughput and p99 per model for each candidate (matplotlib, Agg)."""
        return plot_bars(path, {c.name: c.measured or {} for c in self.candidates}, self.config,
                         title="tune candidates")

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Writes ``plan.toml`` (loadable by Config / ``apportion run``), ``report.md`` and
        ``candidates.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"plan": self.config.save(out / "plan.toml", header=(
            f"apportion tune: winner '{self.winner.name}' ({self.objective}), "
            f"{self.total_cores} cores.\nLoad with apportion.Config.load(path) or `apportion run`."))}
        paths["report"] = out / "report.md"
        paths["report"].write_text(self.report())
        paths["plot"] = self.plot(out / "candidates.png")
        return paths


def plot_bars(path: str | Path, results: Mapping[str, Mapping[str, Measured]], config: Config,
              title: str) -> Path:
    """Two panels: goodput/throughput and p99 (with each SLO) per model, one bar per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(config.models)
    labels = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(names))]
        res = results[label]
        ax1.bar(xs, [res[n].throughput if n in res else 0 for n in names], width, label=label)
        ax2.bar(xs, [(res[n].p99_ms or 0) if n in res else 0 for n in names], width, label=label)
    for j, n in enumerate(names):
        slo = config.models[n].slo
        if slo:
            ax2.hlines(slo["latency_ms"], j - width / 2, j + 0.8 - width / 2, colors="red", linestyles="dashed")
    centre = [j + 0.4 - width / 2 for j in range(len(names))]
    for ax, ylabel in ((ax1, "throughput (req/s)"), (ax2, "p99 latency (ms); dashed: SLO")):
        ax.set_xticks(centre, names)
        ax.set_ylabel(ylabel)
    ax2.set_yscale("log")
    ax1.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


def _needs(config: Config, costs: Mapping[str, CostModel], total_cores: int, max_batch: int) -> list[Need]:
    demand = config.demand()
    threads = tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= total_cores) or (1,)
    batches = tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= max_batch)
    out = []
    for n, m in config.models.items():
        conc = (m.load or {}).get("concurrency")
        out.append(Need(n, costs[n], demand.get(n), conc, (m.slo or {}).get("latency_ms"), threads, batches))
    return out


def tune(
    config: Config | str | Path,
    *,
    budget_s: float = 60.0,
    objective: Objective = "goodput",
    topology_root: str = "/",
    max_batch: int = 8,
    validate_top: int = 3,
    progress: bool | TextIO = True,
    profiles: Mapping[str, Sequence[Sample] | CostModel] | None = None,
    measure: Callable[[Config], Mapping[str, Measured]] | None = None,
    out_dir: str | Path | None = None,
) -> TuneResult:
    """Finds a plan for the models of ``config`` (a :class:`Config` or a TOML path) under its
    workload: each model's ``load`` (rate, share of ``[workload] rate``, or closed-loop
    concurrency) and ``slo``.

    ``objective``: "goodput" (total requests/s within SLOs) or "min_fraction" (the worst-served
    model's fraction of its demand). ``budget_s`` bounds the search (profiling and validation
    runs are sized to it). ``max_batch``: the largest batch considered (1 disables batching).
    ``profiles``: per model, profile samples or a ready CostModel (skips profiling).
    ``measure``: replaces validation load runs (``measure(config) -> {model: Measured}``).
    ``out_dir``: also write plan.toml, report.md and candidates.png there.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"tune: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise ValueError(f"tune: budget_s must be a positive number of seconds, got {budget_s!r}")
    cfg = config if isinstance(config, Config) else Config.load(config)
    for n, m in cfg.models.items():
        if not m.load:
            raise ConfigError(cfg.path, f"models.{n}.load", "the tuner needs each model's load: "
                              "{ rate = ... }, { share = ... } or { concurrency = ... }")
    stream = None if progress is False else (sys.stderr if progress is True else progress)
    bar = Progress(stream, budget_s)
    t0 = time.monotonic()
    rt_probe = cfg.runtime(topology_root=topology_root, build=False)
    try:
        total_cores = len(rt_probe.topology.usable_cores)
    finally:
        rt_probe.close(drain=False)

    # 1-2. profile and fit
    have_batching = max_batch > 1
    profile_shapes = [Shape(1, 1)]
    if total_cores > 1:
        profile_shapes.append(Shape(min(total_cores, 4), 1))
    if have_batching:
        profile_shapes.append(Shape(1, max_batch, 2.0))
    to_profile = [n for n in cfg.models if profiles is None or n not in profiles]
    runs = len(to_profile) * len(profile_shapes) + validate_top + 3
    settings = Settings.for_budget(budget_s * 0.9, runs)
    samples: dict[str, list[Sample]] = {}
    costs: dict[str, CostModel] = {}
    for n in cfg.models:
        given = (profiles or {}).get(n)
        if isinstance(given, CostModel):
            costs[n] = given
            samples[n] = []
            continue
        if given is not None:
            samples[n] = list(given)
        else:
            samples[n] = []
            for shape in profile_shapes:
                bar(f"profiling {n} {shape.describe()}")
                s = profile_model(cfg, n, shape, settings, topology_root=topology_root, total_cores=total_cores)
                if s is not None:
                    samples[n].append(s)
            if not samples[n]:
                raise ConfigError(cfg.path, f"models.{n}", "failed every profiling run (the model raised); "
                                  "check it with `apportion bench`")
        costs[n] = CostModel.fit(samples[n])

    # 3. allocate
    needs = _needs(cfg, costs, total_cores, max_batch if have_batching else 1)
    alloc = allocate(needs, float(total_cores), objective)
    candidates: list[Candidate] = []
    predicted = {n: a.served for n, a in alloc.items()}
    shared = shared_layout(alloc, total_cores)
    candidates.append(Candidate("shared pool", shared, "every model floats on all cores with the "
                                "allocated instances, threads and batching", predicted))
    iso = isolated_layout(alloc, total_cores)
    if iso is not None and iso != shared:
        candidates.append(Candidate("isolated", iso, "models that earned whole cores get them "
                                    "exclusively; the rest share the remainder", predicted))
    if any(c.batching for c in shared.values()):
        plain = {n: replace(c, batching=None) for n, c in shared.items()}
        candidates.append(Candidate("shared, no batching", plain, "as 'shared pool' without batching "
                                    "(in case batching's predicted gain does not hold)"))
    candidates = candidates[:max(1, validate_top)]

    # 4. validate, then refine
    run_measure = measure or (lambda c: measure_config(c, settings, topology_root=topology_root))
    for c in candidates:
        bar(f"validating '{c.name}'")
        c.measured = dict(run_measure(apply(cfg, c.choices)))

    def best() -> Candidate:
        return max(candidates, key=lambda c: c.rank(objective))

    per_run = max(settings.max_s, 0.5)
    tried = {tuple(sorted(c.choices.items(), key=lambda kv: kv[0])) for c in candidates}
    improved = True
    while improved and time.monotonic() - t0 + per_run <= budget_s:
        improved = False
        w = best()
        for move in _moves(w, needs, total_cores):
            if time.monotonic() - t0 + per_run > budget_s:
                break
            key = tuple(sorted(move.choices.items(), key=lambda kv: kv[0]))
            if key in tried:
                continue
            tried.add(key)
            bar(f"refining: {move.name}")
            try:
                move.measured = dict(run_measure(apply(cfg, move.choices)))
            except ConfigError:
                continue  # a move that does not fit this machine
            candidates.append(move)
            # Only a clear gain moves the search on: a score within 1% is measurement noise.
            if _clearly_better(move, w, objective):
                improved = True
                break
    winner = best()
    bar(f"done: '{winner.name}'")
    bar.done()
    result = TuneResult(apply(cfg, winner.choices), winner, candidates, samples, costs, alloc, objective,
                        time.monotonic() - t0, float(budget_s), total_cores)
    if out_dir is not None:
        result.write(out_dir)
    return result


def _clearly_better(a: Candidate, b: Candidate, objective: str) -> bool:
    if a.slo_ok() != b.slo_ok():
        return a.slo_ok()
    sa, sb = a.score(objective), b.score(objective)
    return sa > sb + 0.01 * abs(sb)


def _moves(w: Candidate, needs: Iterable[Need], total_cores: int) -> list[Candidate]:
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
