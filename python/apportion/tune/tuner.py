"""The tuner's run: profile, fit, allocate, validate and refine under a time budget."""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from .._private.checks import finite_number
from ..batching import _MAX_BATCH as MAX_BATCH
from ..config import Config, ConfigError, model_key
from ..errors import QuotaError
from .allocation import OBJECTIVES, Objective, allocate
from .cost import CostModel, Sample
from .measure import FAILED_SHARE, Settings, host_snapshot, measure_config, profile_repeated
from .noise import FOREIGN_NOTICED, HostSnapshot, Noise, combine_repeats, profile_spread
from .report import TuneResult, writable_outputs
from .search import (Candidate, Measured, apply, best, clearly_better, first_candidates, guarded, moves,
                     NOISE_MARGIN, needs_for, noise_bounded, profile_shapes)

__all__ = ["GUARD_COST", "NEAR_MISS_GAIN", "NOISE_MARGIN", "ProfilingFailed", "confirmation_settings", "tune",
           "with_margin"]


class ProfilingFailed(ConfigError):
    """A model of a valid config that raised in every profiling run (the message names its key).
    A run-time failure, not a usage error: the command line exits 1."""

GUARD_COST = 0.03
"""The share of goodput a confirmed winner may give up for bounded queues (step 6 of tune)."""

NEAR_MISS_GAIN = 0.10
"""How much more than the winner a candidate that missed an SLO must score for its admission
to be tightened in the refinement (step 4 of tune)."""


def confirmation_settings(settings: Settings) -> Settings:
    """The length of the run that confirms a winner: ``settings`` with windows (and warm-up) of
    at least one second, three stable windows, and room for six."""
    window = max(1.0, settings.window_s)
    warmup = max(1.0, settings.warmup_s)
    return Settings(warmup_s=warmup, window_s=window, stable_windows=3, max_s=warmup + 6 * window)


def with_margin(config: Config, margin: float) -> Config:
    """``config`` with each model's SLO latency tightened to latency_ms x (1 - margin)."""
    if margin == 0:
        return config
    models = {n: replace(m, slo={**m.slo, "latency_ms": m.slo["latency_ms"] * (1.0 - margin)})
              if m.slo and m.slo.get("latency_ms") is not None else m for n, m in config.models.items()}
    return replace(config, models=models)


def check_loads(cfg: Config) -> None:
    """Raises ConfigError naming the first model of ``cfg`` without a load (the tuner needs each)."""
    for n, m in cfg.models.items():
        if not m.load:
            raise ConfigError(cfg.path, f"{model_key(n)}.load", "the tuner needs each model's load: "
                              "{ rate = ... }, { share = ... } or { concurrency = ... }")


