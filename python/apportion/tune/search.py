"""The search's pure steps: layouts of an allocation (candidates), a config with a candidate's
settings, the small moves that refine a winner, and how candidates rank. No runtime, no
clock: :func:`apportion.tune.tune` runs them against measurements."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..batching import Batching, users_single
from ..config import Config
from ..placement import Isolation
from .allocation import Allocation, objective_value
from .cost import CostModel, Need, Shape

__all__ = ["Candidate", "Choice", "Measured", "apply", "batching_for", "best", "clearly_better",
           "first_candidates", "isolated_layout", "lowered_bounds", "measured_bound", "moves", "needs_for", "overloaded",
           "profile_shapes",
           "GUARDED", "guarded", "NOISE_BOUNDED", "NOISE_MARGIN", "noise_bounded", "queue_bound", "shared_layout",
           "with_admission", "with_priorities"]

@dataclass(frozen=True)
class Choice:
    """One model's settings in a candidate."""

    isolation: Isolation
    cores: int | None
    instances: int
    threads: int
    batching: Batching | None
    max_queue: int | None = None
    """Admission: at most this many queued requests (more are refused at once with QueueFull);
    None keeps the config's own bound."""
    priority_class: int | None = None
    """Class on the scheduled shared pool (higher first); a plan with classes runs its shared
    models on ``shared_pool="scheduled"``."""

    def describe(self) -> str:
        where = f"{self.cores} excl" if self.isolation == "exclusive" else "shared"
        b = f" b<={self.batching.max_size}/{self.batching.max_delay_ms:g}ms" if self.batching else ""
        q = f" q<={self.max_queue}" if self.max_queue is not None else ""
        pc = f" class {self.priority_class}" if self.priority_class is not None else ""
        return f"{where} {self.instances}x{self.threads}t{b}{q}{pc}"


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
    offered: int = 0
    """Submission attempts over the reported windows (admitted or refused)."""
    windows_met: tuple[bool | None, ...] = ()
    """Per reported window: whether the SLO percentile of the requests admitted in it (expired
    and failed ones count as misses) was within the SLO; None for a window where nothing was
    admitted."""
    stable: bool = True
    """Whether the reported windows agreed (the load run settled before its time limit)."""
    within_slo: bool | None = None
    """Whether the admitted requests met the SLO itself, without the validation's margin, over
    the whole run (completions past the SLO, bounded from the report's percentiles, and
    expired or failed requests together within the SLO's share of misses; never True where
    they were not); None when not known (no margin, no SLO, nothing admitted). Among
    candidates that miss with the margin, one that held the SLOs themselves ranks first."""

    @property
    def fraction(self) -> float:
        return self.goodput / self.wanted if self.wanted else 1.0

    @property
    def refused_share(self) -> float:
        """Share of the offered requests refused at once (admission)."""
        return self.rejected / self.offered if self.offered else 0.0

    def admitted_met(self) -> bool:
        """Every admitted request held the SLO: over the reported windows and in each one."""
        return self.slo_met is not False and all(w is not False for w in self.windows_met)


