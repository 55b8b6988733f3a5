"""The tuner's run: profile, fit, allocate, validate and refine under a time budget."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..config import Config, ConfigError
from .allocation import OBJECTIVES, Objective, allocate
from .cost import CostModel, Sample
from .measure import Settings, measure_config, profile_model
from .report import TuneResult
from .search import Measured, apply, best, clearly_better, first_candidates, moves, needs_for, profile_shapes

__all__ = ["tune"]


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
) -> TuneResult:
    """Finds a plan for the models of ``config`` (a :class:`Config` or a TOML path) under its
    workload: each model's ``load`` (rate, share of ``[workload] rate``, or closed-loop
    concurrency) and ``slo``.

    ``objective``: "goodput" (total requests/s within SLOs) or "min_fraction" (the worst-served
    model's fraction of its demand). ``budget_s`` bounds the search (profiling and validation
    runs are sized to it). ``max_batch``: the largest batch considered (1 disables batching).
    ``margin``: a candidate meets a model's SLO only if its latency percentile stays within
    latency_ms x (1 - margin) over the validation's stable windows (default 10%): a plan that
    meets its SLO by a hair in one short run misses it in the next.
    ``profiles``: per model, profile samples or a ready CostModel (skips profiling).
    ``measure``: replaces validation load runs (``measure(config) -> {model: Measured}``).
    ``out_dir``: also write plan.toml, report.md and candidates.png there.
    ``clock``: seconds for the budget (a simulation passes its own, with ``measure``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"tune: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ValueError(f"tune: margin must be a fraction in [0, 1), got {margin!r}")
    if not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise ValueError(f"tune: budget_s must be a positive number of seconds, got {budget_s!r}")
    cfg = config if isinstance(config, Config) else Config.load(config)
    for n, m in cfg.models.items():
        if not m.load:
            raise ConfigError(cfg.path, f"models.{n}.load", "the tuner needs each model's load: "
                              "{ rate = ... }, { share = ... } or { concurrency = ... }")
    bar = _progress(progress, budget_s, clock)
    t0 = clock()
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
            for shape in shapes:
                bar(f"profiling {n} {shape.describe()}")
                s = profile_model(cfg, n, shape, settings, topology_root=topology_root, total_cores=total_cores)
                if s is not None:
                    samples[n].append(s)
            if not samples[n]:
                raise ConfigError(cfg.path, f"models.{n}", "failed every profiling run (the model raised); "
                                  "check it with `apportion bench`")
        costs[n] = CostModel.fit(samples[n])

    # 3. allocate
    needs = needs_for(cfg, costs, total_cores, max(1, max_batch))
    alloc = allocate(needs, float(total_cores), objective)
    candidates = first_candidates(alloc, total_cores, validate_top)

    # 4. validate, then refine
    run_measure = measure or (lambda c: measure_config(c, settings, topology_root=topology_root, margin=margin))
    for c in candidates:
        bar(f"validating '{c.name}'")
        c.measured = dict(run_measure(apply(cfg, c.choices)))

    per_run = max(settings.max_s, 0.5)
    tried = {tuple(sorted(c.choices.items(), key=lambda kv: kv[0])) for c in candidates}
    improved = True
    while improved and clock() - t0 + per_run <= budget_s:
        improved = False
        w = best(candidates, objective)
        for move in moves(w, needs, total_cores):
            if clock() - t0 + per_run > budget_s:
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
            if clearly_better(move, w, objective):
                improved = True
                break
    winner = best(candidates, objective)
    bar(f"done: '{winner.name}'")
    bar.done()
    result = TuneResult(apply(cfg, winner.choices), winner, candidates, samples, costs, alloc, objective,
                        clock() - t0, float(budget_s), total_cores, float(margin), settings, needs)
    if out_dir is not None:
        result.write(out_dir)
    return result


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