def tune(
    config: Config | str | Path,
    *,
    budget_s: float = 60.0,
    objective: Objective = "goodput",
    topology_root: str = "/",
    max_batch: int = 8,
    validate_top: int = 3,
    margin: float = 0.1,
    progress: bool | TextIO = True,
    profiles: Mapping[str, Sequence[Sample] | CostModel] | None = None,
    measure: Callable[[Config], Mapping[str, Measured]] | None = None,
    out_dir: str | Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    profile_repeats: int = 3,
    host: Callable[[], HostSnapshot | None] | None = None,
) -> TuneResult:
    """Finds a plan for the models of ``config`` (a :class:`Config` or a TOML path) under its
    workload: each model's ``load`` (rate, share of ``[workload] rate``, or closed-loop
    concurrency) and ``slo``.

    ``objective``: "goodput" (total requests/s within SLOs) or "min_fraction" (the worst-served
    model's fraction of its demand). ``budget_s`` sizes the search (profiling and validation
    runs are sized to it), with a floor it does not lower: every model is profiled once at each
    shape (one and two threads, a batch) in runs of at least a second, so many models or a tiny
    budget take longer than the budget (about 5 s for one model, 24 s for ten); the report says
    how long the search took against the budget. ``max_batch``: the largest batch considered (1 disables batching).
    ``margin``: a candidate meets a model's SLO only if the SLO's percentile of the requests it
    admitted (expired and failed ones count as misses) stays within latency_ms x (1 - margin) in
    each of the validation's stable windows (at least three) and over all of them (default 10%): a plan
    that meets its SLO by a hair in one short run misses it in the next. The best candidate is
    refined by small moves while the budget lasts; when they bring no clear gain, a candidate
    that missed an SLO while its objective scored more than :data:`NEAR_MISS_GAIN` (10%) above
    the winner's gets the moves that tighten the queue bounds its misses call for (the
    winner's own moves never reach another layout; a tightening that still misses is tried
    further only while it misses less). The winner is then
    confirmed in a longer run (windows of at least a second, :func:`confirmation_settings`):
    a plan near the machine's capacity can pass a short validation before its queues fill.
    One that misses there ranks by that run; the admission bounds its misses call for are
    tried at that length, and the best remaining candidate is confirmed in turn, while the
    budget lasts (refinement stops early enough to leave time for two confirmation runs).
    A confirmed winner that leaves some model's queue unbounded is run once more with those
    queues bounded at what each model drained in time for its SLO (:func:`guarded`); that
    plan wins if it holds every SLO at most :data:`GUARD_COST` (3%) below in goodput.
    When other processes kept CPUs busy while the tuner measured (at least
    ``FOREIGN_NOTICED`` of them on average), the rate a model keeps varies within a run, and a
    queue bound that its average rate drains in time fills past the deadline in the moments
    they take more: the queue of each model with an SLO that its share did not serve in full
    (it refused or expired requests, or served under 95% of its demand) is then bounded at
    what it drained in the winner's last run in time for its SLO less a further
    :data:`NOISE_MARGIN` (10%) where that is lower (:func:`search.noise_bounded`), and that
    plan is the winner, run once more at the confirmation's length for the report's figures
    (that run may take the search past its budget; the plan's goodput may be lower: it
    refuses at once what a slower moment would not serve in time). Not for a config with
    process models, whose workers the host's figures count as other processes' work.
    When the models' demand exceeds what the machine serves within the SLOs, candidates bound
    each model's queue (``max_queue``: the excess is refused at once) and try priority classes
    on the scheduled shared pool; the winner is then the plan that serves the most within the
    SLOs while every admitted request meets its SLO, and :meth:`TuneResult.shortfall` says how
    many cores are missing.
    ``profile_repeats``: each profiled shape is run again while its per-window estimates spread
    by more than 10%, at most this many runs (fewer when the budget runs short); the fit uses
    the median, and the report gives the spread.
    ``profiles``: per model, profile samples (repeats of one shape allowed: median and spread,
    as for measured ones) or a ready CostModel (skips profiling).
    ``measure``: replaces validation load runs (``measure(config) -> {model: Measured}``).
    ``host``: a snapshot of the machine's CPU use (default: /proc/stat, see
    :func:`apportion.tune.measure.host_snapshot`), taken around every run to see what other
    processes took: the report names that noise and lowers its confidence. When profiling
    saw noise, every candidate gets admission bounds, sized for the share of the CPUs the
    other processes' work leaves (:meth:`Noise.capacity`).
    ``out_dir``: also write plan.toml, report.md and candidates.png there.
    ``clock``: seconds for the budget (a simulation passes its own, with ``measure``).
    """
    if objective not in OBJECTIVES:
        raise QuotaError(f"tune: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}",
                         field="objective")
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise QuotaError(f"tune: margin must be a fraction in [0, 1), got {margin!r}", field="margin")
    if not (finite_number(budget_s) and budget_s > 0):
        raise QuotaError(f"tune: budget_s must be a positive, finite number of seconds, got {budget_s!r}",
                         field="budget_s")
    for fld, value, most in (("profile_repeats", profile_repeats, None), ("max_batch", max_batch, MAX_BATCH),
                             ("validate_top", validate_top, None)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 or (
                most is not None and value > most):
            within = f"in [1, {most}]" if most is not None else ">= 1"
            raise QuotaError(f"tune: {fld} must be an integer {within}, got {value!r}", field=fld)
    max_batch, validate_top, profile_repeats = int(max_batch), int(validate_top), int(profile_repeats)
    if not isinstance(progress, bool) and not callable(getattr(progress, "write", None)):
        raise QuotaError(f"tune: progress must be True, False or a text stream, got {progress!r}", field="progress")
    if measure is not None and not callable(measure):
        raise QuotaError(f"tune: measure must be callable (config -> {{model: Measured}}), got {measure!r}",
                         field="measure")
    cfg = config if isinstance(config, Config) else Config.load(config)
    if not cfg.models:
        raise QuotaError("tune: the config has no models", field="config")
    unknown = sorted(set(profiles or {}) - set(cfg.models))
    if unknown:
        raise QuotaError(f"tune: profiles names {unknown[0]!r}, which is not a model of the config "
                         f"({', '.join(cfg.models)})", model=unknown[0], field="profiles")
    check_loads(cfg)
    if out_dir is not None:
        # What would fail the writing is refused now, not after the budget: a value plan.toml
        # cannot hold, an output path that is a directory, the plot without matplotlib.
        cfg.to_toml()
        if Path(out_dir).exists() and not Path(out_dir).is_dir():  # (FileExistsError at the end)
            raise ConfigError(str(out_dir), "out_dir", "exists and is not a directory; the tuner writes "
                              "plan.toml, report.md and candidates.png in it: give another out_dir")
        writable_outputs(out_dir)
    bar = _progress(progress, budget_s, clock)
    t0 = clock()
    watch = _HostWatch(host or host_snapshot)
    rt_probe = cfg.runtime(topology_root=topology_root, build=False)
    try:
        total_cores = len(rt_probe.topology.usable_cores)
    finally:
        rt_probe.close(drain=False)

    # 1-2. profile and fit
    shapes = profile_shapes(total_cores, max_batch)
    to_profile = [n for n in cfg.models if profiles is None or n not in profiles]
    runs = len(to_profile) * len(shapes) + validate_top + 3
    settings = Settings.for_budget(budget_s * 0.9, runs)
    # Profiles need throughput estimates only: half-length windows suffice. Repeats are run
    # only where every first run still fits before 40% of the budget: validation and
    # refinement keep theirs.
    profile_settings = replace(settings, warmup_s=settings.warmup_s / 2, window_s=max(0.2, settings.window_s / 2),
                               max_s=settings.max_s / 2)
    profile_until = t0 + budget_s * 0.4
    first_runs = len(to_profile) * len(shapes)
    profiled = 0
    profile_s = 0.0
    samples: dict[str, list[Sample]] = {}
    costs: dict[str, CostModel] = {}
    for n in cfg.models:
        given = (profiles or {}).get(n)
        if isinstance(given, CostModel):
            costs[n] = given
            samples[n] = []
            continue
        if given is not None:
            if isinstance(given, (str, bytes)) or not isinstance(given, Iterable) or not all(
                    isinstance(x, Sample) for x in given):
                raise QuotaError(f"tune: profiles[{n!r}] must be a CostModel or a sequence of "
                                 f"apportion.tune.Sample, got {given!r}"[:300], model=n, field="profiles")
            samples[n] = list(given)
            if not samples[n]:
                raise QuotaError(f"tune: profiles[{n!r}] holds no samples; give at least one Sample, a "
                                 "CostModel, or leave the model out to profile it", model=n, field="profiles")
        else:
            samples[n] = []
            for shape in shapes:
                bar(f"profiling {n} {shape.describe()}")
                per_run = (profile_s / profiled if profiled else
                           profile_settings.warmup_s + profile_settings.stable_windows * profile_settings.window_s)
                spare = profile_until - clock() - (first_runs - profiled) * per_run
                repeats = 1 + (min(profile_repeats - 1, int(spare / per_run)) if per_run > 0 and spare > 0 else 0)
                started = clock()
                with watch.run():
                    got = profile_repeated(cfg, n, shape, profile_settings, topology_root=topology_root,
                                           total_cores=total_cores, repeats=repeats)
                # Timed per run (each gives up to stable_windows estimates): a repeated shape costs several.
                runs_done = max(1, math.ceil(len(got) / profile_settings.stable_windows))
                profiled += 1
                profile_s += (clock() - started) / runs_done
                samples[n].extend(got)
            if not samples[n]:
                raise ProfilingFailed(cfg.path, model_key(n), "failed in every profiling run (the model raised "
                                      f"on more than {FAILED_SHARE:.0%} of its calls); check it with `apportion bench`")
        costs[n] = CostModel.fit(combine_repeats(samples[n]))

    # 3. allocate
    needs = needs_for(cfg, costs, total_cores, max(1, max_batch))
    alloc = allocate(needs, float(total_cores), objective)
    # On a noisy machine the profiles may overstate what the models will get: bound the
    # queues from the start, so that what is admitted still meets its SLO, and size the
    # bounds for the share of the CPUs the other processes' work leaves.
    seen = watch.runs_noise(total_cores, {n: profile_spread(v) for n, v in samples.items()})
    capacity = seen.capacity() if seen.noisy() else 1.0
    candidates = first_candidates(alloc, total_cores, validate_top, needs, float(margin),
                                  admission=True if seen.noisy() else None, capacity=capacity)

    # 4. validate, then refine. Every validation, measured or injected, sees the SLOs
    # tightened by the margin (the deadlines stay those of the plan).
    tight = with_margin(cfg, float(margin))
    measure_fn = measure or (lambda c: measure_config(c, settings, topology_root=topology_root))

    def run_measure(c: Config, fn: Callable[[Config], Mapping[str, Measured]] = measure_fn) -> dict[str, Measured]:
        with watch.run():
            got = dict(fn(c))
        # A model left out would count as meeting its SLO; one not in the config has no need.
        missing, extra = sorted(set(c.models) - set(got)), sorted(set(got) - set(c.models))
        if missing or extra or not all(isinstance(v, Measured) for v in got.values()):
            raise QuotaError(f"tune: measure(config) must return a Measured for each of the config's models "
                             f"({', '.join(c.models)}); "
                             + (f"it left out {missing}" if missing else f"it named {extra}" if extra else
                                "it returned other values"), field="measure")
        return got

    for c in candidates:
        bar(f"validating '{c.name}'")
        c.measured = run_measure(apply(tight, c.choices))

    per_run = max(settings.max_s, 0.5)
    # 5 (below) needs time for up to two confirmation runs: refinement stops short of it.
    confirm_settings = confirmation_settings(settings)
    confirm_s = confirm_settings.max_s + 0.5
    refine_until = budget_s - min(2 * confirm_s, 0.3 * budget_s)
    def key_of(c: Candidate) -> tuple[Any, ...]:
        return tuple(sorted(c.choices.items(), key=lambda kv: kv[0]))

    tried = {key_of(c) for c in candidates}

    def measure_move(move: Candidate, what: str, fn: Callable[[Config], Mapping[str, Measured]],
                     again: bool = False) -> bool:
        """Measures a move not tried before (``again``: even if tried) and adds it to the
        candidates (False: tried before, or it does not fit this machine)."""
        key = key_of(move)
        if key in tried and not again:
            return False
        tried.add(key)
        bar(f"{what}: {move.name}")
        try:
            move.measured = run_measure(apply(tight, move.choices), fn)
        except ConfigError:
            return False
        candidates.append(move)
        return True

    tightened: set[tuple[Any, ...]] = set()
    parent_misses: dict[tuple[Any, ...], int] = {}  # a tightening's key -> its near miss's missed windows

    def missed(c: Candidate) -> int:
        return sum(v is False for m in (c.measured or {}).values() for v in (m.slo_met, *m.windows_met))

    def tighten_near_miss(w: Candidate, until: float) -> bool:
        """The winner's moves spent: the candidate that missed an SLO while its objective scored
        more than NEAR_MISS_GAIN above ``w``'s (the best such, each once) gets the moves that
        tighten the queue bounds its misses call for. A bound that refuses a little more at
        once may hold every SLO where the winner's layout cannot serve as much, and the
        winner's own moves never reach another layout. A tightening that still misses is a near
        miss in turn only if it missed less than the one it came from (a miss the queue does
        not cause is not chased down to a bound of 1). Returns whether the search goes on: a
        near miss was tried (the winner may have changed, and the next one gets its turn)."""
        if clock() - t0 + per_run > until:
            return False
        near = [c for c in candidates if c.measured is not None and not c.slo_ok() and key_of(c) not in tightened
                and c.score(objective) > (1.0 + NEAR_MISS_GAIN) * w.score(objective)
                and missed(c) < parent_misses.get(key_of(c), math.inf)]
        if not near:
            return False
        n = max(near, key=lambda c: c.rank(objective))
        tightened.add(key_of(n))
        gain = n.score(objective) / w.score(objective) - 1.0 if w.score(objective) > 0 else math.inf

        def tightens(move: Candidate) -> bool:
            def below(q: int | None, was: int | None) -> bool:
                return q is not None and (was is None or q < was)

            return any(below(c.max_queue, n.choices[k].max_queue) for k, c in move.choices.items())

        for move in moves(n, needs, total_cores, alloc=alloc, margin=float(margin), capacity=capacity):
            if not tightens(move):
                continue
            if clock() - t0 + per_run > until:
                break
            move.why = f"a near miss ({objective} {gain:+.0%} over '{w.name}'), {move.why}"
            parent_misses.setdefault(key_of(move), missed(n))
            if measure_move(move, "refining", measure_fn) and clearly_better(move, w, objective):
                break
        return True

    def refine(until: float) -> None:
        improved = True
        while improved and clock() - t0 + per_run <= until:
            improved = False
            w = best(candidates, objective)
            if w.slo_ok():
                until = min(until, refine_until)  # a plan to confirm: keep the time for it
            for move in moves(w, needs, total_cores, alloc=alloc, margin=float(margin), capacity=capacity):
                if clock() - t0 + per_run > until:
                    break
                # Only a clear gain moves the search on: a score within 1% is measurement noise.
                if measure_move(move, "refining", measure_fn) and clearly_better(move, w, objective):
                    improved = True
                    break
            if not improved:
                improved = tighten_near_miss(w, until)

    refine(refine_until)
    if not best(candidates, objective).slo_ok():
        refine(budget_s)  # nothing to confirm yet: the time kept for confirming goes to the search
    # 5. confirm. A validation run is short (its windows sized to the budget), and a plan near
    # the machine's capacity can pass it before its queues have filled, then miss in a longer
    # run. The winner is run once more with windows of at least a second; when it misses there,
    # it ranks by that run, the admission bounds its misses call for are tried at that length,
    # and the best of what remains is confirmed in turn (while the budget lasts).
    confirm_fn = measure or (lambda c: measure_config(c, confirm_settings, topology_root=topology_root))
    confirmed: list[Candidate] = []
    for _ in range(4):
        w = best(candidates, objective)
        if not w.slo_ok() or any(c is w for c in confirmed):
            break
        if clock() - t0 + confirm_s > budget_s * 1.1:
            break
        bar(f"confirming '{w.name}'")
        w.measured = run_measure(apply(tight, w.choices), confirm_fn)
        confirmed.append(w)
        if w.slo_ok():
            break
        for move in moves(w, needs, total_cores, alloc=alloc, margin=float(margin), capacity=capacity)[:2]:
            if "admission" not in move.name or clock() - t0 + confirm_s > budget_s * 1.1:
                continue
            if measure_move(move, "confirming", confirm_fn):
                confirmed.append(move)
    winner = best(candidates, objective)
    # 6. guard. A confirmed winner that leaves a model's queue unbounded is tried once more
    # with bounds at what each model drained in time (see search.guarded), and taken if it
    # holds every SLO at no more than GUARD_COST less goodput: it refuses a burst at once
    # where the unbounded plan, in the next run, lets it expire.
    if winner.slo_ok() and any(c is winner for c in confirmed) and clock() - t0 + confirm_s <= budget_s * 1.1:
        g = guarded(winner, needs, float(margin), {n: m.spec.max_queue for n, m in cfg.models.items()})
        if g is not None and measure_move(g, "guarding", confirm_fn):
            confirmed.append(g)
            if g.slo_ok() and g.score(objective) >= (1.0 - GUARD_COST) * winner.score(objective):
                winner = g
    # 7. beside other processes. When they kept CPUs busy while the search measured, the rate
    # each model keeps varies within a run: the queue of each model its share could not serve
    # in full is bounded at what it drained in the winner's last run in time for its SLO less
    # NOISE_MARGIN more (see search.noise_bounded), and that plan, run once more at the
    # confirmation's length (past the budget if need be: noise is when the budget runs out),
    # is the winner whatever the run shows (the report gives its figures): the measurements
    # that chose the winner are the noisy ones. Not for a config with process models: their
    # workers are child processes, which the host's figures count as other processes' work.
    noisy_host = (watch.runs_noise(total_cores, {}).foreign_cpus or 0.0) >= FOREIGN_NOTICED
    if noisy_host and winner.measured is not None and not any(
            m.spec.isolation == "process" for m in cfg.models.values()):
        nb = noise_bounded(winner, needs, float(margin), NOISE_MARGIN,
                           {n: m.spec.max_queue for n, m in cfg.models.items()})
        if nb is not None and measure_move(nb, "bounding for the other processes", confirm_fn, again=True):
            confirmed.append(nb)
            winner = nb
    bar(f"done: '{winner.name}'")
    bar.done()
    unstable = tuple(c.name for c in candidates if c.measured is not None and not c.stable())
    noise = watch.noise(total_cores, {n: profile_spread(v) for n, v in samples.items()}, unstable)
    # The plan carries each model's fitted cost model: `apportion run --adapt` gives them to
    # the controller, as the demo gives it this result's.
    plan = apply(cfg, winner.choices)
    plan = replace(plan, models={n: replace(m, cost=costs.get(n, m.cost)) for n, m in plan.models.items()})
    result = TuneResult(plan, winner, candidates, samples, costs, alloc, objective,
                        clock() - t0, float(budget_s), total_cores, float(margin), settings, needs, noise,
                        [c.name for c in confirmed], confirm_settings)
    if out_dir is not None:
        result.write(out_dir)
    return result


class _HostWatch:
    """Snapshots of the machine's CPU use around each measurement run: the mean of what other
    processes took over the whole search, and the most over any one run."""

    def __init__(self, snap: Callable[[], HostSnapshot | None]) -> None:
        self.snap = snap
        self.first = snap()
        self.peak: float | None = None
        self.busy_s = self.wall_s = 0.0

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        before = self.snap()
        yield
        after = self.snap()
        if before is not None and after is not None:
            f = after.foreign_cpus(before)
            self.peak = f if self.peak is None else max(self.peak, f)
            self.busy_s += f * (after.wall_s - before.wall_s)
            self.wall_s += after.wall_s - before.wall_s

    def runs_noise(self, cpus: int, spreads: dict[str, dict[tuple[int, int], float]]) -> Noise:
        """The noise of the runs watched so far (none: no foreign load known)."""
        mean = self.busy_s / self.wall_s if self.wall_s > 0 else None
        return Noise(cpus, mean, self.peak, {n: v for n, v in spreads.items() if v})

    def noise(self, cpus: int, spreads: dict[str, dict[tuple[int, int], float]], unstable: tuple[str, ...]) -> Noise:
        last = self.snap()
        both = self.first is not None and last is not None
        mean = last.foreign_cpus(self.first) if both else None  # type: ignore[union-attr,arg-type]
        steal = last.steal_cpus(self.first) if both else None  # type: ignore[union-attr,arg-type]
        return Noise(cpus, mean, self.peak, {n: v for n, v in spreads.items() if v}, unstable, steal)


class _Silent:
    def __call__(self, what: str) -> None:
        pass

    def done(self) -> None:
        pass


def _progress(progress: bool | TextIO, budget_s: float, clock: Callable[[], float]) -> Any:
    # The display lives in an optional module, imported only when a run shows progress.
    if progress is False:
        return _Silent()
    from .progress import Progress

    return Progress(sys.stderr if progress is True else progress, budget_s, clock)
