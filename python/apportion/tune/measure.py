"""Measuring for the tuner: profile one model alone and serve a whole config under its load,
through :mod:`apportion.load` on a runtime built from the config."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .. import load as ld
from ..config import Config, ConfigError
from .cost import Sample, Shape
from .search import Measured, batching_for

__all__ = ["Settings", "measure_config", "profile_model"]


def _tightened(load: ld.ModelLoad, margin: float) -> ld.ModelLoad:
    if margin == 0 or load.slo is None or load.slo.latency_ms is None:
        return load
    return replace(load, slo=replace(load.slo, latency_ms=load.slo.latency_ms * (1.0 - margin)))


@dataclass(frozen=True)
class Settings:
    """Load-run lengths (seconds)."""

    warmup_s: float = 0.5
    window_s: float = 0.5
    stable_windows: int = 3
    max_s: float = 4.0

    def run(self, rt: Any, loads: list[ld.ModelLoad], seed: int | None = None) -> ld.LoadReport:
        """One :func:`apportion.load.run` of these lengths (15% tolerance; max_s at least
        long enough for the warm-up and the stable windows)."""
        return ld.run(rt, loads, warmup_s=self.warmup_s, window_s=self.window_s,
                      stable_windows=self.stable_windows, tolerance=0.15, seed=seed,
                      max_s=max(self.max_s, self.warmup_s + self.stable_windows * self.window_s))

    @classmethod
    def for_budget(cls, budget_s: float, runs: int) -> Settings:
        per_run = max(1.0, budget_s / max(runs, 1))
        window = min(2.0, max(0.2, per_run / 6.0))
        return cls(warmup_s=window, window_s=window, stable_windows=3, max_s=max(per_run, 4 * window))


def measure_config(config: Config, settings: Settings = Settings(), *, topology_root: str = "/",
                   seed: int | None = 0, margin: float = 0.0) -> dict[str, Measured]:
    """Serves ``config`` and puts its load on it (:func:`apportion.load.run`); per model figures.
    ``margin``: a model meets its SLO only with latency_ms x (1 - margin) (and goodput counts
    the requests within that), so a plan validated here keeps room for a noisier run."""
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ValueError(f"measure_config: margin must be in [0, 1), got {margin!r}")
    loads = [_tightened(ld_, margin) for ld_ in config.model_loads()]
    if not loads:
        raise ConfigError(config.path, "models", "no model has a load; add load = { rate = ... } "
                          "or { concurrency = ... } to the models to measure")
    demand = config.demand()
    rt = config.runtime(topology_root=topology_root, start=True)
    try:
        report = settings.run(rt, loads, seed=seed)
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
    m = config.models[name]
    exclusive = shape.threads < total_cores
    spec = replace(m.spec, instances=1, threads=shape.threads, isolation="exclusive" if exclusive else "shared",
                   cores=shape.threads if exclusive else None, oversubscribe=False, burst=False, weight=None,
                   priority_class=None, batching=batching_for(shape), max_queue=max(64, 4 * shape.batch),
                   timeout_ms=None, watchdog_s=None, start_timeout_s=None)
    alone = replace(m, spec=spec, slo=None, load={"concurrency": 2 * shape.batch})
    cfg = replace(config, models={name: alone})
    rt = cfg.runtime(topology_root=topology_root, start=True)
    try:
        report = settings.run(rt, cfg.model_loads())
        st = rt.stats()[name]
    finally:
        rt.close(drain=False)
    r = report[name]
    if r.failed or not r.completed:
        return None
    mean_batch = st.mean_batch_size if shape.batch > 1 and st.mean_batch_size > 0 else 1.0
    return Sample(shape.threads, shape.batch, 1000.0 * mean_batch / r.throughput, mean_batch, r.throughput,
                  r.latency.p99_ms if r.latency else None)