@dataclass
class Candidate:
    name: str
    choices: dict[str, Choice]
    why: str
    predicted: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Measured] | None = None

    def slo_ok(self) -> bool:
        """Every model's admitted requests met its SLO, pooled and in every validation window."""
        return self.measured is not None and all(m.admitted_met() for m in self.measured.values())

    def stable(self) -> bool:
        return self.measured is not None and all(m.stable for m in self.measured.values())

    def met_count(self) -> int:
        """How many models' admitted requests met their SLOs."""
        return sum(m.admitted_met() for m in (self.measured or {}).values())

    def near_count(self) -> int:
        """How many models' admitted requests met their SLOs, with the margin or without it."""
        return sum(m.admitted_met() or m.within_slo is True for m in (self.measured or {}).values())

    def score(self, objective: str) -> float:
        if self.measured is None:
            return float("-inf")
        return objective_value({n: (m.goodput, m.wanted or m.throughput or 1.0) for n, m in self.measured.items()},
                          objective)

    def rank(self, objective: str) -> tuple[bool, int, int, float]:
        """Every SLO held first; then the most models holding theirs; then the most holding
        them at least without the margin (a plan whose misses are within the SLOs themselves
        before one that starves a model); then the objective."""
        return (self.slo_ok(), self.met_count(), self.near_count(), self.score(objective))

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
    """``config`` with each model's quota, batching and admission replaced by ``choices``
    (on a scheduled shared pool when a choice has a priority class; a shared model keeps its
    own class when the choice gives none). A process model stays one, with its watchdog and
    start bound, on the choice's cores (or none, floating). A model without a
    warm-up is warmed with its load's ``inputs`` where the config names them: a cold first
    call (several times a warm one) would otherwise land on the first requests, and a
    batching model's cost estimate starts from it. A ``pool_reserve`` for a class no model has
    any more is dropped (it would only lower the other models' OS priority)."""
    models = {}
    for name, m in config.models.items():
        c = choices.get(name)
        if c is None:
            models[name] = m
            continue
        # A process model stays one (its crash and hang isolation, watchdog and start bound are
        # the user's safety, not a quota): on the choice's cores, or floating without them.
        process = m.spec.process
        own_class = m.spec.priority_class if m.spec.isolation == "shared" else None
        spec = replace(m.spec, isolation="process" if process else c.isolation, instances=c.instances,
                       threads=c.threads, cores=c.cores, batching=users_single(c.batching, m.spec.batching),
                       oversubscribe=False, burst=False,
                       weight=None,
                       priority_class=(c.priority_class if c.priority_class is not None else own_class)
                       if c.isolation == "shared" and not process else None,
                       max_queue=c.max_queue if c.max_queue is not None else m.spec.max_queue,
                       warmup=m.spec.warmup if m.spec.warmup is not None else m.inputs,
                       watchdog_s=m.spec.watchdog_s if process else None,
                       start_timeout_s=m.spec.start_timeout_s if process else None)
        models[name] = replace(m, spec=spec)
    classes = any(c.priority_class is not None and c.isolation == "shared" for c in choices.values())
    reserve = config.pool_reserve
    if reserve:
        # A reservation no model's class reaches any more (the choices moved its models onto
        # cores of their own) would only lower the others' OS priority: it goes with them.
        top = max((m.spec.priority_class or 0 for m in models.values()), default=0)
        reserve = {k: v for k, v in reserve.items() if k <= top} or None
    return replace(config, models=models, shared_pool="scheduled" if classes else config.shared_pool,
                   pool_reserve=reserve)


def overloaded(alloc: Mapping[str, Allocation]) -> bool:
    """Whether the allocation predicts that some model's demand cannot all be served within
    its SLO (then the search bounds queues: refusing at once beats admitting to miss)."""
    return any(a.fraction < 0.99 for a in alloc.values())


def _wait_budget(need: Need, slo_ms: float, choice: Choice, margin: float) -> tuple[int, float]:
    # (batch size, ms a queued request may wait): the SLO less the margin, its own call and
    # the batching delay.
    b = choice.batching.max_size if choice.batching else 1
    delay = choice.batching.max_delay_ms if choice.batching else 0.0
    return b, slo_ms * (1.0 - margin) - need.cost.call_ms(choice.threads, b) - delay


def queue_bound(need: Need, choice: Choice, cores: float, margin: float = 0.0) -> int | None:
    """The admission bound for ``need`` served as ``choice`` on ``cores`` (its share): the
    most queued requests that the share drains, by the cost model, in time for the last one
    to finish within SLO x (1 - margin) after its own call and batching delay. At least one
    batch, at most the config's own bound (``need.max_queue``); None without an SLO."""
    if need.slo_ms is None:
        return None
    b, budget_ms = _wait_budget(need, need.slo_ms, choice, margin)
    rate = max(cores, 1e-3) * 1000.0 / need.cost.core_ms(choice.threads, b)  # req/s, flat out
    return _capped(need, max(b, int(budget_ms * rate / 1000.0)))


def _capped(need: Need, q: int) -> int:
    """``q``, at most the config's own bound for the model."""
    return q if need.max_queue is None else min(q, need.max_queue)


def measured_bound(need: Need, choice: Choice, measured: Measured, margin: float = 0.0) -> int | None:
    """As :func:`queue_bound`, with the rate the model actually completed requests at in a
    validation (under overload: what its share really serves) instead of the cost model's."""
    if need.slo_ms is None or measured.throughput <= 0:
        return None
    _, budget_ms = _wait_budget(need, need.slo_ms, choice, margin)
    return _capped(need, max(1, int(budget_ms * measured.throughput / 1000.0)))


def _share(name: str, choice: Choice, alloc: Mapping[str, Allocation] | None, total_cores: int) -> float:
    if choice.isolation == "exclusive" and choice.cores:
        return float(choice.cores)
    a = (alloc or {}).get(name)
    if a is not None and a.cores > 0:
        return a.cores
    return float(min(total_cores, choice.instances * choice.threads))


