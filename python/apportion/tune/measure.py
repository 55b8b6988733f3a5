"""Measuring for the tuner: profile one model alone and serve a whole config under its load,
through :mod:`apportion.load` on a runtime built from the config."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import load as ld
from .._private.cputime import cpus_busy_and_steal_s
from ..config import Config, ConfigError
from ..errors import QuotaError
from .cost import Sample, Shape
from .noise import HostSnapshot, profile_spread
from .search import Measured, batching_for

__all__ = ["Settings", "host_snapshot", "measure_config", "profile_model", "profile_repeated", "windows_met"]


def host_snapshot() -> HostSnapshot | None:
    """Cumulative busy time of the CPUs this process may use (from ``/proc/stat``) and this
    process's own CPU time, now; None where /proc/stat cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (OSError, AttributeError):
        return None
    both = cpus_busy_and_steal_s(cpus)
    if both is None:
        return None
    t = os.times()
    return HostSnapshot(time.monotonic(), both[0], t.user + t.system, len(cpus), steal_s=both[1])


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


def windows_met(windows: Sequence[ld.WindowStats], slo: ld.SLO | None, window_s: float) -> tuple[bool | None, ...]:
    """Per window: whether at least the SLO's percentile of the requests admitted in it
    completed within the SLO latency (``goodput`` counts those; a request that expired or
    failed was admitted and missed); None for a window that admitted nothing. Empty without
    an SLO."""
    if slo is None or slo.latency_ms is None:
        return ()
    out: list[bool | None] = []
    for w in windows:
        completed, good = round(w.throughput * window_s), round(w.goodput * window_s)
        admitted = completed + w.expired + w.failed
        out.append(None if admitted == 0 else good >= slo.percentile / 100.0 * admitted - 1e-9)
    return tuple(out)


def _pooled_met(r: ld.ModelReport) -> bool | None:
    if r.slo is None or r.slo.latency_ms is None:
        return None
    admitted = r.completed + r.expired + r.failed
    if admitted == 0:
        # Nothing offered (a rate too low for the run's windows): no verdict, as for a window
        # that admitted nothing. Offered and nothing admitted or answered: missed.
        return None if r.offered == 0 else False
    return r.good >= r.slo.percentile / 100.0 * admitted - 1e-9


def _within(r: ld.ModelReport, slo: ld.SLO | None) -> bool | None:
    # The admitted requests against the SLO itself (see Measured.within_slo), from what the
    # report keeps: completions' percentiles, not every latency. A completion past the SLO
    # and an expired or failed request are both misses; with q the highest of the report's
    # percentiles (100: its maximum) whose latency is within the SLO, at most (1 - q) of the
    # completions missed, so the SLO held when those and the expired and failed requests
    # together stay within the SLO's share of misses. Never says held where it did not.
    if slo is None or slo.latency_ms is None:
        return None
    admitted = r.completed + r.expired + r.failed
    if admitted == 0:
        return None
    if r.latency is None:  # nothing completed: every admitted request missed
        return False
    lat = r.latency
    ladder = ((100.0, lat.max_ms), (99.9, lat.p999_ms), (99.0, lat.p99_ms), (90.0, lat.p90_ms), (50.0, lat.p50_ms))
    q = next((q for q, ms in ladder if ms <= slo.latency_ms), 0.0)
    late = (1.0 - q / 100.0) * r.completed
    return late + r.expired + r.failed <= (1.0 - slo.percentile / 100.0) * admitted + 1e-9


def measure_config(config: Config, settings: Settings = Settings(), *, topology_root: str = "/",
                   seed: int | None = 0, margin: float = 0.0) -> dict[str, Measured]:
    """Serves ``config`` and puts its load on it (:func:`apportion.load.run`); per model figures.

    A model meets its SLO when the SLO's percentile of the requests it *admitted* completed
    within latency_ms x (1 - margin): expired and failed requests count as misses, refused
    ones (queue full) do not (they were turned away at once). ``slo_met`` pools the reported windows,
    ``windows_met`` judges each; goodput counts the requests within the tightened latency,
    so a plan validated with a margin keeps room for a noisier run."""
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise QuotaError(f"measure_config: margin must be in [0, 1), got {margin!r}")
    given = config.model_loads()
    untightened = {ld_.model: ld_.slo for ld_ in given}
    loads = [_tightened(ld_, margin) for ld_ in given]
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
                             p99_ms=r.latency.p99_ms if r.latency else None, slo_met=_pooled_met(r),
                             wanted=demand.get(name), expired=r.expired, rejected=r.rejected, offered=r.offered,
                             windows_met=windows_met(r.windows[max(0, len(r.windows) - report.stable_windows):], r.slo,
                                                     report.window_s), stable=r.stable,
                             within_slo=_within(r, untightened.get(name)) if margin > 0 else None)
    return out