def with_admission(choices: Mapping[str, Choice], needs: Iterable[Need], alloc: Mapping[str, Allocation] | None,
                   total_cores: int, margin: float = 0.0, capacity: float = 1.0) -> dict[str, Choice]:
    """``choices`` with every model that has an SLO bounded by :func:`queue_bound`, each
    share counted at ``capacity`` (a fraction: on a noisy machine, what other processes leave)."""
    by = {n.name: n for n in needs}
    out = dict(choices)
    for n, c in choices.items():
        need = by.get(n)
        if need is not None:
            q = queue_bound(need, c, capacity * _share(n, c, alloc, total_cores), margin)
            if q is not None:
                out[n] = replace(c, max_queue=q)
    return out


def with_priorities(choices: Mapping[str, Choice], needs: Iterable[Need]) -> dict[str, Choice] | None:
    """The shared models in priority classes on the scheduled pool, the least slack (SLO over
    the time of one call) highest. None when fewer than two models share the pool."""
    by = {n.name: n for n in needs}
    shared = [n for n, c in choices.items() if c.isolation == "shared" and n in by]
    if len(shared) < 2:
        return None

    def slack(n: str) -> float:
        c, need = choices[n], by[n]
        b = c.batching.max_size if c.batching else 1
        return (need.slo_ms or float("inf")) / need.cost.call_ms(c.threads, b)

    order = sorted(shared, key=slack)
    out = dict(choices)
    for rank, n in enumerate(order):
        out[n] = replace(choices[n], priority_class=len(order) - 1 - rank)
    return out


def needs_for(config: Config, costs: Mapping[str, CostModel], total_cores: int, max_batch: int) -> list[Need]:
    demand = config.demand()
    threads = tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= total_cores) or (1,)
    batches = tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= max_batch)
    out = []
    for n, m in config.models.items():
        conc = (m.load or {}).get("concurrency")
        out.append(Need(n, costs[n], demand.get(n), conc, (m.slo or {}).get("latency_ms"), threads, batches,
                        max_queue=m.spec.max_queue))
    return out


def clearly_better(a: Candidate, b: Candidate, objective: str) -> bool:
    """``a`` ranks before ``b`` (:meth:`Candidate.rank`), by more than 1% where only the
    objective tells them apart."""
    *ka, sa = a.rank(objective)
    *kb, sb = b.rank(objective)
    if ka != kb:
        return ka > kb
    return sa > sb + 0.01 * abs(sb)


def moves(w: Candidate, needs: Iterable[Need], total_cores: int, *,
          alloc: Mapping[str, Allocation] | None = None, margin: float = 0.0,
          capacity: float = 1.0) -> list[Candidate]:
    """Small changes to the winner for the models it serves worst: admission (bound the queue
    of a model whose admitted requests missed; halve a bound that did not hold; double one that
    held while refusing requests), priority classes on the scheduled pool, one more instance, a
    larger or a smaller batch."""
    if w.measured is None:
        return []
    needs = list(needs)
    by = {n.name: n for n in needs}
    order = sorted(w.measured, key=lambda n: (w.measured[n].admitted_met(), w.measured[n].fraction))  # type: ignore[index]
    out = []
    # Several models missed (an overloaded or noisy machine): bound them all at once, each at
    # what its measured rate drains in time.
    tightened = {}
    for n, m in w.measured.items():
        c, need = w.choices[n], by.get(n)
        if not m.admitted_met() and need is not None:
            seen = measured_bound(need, c, m, margin)
            if seen is not None and (c.max_queue is None or seen < c.max_queue):
                tightened[n] = replace(c, max_queue=seen)
    if len(tightened) >= 2:
        out.append(Candidate(f"{w.name}, admission by measured rates", {**w.choices, **tightened},
                             f"refined from '{w.name}': " + ", ".join(tightened) + " missed their SLOs; each "
                             "queue bounded at what the model's measured rate drains in time"))
    for n in order:
        m = w.measured[n]
        c = w.choices[n]
        need = by.get(n)
        if not m.admitted_met() and need is not None:
            seen = measured_bound(need, c, m, margin)
            if c.max_queue is None:
                q = queue_bound(need, c, capacity * _share(n, c, alloc, total_cores), margin)
                if q is not None:
                    q = max(1, min(q, seen)) if seen is not None else q
                    out.append(Candidate(f"{w.name}, {n} admission q<={q}", {**w.choices, n: replace(c, max_queue=q)},
                                         f"refined from '{w.name}': {n}'s admitted requests missed its SLO; "
                                         "refuse at once what its share cannot serve in time"))
            elif c.max_queue > 1:
                # Halve, or straight to what the measured rate drains in time when that is less.
                q = max(1, min(c.max_queue // 2, seen if seen is not None else c.max_queue))
                out.append(Candidate(f"{w.name}, {n} admission q<={q}", {**w.choices, n: replace(c, max_queue=q)},
                                     f"refined from '{w.name}': {n} missed its SLO with q<={c.max_queue}"))
        elif (c.max_queue is not None and m.rejected > 0 and m.fraction < 0.95
              and (need is None or _capped(need, 2 * c.max_queue) > c.max_queue)):
            q = 2 * c.max_queue if need is None else _capped(need, 2 * c.max_queue)
            out.append(Candidate(f"{w.name}, {n} admission q<={q}", {**w.choices, n: replace(c, max_queue=q)},
                                 f"refined from '{w.name}': {n} held its SLO but refused {m.refused_share:.0%}"))
        if m.admitted_met() and m.fraction >= 0.95:
            continue
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
    missed_any = any(not m.admitted_met() for m in w.measured.values())
    if missed_any and all(c.priority_class is None for c in w.choices.values()):
        ranked = with_priorities(w.choices, needs)
        if ranked is not None:
            out.append(Candidate(f"{w.name}, priority classes", ranked,
                                 f"refined from '{w.name}': the shared models in priority classes on the "
                                 "scheduled pool, least slack first"))
    return out


GUARDED = ", guarded queues"
"""The suffix :func:`guarded` adds to the name of the candidate it bounds."""


def guarded(w: Candidate, needs: Iterable[Need], margin: float = 0.0,
            own_bounds: Mapping[str, int | None] | None = None) -> Candidate | None:
    """``w`` with the queue of every model it left unbounded bounded at what that model drained
    in ``w``'s measured run in time for its SLO (:func:`measured_bound`), where that is below
    the model's own bound (``own_bounds``: the config's ``max_queue`` by model); None when
    there is none to bound. A plan near the machine's capacity meets its SLOs in one run and, a burst
    later, expires a few percent of its requests in a queue that grew past what the deadline
    allows: bounded, it refuses those few at once instead."""
    if w.measured is None:
        return None
    by = {n.name: n for n in needs}
    bounds = {}
    for n, c in w.choices.items():
        need, m = by.get(n), w.measured.get(n)
        if c.max_queue is None and need is not None and m is not None:
            q = _drained_bound(need, c, m, margin)
            own = (own_bounds or {}).get(n)
            if q is not None and (own is None or q < own):
                bounds[n] = replace(c, max_queue=q)
    if not bounds:
        return None
    return Candidate(w.name + GUARDED, {**w.choices, **bounds},
                     f"'{w.name}' with " + ", ".join(f"{n} q<={c.max_queue}" for n, c in bounds.items())
                     + ": what each drained in time for its SLO in the confirmation run, so that a burst "
                     "is refused at once rather than left to expire in the queue")


def _drained_bound(need: Need, choice: Choice, measured: Measured, margin: float) -> int | None:
    """:func:`measured_bound`, at least one batch (below it every call is smaller)."""
    q = measured_bound(need, choice, measured, margin)
    return None if q is None else max(q, choice.batching.max_size if choice.batching else 1)


def lowered_bounds(before: Mapping[str, Choice], after: Mapping[str, Choice]) -> str:
    """The queue bounds of ``after`` that differ from ``before``'s, in words ("mlp q<=9 (was
    16), ..."; no "was" where ``before`` had none)."""
    return ", ".join(f"{n} q<={c.max_queue}" + (f" (was {before[n].max_queue})" if n in before
                                                and before[n].max_queue is not None else "")
                     for n, c in after.items() if n not in before or before[n].max_queue != c.max_queue)


NOISE_MARGIN = 0.10
"""The further share of each SLO a plan's queue bounds keep free when other processes kept CPUs
busy while the tuner measured (step 7 of :func:`apportion.tune.tune`)."""

NOISE_BOUNDED = ", queues bounded for other processes' load"
"""The suffix :func:`noise_bounded` adds to the name of the candidate it bounds."""


def noise_bounded(w: Candidate, needs: Iterable[Need], margin: float, extra: float,
                  own_bounds: Mapping[str, int | None] | None = None) -> Candidate | None:
    """``w`` with the queue of every model that has an SLO and was not served in full in
    ``w``'s measured run (it refused or expired requests, or served under 95% of its demand)
    bounded at what it drained in that run in time for SLO x (1 - ``margin`` - ``extra``, at
    most 0.9) (at least one batch), where that is below its present bound (the candidate's,
    else ``own_bounds``: the config's ``max_queue`` by model); None when no bound comes down.
    Beside other processes' work the rate a model keeps varies within a run: a queue that the
    average rate drains in time fills past its deadline in the moments they take more, and
    its last requests expire. A model served in full completed what arrived, not what it
    could: a bound from that rate would refuse bursts it serves in time, so it keeps its own."""
    if w.measured is None:
        return None
    by = {n.name: n for n in needs}
    tighter = min(margin + extra, 0.9)
    bounds = {}
    for n, c in w.choices.items():
        need, m = by.get(n), w.measured.get(n)
        if need is None or m is None or not (m.rejected > 0 or m.expired > 0 or m.fraction < 0.95):
            continue
        q = _drained_bound(need, c, m, tighter)
        was = c.max_queue if c.max_queue is not None else (own_bounds or {}).get(n)
        if q is not None and (was is None or q < was):
            bounds[n] = replace(c, max_queue=q)
    if not bounds:
        return None
    return Candidate(w.name + NOISE_BOUNDED, {**w.choices, **bounds},
                     f"'{w.name}' beside other processes' load, with {lowered_bounds(w.choices, bounds)}"
                     + f": what each drained in its last run in time for its SLO less {tighter:.0%}, so that "
                     "a moment in which the other processes take more is refused at once rather than left "
                     "to expire in the queue")


def profile_shapes(total_cores: int, max_batch: int) -> list[Shape]:
    """The shapes each model is profiled on alone: one thread; up to four threads (when the
    machine has more than one core); a batch of ``max_batch`` (when batching is allowed)."""
    shapes = [Shape(1, 1)]
    if total_cores > 1:
        shapes.append(Shape(min(total_cores, 4), 1))
    if max_batch > 1:
        shapes.append(Shape(1, max_batch, 2.0))
    return shapes


def first_candidates(alloc: Mapping[str, Allocation], total_cores: int, limit: int,
                     needs: Iterable[Need] | None = None, margin: float = 0.0,
                     admission: bool | None = None, capacity: float = 1.0) -> list[Candidate]:
    """The layouts of an allocation worth validating, most promising first, at most ``limit``
    (at least one): everything on a shared pool; whole cores for the models that earned them;
    the shared pool without batching (in case batching's predicted gain does not hold).

    When the allocation predicts more demand than the machine serves within the SLOs (and
    ``needs`` are given), every layout comes with admission bounds (:func:`with_admission`),
    and the shared pool also in priority classes: a plan then serves the most it can while
    every request it admits meets its SLO, refusing the rest at once. ``admission`` True asks
    for that whatever the prediction (the tuner does on a noisy machine, whose capacity the
    profiles may overstate); False never. ``capacity``: the fraction of each share the bounds
    count on (see :func:`with_admission`)."""
    predicted = {n: a.served for n, a in alloc.items()}
    needs = list(needs or ())
    admit = bool(needs) and (overloaded(alloc) if admission is None else admission)

    def bounded(choices: dict[str, Choice]) -> dict[str, Choice]:
        return with_admission(choices, needs, alloc, total_cores, margin, capacity) if admit else choices

    tag = ", admission" if admit else ""
    why = "; queues bounded so that what is admitted meets its SLO" if admit else ""
    shared = shared_layout(alloc, total_cores)
    out = [Candidate(f"shared pool{tag}", bounded(shared), "every model floats on all cores with the "
                     f"allocated instances, threads and batching{why}", predicted)]
    iso = isolated_layout(alloc, total_cores)
    if iso is not None and iso != shared:
        out.append(Candidate(f"isolated{tag}", bounded(iso), "models that earned whole cores get them "
                             f"exclusively; the rest share the remainder{why}", predicted))
    if admit:
        ranked = with_priorities(bounded(shared), needs)
        if ranked is not None:
            out.append(Candidate("shared pool, admission, priority classes", ranked,
                                 "as 'shared pool, admission' on the scheduled pool, the models with "
                                 "the least slack in the highest classes", predicted))
    if any(c.batching for c in shared.values()):
        plain = {n: replace(c, batching=None) for n, c in shared.items()}
        out.append(Candidate(f"shared, no batching{tag}", bounded(plain), f"as 'shared pool{tag}' without "
                             "batching (in case batching's predicted gain does not hold)"))
    return out[:max(1, limit)]


def best(candidates: Sequence[Candidate], objective: str) -> Candidate:
    """The winner: every SLO met first, then the objective's score."""
    return max(candidates, key=lambda c: c.rank(objective))