def profile_model(config: Config, name: str, shape: Shape, settings: Settings, *,
                  topology_root: str = "/", total_cores: int = 1) -> Sample | None:
    """Runs model ``name`` alone, one instance of ``shape``, under a closed loop that keeps it
    busy; None when it fails (e.g. it does not accept batched input)."""
    samples = _profile_run(config, name, shape, settings, topology_root=topology_root, total_cores=total_cores)
    return samples[0] if samples else None


def profile_repeated(config: Config, name: str, shape: Shape, settings: Settings, *, topology_root: str = "/",
                     total_cores: int = 1, repeats: int = 3, tolerance: float = 0.1) -> list[Sample]:
    """Profiles ``shape`` until its estimate holds still: each run gives one estimate per
    reported window; while those estimates spread by more than ``tolerance`` ((max - min) /
    median, over every run so far), the model is profiled again, at most ``repeats`` runs.
    Returns every estimate (the tuner fits on their median and reports their spread); empty
    when the model fails."""
    out: list[Sample] = []
    for _ in range(max(1, repeats)):
        got = _profile_run(config, name, shape, settings, topology_root=topology_root, total_cores=total_cores)
        if not got:
            break
        out.extend(got[1:] or got[:1])
        if max(profile_spread(out).values(), default=0.0) <= tolerance:
            break
    return out


FAILED_SHARE = 0.1
"""The share of failed calls above which a profiling run is not used."""


def _profile_run(config: Config, name: str, shape: Shape, settings: Settings, *, topology_root: str,
                 total_cores: int) -> list[Sample]:
    # [the whole run's sample, then one per reported window]; empty when the model failed.
    m = config.models[name]
    exclusive = shape.threads < total_cores
    process = m.spec.process  # profiled as it will serve: in its worker process, with its bounds
    spec = replace(m.spec, instances=1, threads=shape.threads,
                   isolation="process" if process else "exclusive" if exclusive else "shared",
                   cores=shape.threads if exclusive else None, oversubscribe=False, burst=False, weight=None,
                   priority_class=None, batching=batching_for(shape), max_queue=max(64, 4 * shape.batch),
                   timeout_ms=None, watchdog_s=m.spec.watchdog_s if process else None,
                   start_timeout_s=m.spec.start_timeout_s if process else None,
                   warmup=m.spec.warmup if m.spec.warmup is not None else m.inputs)
    alone = replace(m, spec=spec, slo=None, load={"concurrency": 2 * shape.batch})
    cfg = replace(config, models={name: alone})
    rt = cfg.runtime(topology_root=topology_root, start=True)
    try:
        report = settings.run(rt, cfg.model_loads())
        st = rt.stats()[name]
    finally:
        rt.close(drain=False)
    r = report[name]
    # A model that raises now and then is measured on what it served; one that fails more
    # than a tenth of its calls gives no profile (its failures may cost nothing, or anything).
    if not r.completed or r.failed > FAILED_SHARE * (r.completed + r.failed):
        return []
    mean_batch = st.mean_batch_size if shape.batch > 1 and st.mean_batch_size > 0 else 1.0
    whole = Sample(shape.threads, shape.batch, 1000.0 * mean_batch / r.throughput, mean_batch, r.throughput,
                   r.latency.p99_ms if r.latency else None)
    reported = r.windows[max(0, len(r.windows) - report.stable_windows):]
    return [whole] + [Sample(shape.threads, shape.batch, 1000.0 * mean_batch / w.throughput, mean_batch,
                             w.throughput, w.p99_ms) for w in reported if w.throughput > 0]
