"""The tuner: its cost model and allocator against known optima (no timing), the search with
injected profiles and measurements, and one short real run with sleeping models."""

from __future__ import annotations

import io
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import apportion as ap
from apportion.config import Config, ConfigError, ModelConfig
from apportion.tune import (
    RHO,
    Choice,
    CostModel,
    Measured,
    Need,
    Sample,
    Shape,
    allocate,
    apply,
    isolated_layout,
    shared_layout,
    tune,
)
from apportion.tune.search import GUARDED
from apportion.tune.tuner import ProfilingFailed


@pytest.fixture(autouse=True)
def _a_quiet_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every search here sees a quiet machine (only this process busy), whatever else runs on
    the host: the tuner bounds queues for other processes' load (tune, step 7), which these
    tests do not measure (test_tune_slo.py injects the host it needs)."""
    import importlib

    from apportion.tune.noise import HostSnapshot

    t = [0.0]

    def snap() -> HostSnapshot:
        t[0] += 1.0
        return HostSnapshot(t[0], t[0] * 0.5, t[0] * 0.5, 2)

    monkeypatch.setattr(importlib.import_module("apportion.tune.tuner"), "host_snapshot", snap)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"
SERVER = str(FIXTURES / "server_2s128t")
VM2 = str(FIXTURES / "vm2")


def test_cost_model_fit_recovers_known_curves() -> None:
    truth = CostModel(alpha_ms=2.0, beta_ms=0.5, serial=0.2)
    samples = [Sample(1, 1, truth.call_ms(1, 1)), Sample(1, 8, truth.call_ms(1, 8), mean_batch=8),
               Sample(4, 1, truth.call_ms(4, 1))]
    fit = CostModel.fit(samples)
    assert fit.alpha_ms == pytest.approx(2.0) and fit.beta_ms == pytest.approx(0.5)
    assert fit.serial == pytest.approx(0.2) and fit.batchable
    # Without a batch or a thread sample the fit assumes no gain from them.
    only = CostModel.fit([Sample(1, 1, 3.0)])
    assert (only.alpha_ms, only.beta_ms, only.serial, only.batchable) == (0.0, 3.0, 1.0, False)
    assert only.call_ms(4, 1) == 3.0


def _brute_force(needs: list[Need], units: int, step: float, objective: str) -> float:
    best = -1.0
    for split in itertools.product(range(units + 1), repeat=len(needs)):
        if sum(split) > units:
            continue
        vals = [n.served(u * step)[0] for n, u in zip(needs, split)]
        if objective == "goodput":
            score = sum(vals)
        else:
            score = min(v / n.demand for v, n in zip(vals, needs) if n.demand)
        best = max(best, score)
    return best


CASES = {
    # A cheap batchable model and a costly one, more demand than cores: the cheap one first.
    "batching pays": [Need("a", CostModel(2.0, 0.25), demand=4000, slo_ms=40, batches=(1, 2, 4, 8)),
                      Need("b", CostModel(0.0, 4.0, batchable=False), demand=800, slo_ms=40)],
    # b needs 4 threads to meet its SLO (a call takes 30 ms on one thread, 15.75 on two, 8.6
    # on four; p99 ~ two calls): nothing until 4 cores, a plateau the allocator must look past.
    "plateau": [Need("a", CostModel(0.0, 2.0, batchable=False), demand=1500, slo_ms=20),
                Need("b", CostModel(0.0, 30.0, serial=0.05, batchable=False), demand=400, slo_ms=20,
                     threads=(1, 2, 4, 8))],
    # Demand fits: every model served in full, the rest is headroom.
    "fits": [Need("a", CostModel(0.5, 1.0), demand=500, slo_ms=50, batches=(1, 4)),
             Need("b", CostModel(0.0, 2.0, batchable=False), demand=300, slo_ms=50)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("objective", ["goodput", "min_fraction"])
def test_allocate_matches_brute_force(case: str, objective: str) -> None:
    needs = CASES[case]
    cores, step = 8.0, 1.0
    alloc = allocate(needs, cores, objective, step=step)
    assert sum(a.cores for a in alloc.values()) == pytest.approx(cores)
    got = {n.name: n.served(alloc[n.name].cores)[0] for n in needs}
    score = sum(got.values()) if objective == "goodput" else min(got[n.name] / n.demand for n in needs)
    assert score == pytest.approx(_brute_force(needs, int(cores / step), step, objective), rel=1e-9)


def test_plateau_model_gets_the_threads_its_slo_needs() -> None:
    alloc = allocate(CASES["plateau"], 8.0, "min_fraction", step=1.0)
    b = alloc["b"]
    assert b.shape is not None and b.shape.threads >= 4 and b.served > 0


def test_layouts() -> None:
    alloc = allocate(CASES["fits"], 8.0, "goodput", step=1.0)
    shared = shared_layout(alloc, 8)
    assert all(c.isolation == "shared" for c in shared.values())
    iso = isolated_layout(alloc, 8)
    assert iso is not None and sum(c.cores or 0 for c in iso.values()) <= 8
    # Three models on two cores: at most one gets a core of its own, the pool keeps one.
    small = allocate([Need(x, CostModel(0.0, 1.0, batchable=False), demand=500, slo_ms=50) for x in "abc"],
                     2.0, "goodput")
    iso = isolated_layout(small, 2)
    assert iso is None or sum(c.cores or 0 for c in iso.values()) <= 1


# -- the whole search with synthetic profiles and a synthetic machine ---------------------------

TRUTH = {"ranker": CostModel(1.0, 0.5, serial=0.3), "encoder": CostModel(0.0, 3.0, serial=0.1, batchable=False)}
DEMAND = {"ranker": 3000.0, "encoder": 2000.0}


def _synthetic_config() -> Config:
    models = {n: ModelConfig(ap.ModelSpec(n, factory=f"apportion.demo:build_{'mlp' if n == 'ranker' else 'encoder'}",
                                          max_queue=64, timeout_ms=30.0),
                             slo={"latency_ms": 30.0, "percentile": 99.0}, load={"rate": DEMAND[n]})
              for n in TRUTH}
    return Config(models=models, path="synthetic.toml")


def _fluid(choice: Choice, cost: CostModel) -> tuple[float, float]:
    """Capacity (req/s) and p99 (ms) of a choice on an ideal machine."""
    b = choice.batching.max_size if choice.batching else 1
    call = cost.call_ms(choice.threads, b)
    return choice.instances * b * 1000.0 / call, 2 * call + (choice.batching.max_delay_ms if choice.batching else 0)


def _fake_measure(cfg: Config) -> dict[str, Measured]:
    out = {}
    for n, m in cfg.models.items():
        s = m.spec
        choice = Choice(s.isolation, s.cores, s.instances, s.threads, s.batching)
        cap, p99 = _fluid(choice, TRUTH[n])
        good = min(DEMAND[n], RHO * cap)
        out[n] = Measured(good, good, p99, p99 <= 30.0, DEMAND[n])
    return out


def test_tune_finds_the_known_optimum_on_the_server_fixture(tmp_path: Path) -> None:
    cfg = _synthetic_config()
    err = io.StringIO()
    result = tune(cfg, budget_s=30, topology_root=SERVER, profiles=TRUTH, measure=_fake_measure,
                  progress=err, out_dir=tmp_path)
    assert result.total_cores == 64
    needs = [Need(n, TRUTH[n], DEMAND[n], None, 30.0, (1, 2, 4, 8, 16, 32), (1, 2, 4, 8)) for n in TRUTH]
    optimum = _brute_force(needs, 64, 1.0, "goodput")
    assert result.winner.slo_ok()
    assert result.winner.score("goodput") == pytest.approx(optimum, rel=0.02)
    assert "tune [" in err.getvalue() and "done:" in err.getvalue()
    # The plan file is a config the planner accepts on that machine, with the winner's quotas
    # and each model's cost model (what `apportion run --adapt` gives the controller).
    plan_cfg = Config.load(tmp_path / "plan.toml")
    assert {n: m.cost for n, m in plan_cfg.models.items()} == result.costs == TRUTH
    assert {n: m.cost for n, m in result.config.models.items()} == TRUTH
    rt = plan_cfg.runtime(topology_root=SERVER, build=False)
    try:
        p = rt.plan()
        assert {m.name for m in p.models} == set(TRUTH)
    finally:
        rt.close(drain=False)
    report = (tmp_path / "report.md").read_text()
    assert "| candidate |" in report and "**winner**" in report and "## Why the winner won" in report
    assert (tmp_path / "candidates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_min_fraction_objective_serves_both() -> None:
    result = tune(_synthetic_config(), budget_s=30, topology_root=VM2, profiles=TRUTH, measure=_fake_measure,
                  objective="min_fraction", progress=False)
    fracs = [m.fraction for m in (result.winner.measured or {}).values()]
    assert min(fracs) > 0


class _SimulatedRuns:
    """A simulated clock that each measurement (by ``measure``) advances by ``step`` seconds,
    noting when each one started."""

    def __init__(self, measure: Callable[[Config], dict[str, Measured]], step: float) -> None:
        self._measure, self.step = measure, step
        self.now = 0.0
        self.starts: list[float] = []

    def clock(self) -> float:
        return self.now

    def measure(self, cfg: Config) -> dict[str, Measured]:
        self.starts.append(self.now)
        self.now += self.step
        return self._measure(cfg)


def test_the_search_stays_within_its_budget_on_a_simulated_clock() -> None:
    # Every measurement takes 2 simulated seconds. The first candidates are always measured;
    # refinements start only while the budget lasts, so a tight budget cuts the search short.
    def run(budget: float) -> list[float]:
        sim = _SimulatedRuns(_fake_measure, 2.0)
        result = tune(_synthetic_config(), budget_s=budget, topology_root=VM2, profiles=TRUTH, measure=sim.measure,
                      progress=False, clock=sim.clock, validate_top=2)
        # Every candidate is measured once, and the winner once more when its confirmation fits.
        assert result.confirmed in ([], [result.winner.name])
        assert len(sim.starts) == len(result.candidates) + len(result.confirmed) and result.elapsed_s == sim.now
        return sim.starts

    free = run(1000.0)
    assert len(free) > 3  # with time to spare the search refines past its two first candidates
    tight = run(8.0)
    assert 2 <= len(tight) < len(free)
    assert all(t < 8.0 for t in tight[2:])


def test_tune_rejects_bad_input() -> None:
    with pytest.raises(ap.QuotaError, match="objective must be one of"):
        tune(_synthetic_config(), objective="speed", progress=False)  # type: ignore[arg-type]
    for budget in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ap.QuotaError, match="budget_s must be a positive, finite number"):
            tune(_synthetic_config(), budget_s=budget, progress=False)
    cfg = _synthetic_config()
    no_load = cfg.replace_models(ranker=ModelConfig(ap.ModelSpec("ranker", factory="apportion.demo:build_mlp")))
    with pytest.raises(ap.ConfigError, match=r"models\.ranker\.load"):
        tune(no_load, progress=False, profiles=TRUTH, measure=_fake_measure)


@pytest.mark.parametrize(("kw", "field", "words"), [
    # max_batch 0, -1, nan and True ran; 100000 and 1.5 failed after 1.4 s of profiling naming
    # batching.max_size, a field the caller never set; "8" a TypeError deep in the search
    ({"max_batch": 0}, "max_batch", "in [1, 65536]"), ({"max_batch": 100_000}, "max_batch", "in [1, 65536]"),
    ({"max_batch": 1.5}, "max_batch", "integer"), ({"max_batch": "8"}, "max_batch", "integer"),
    ({"max_batch": True}, "max_batch", "integer"), ({"validate_top": 0}, "validate_top", ">= 1"),
    ({"validate_top": 1.5}, "validate_top", "integer"), ({"validate_top": "3"}, "validate_top", "integer"),
    ({"progress": "yes"}, "progress", "a text stream"), ({"measure": 5}, "measure", "callable"),
    ({"profiles": {"zzz": TRUTH["ranker"]}}, "profiles", "'zzz', which is not a model of the config"),
    ({"profiles": {"ranker": []}}, "profiles", "holds no samples"),
])
def test_tune_refuses_bad_arguments_before_any_run(kw: dict[str, Any], field: str, words: str) -> None:
    args: dict[str, Any] = {"progress": False, "profiles": TRUTH, "measure": _fake_measure, **kw}
    with pytest.raises(ap.QuotaError, match=re.escape(words)) as err:
        tune(_synthetic_config(), topology_root=VM2, **args)
    assert err.value.field == field


def test_tune_refuses_measurements_that_leave_a_model_out_or_name_another(tmp_path: Path) -> None:
    # A model left out counted as meeting its SLO (the winner read slo_ok); one not in the
    # config raised a bare KeyError.
    def leaves_out(cfg: Config) -> dict[str, Measured]:
        return {n: m for n, m in _fake_measure(cfg).items() if n != "encoder"}

    def adds(cfg: Config) -> dict[str, Measured]:
        return {**_fake_measure(cfg), "zzz": Measured(1.0, 1.0, 1.0, True, 1.0)}

    for fn, words in ((leaves_out, "it left out ['encoder']"), (adds, "it named ['zzz']"),
                      (lambda cfg: {}, "it left out ['encoder', 'ranker']")):
        with pytest.raises(ap.QuotaError, match=re.escape(words)) as err:
            tune(_synthetic_config(), topology_root=VM2, progress=False, profiles=TRUTH, measure=fn)
        assert err.value.field == "measure"
    with pytest.raises(ap.QuotaError, match="no models"):
        tune(Config(models={}, path="empty.toml"), topology_root=VM2, progress=False)
    a_file = tmp_path / "plan.txt"
    a_file.write_text("x")
    with pytest.raises(ap.ConfigError, match="exists and is not a directory"):
        tune(_synthetic_config(), topology_root=VM2, progress=False, profiles=TRUTH, measure=_fake_measure,
             out_dir=a_file)


# -- one short real run --------------------------------------------------------------------------

def _sleeper(ms: float):
    def factory(ctx: ap.InstanceContext):
        def serve(x):
            time.sleep(ms / 1000.0)
            return x
        return serve
    return factory


def test_real_run_with_sleeping_models(tmp_path: Path) -> None:
    models = {
        # Sleeping 4 ms and 1 ms; named by import path, so that plan.toml can name them too.
        "slow": ModelConfig(ap.ModelSpec("slow", factory="apportion.examples.sleepers:slow", max_queue=64),
                            slo={"latency_ms": 80.0, "percentile": 99.0}, load={"rate": 100.0}),
        "fast": ModelConfig(ap.ModelSpec("fast", factory="apportion.examples.sleepers:fast", max_queue=64),
                            slo={"latency_ms": 80.0, "percentile": 99.0}, load={"concurrency": 2}),
    }
    result = tune(Config(models=models), budget_s=8, max_batch=4, progress=False, out_dir=tmp_path,
                  validate_top=2)
    assert set(result.profiles) == {"slow", "fast"} and all(result.profiles.values())
    assert result.winner.measured is not None and set(result.winner.measured) == {"slow", "fast"}
    assert result.winner.measured["slow"].goodput > 0
    assert result.winner in result.candidates and all(c.measured for c in result.candidates)
    assert {p.name for p in tmp_path.iterdir()} >= {"plan.toml", "report.md", "candidates.png"}
    plan = Config.load(tmp_path / "plan.toml")
    assert set(plan.models) == {"slow", "fast"}
    assert plan.models["slow"].spec.factory == "apportion.examples.sleepers:slow"


def _failing_every(n: int, ms: float):
    def factory(ctx: ap.InstanceContext):
        calls = [0]

        def serve(x):
            calls[0] += 1
            time.sleep(ms / 1000.0)
            if calls[0] % n == 0:
                raise RuntimeError("one call in a while fails")
            return x
        return serve
    return factory


def test_a_model_that_fails_now_and_then_is_profiled_on_what_it_served(tmp_path: Path) -> None:
    # One failure in a profiling run threw the run away: with one call in 50 failing, every
    # run, and the tuner gave up ("failed every profiling run", exit 2).
    models = {"rare": ModelConfig(ap.ModelSpec("rare", factory=_failing_every(50, 1.0), max_queue=64),
                                  slo={"latency_ms": 80.0, "percentile": 99.0}, load={"rate": 50.0})}
    result = tune(Config(models=models), budget_s=4, max_batch=1, progress=False, validate_top=1)
    assert result.profiles["rare"]
    often = {"often": ModelConfig(ap.ModelSpec("often", factory=_failing_every(2, 1.0), max_queue=64),
                                  slo={"latency_ms": 80.0, "percentile": 99.0}, load={"rate": 50.0})}
    with pytest.raises(ProfilingFailed, match=r"models\.often: failed in every profiling run"):
        tune(Config(models=often), budget_s=4, max_batch=1, progress=False)


def test_tune_refuses_a_config_its_plan_file_cannot_hold_before_any_run(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    models = {"m": ModelConfig(ap.ModelSpec("m", factory="apportion.examples.sleepers:fast", warmup=[np.zeros(2)]),
                               slo={"latency_ms": 80.0, "percentile": 99.0}, load={"rate": 50.0})}
    started = time.monotonic()
    with pytest.raises(ap.ConfigError, match=r"models\.m\.warmup: holds a numpy\.ndarray"):
        tune(Config(models=models), budget_s=30, progress=False, out_dir=tmp_path)
    # A factory built in code was left out of plan.toml, which then failed `apportion run`.
    built = {"m": ModelConfig(ap.ModelSpec("m", factory=_sleeper(1.0)), slo={"latency_ms": 80.0}, load={"rate": 50.0})}
    with pytest.raises(ap.ConfigError, match=r"models\.m\.factory: is a callable built in code with no import path"):
        tune(Config(models=built), budget_s=30, progress=False, out_dir=tmp_path)
    assert time.monotonic() - started < 10  # refused at once, not after the 30 s budgets
    assert not any(tmp_path.iterdir())


def test_apply_keeps_workload_and_replaces_quotas() -> None:
    cfg = _synthetic_config()
    out = apply(cfg, {"ranker": Choice("exclusive", 4, 2, 2, ap.Batching(4, 1.0))})
    s = out.models["ranker"].spec
    assert (s.isolation, s.instances, s.threads, s.cores, s.batching) == ("exclusive", 2, 2, 4, ap.Batching(4, 1.0))
    assert (s.max_queue, s.timeout_ms) == (64, 30.0)  # serving settings stay
    assert out.models["ranker"].load == cfg.models["ranker"].load
    assert out.models["encoder"] == cfg.models["encoder"]
    assert Shape(2, 4).describe() == "t=2 b<=4"
    # A model whose load names its inputs is warmed with them; an explicit warm-up stays.
    named = cfg.replace_models(ranker=replace(cfg.models["ranker"], inputs="apportion.demo:mlp_input"),
                               encoder=replace(cfg.models["encoder"], inputs="apportion.demo:encoder_input",
                                               spec=replace(cfg.models["encoder"].spec, warmup=[1.0])))
    out = apply(named, {n: Choice("shared", None, 1, 1, None) for n in TRUTH})
    assert out.models["ranker"].spec.warmup == "apportion.demo:mlp_input"
    assert out.models["encoder"].spec.warmup == (1.0,)


def test_apply_keeps_a_process_models_isolation_and_bounds_and_a_shared_models_own_class() -> None:
    # The plan turned a process model into a thread of the runtime (its crash and hang
    # isolation, watchdog and start bound gone, said nowhere), and dropped a shared model's
    # priority class while the config's pool_reserve for that class stayed.
    cfg = Config.loads('[runtime]\nshared_pool = "scheduled"\npool_reserve = { "1" = 1 }\n'
                       '[models.parser]\nfactory = "pkg.mod:build"\nisolation = "process"\ncores = 1\n'
                       'watchdog_s = 5\nstart_timeout_s = 30\n'
                       '[models.critical]\nfactory = "pkg.mod:build"\npriority_class = 1\n')
    out = apply(cfg, {"parser": Choice("exclusive", 2, 1, 2, None), "critical": Choice("shared", None, 2, 1, None)})
    p, c = out.models["parser"].spec, out.models["critical"].spec
    assert (p.isolation, p.cores, p.threads, p.watchdog_s, p.start_timeout_s) == ("process", 2, 2, 5.0, 30.0)
    assert (c.isolation, c.priority_class, out.shared_pool) == ("shared", 1, "scheduled")
    floating = apply(cfg, {"parser": Choice("shared", None, 2, 1, None),
                           "critical": Choice("shared", None, 1, 1, None, priority_class=0)})
    p = floating.models["parser"].spec
    assert (p.isolation, p.cores, p.instances, p.watchdog_s) == ("process", None, 2, 5.0)
    assert floating.models["critical"].spec.priority_class == 0  # the search's class, when it gives one
    assert Config.loads(out.to_toml()).models == out.models
    # With no model at class 1 any more the reservation would serve none (and Config refuses
    # it): it is dropped, and the plan loads again.
    assert out.pool_reserve == {1: 1} and floating.pool_reserve is None
    assert Config.loads(floating.to_toml()).pool_reserve is None
    with pytest.raises(ConfigError, match=r"runtime.pool_reserve: no model has priority_class 1 or above "
                       r"\(the models' classes: parser 0, critical 0\)"):
        Config.loads(floating.to_toml().replace("[runtime]", '[runtime]\npool_reserve = { "1" = 1 }', 1))


# -- the SLO margin ------------------------------------------------------------------------------

def test_validation_with_a_margin_tightens_each_slo() -> None:
    from apportion.tune.measure import Settings, measure_config

    # A model that takes ~5 ms against a 200 ms SLO: met as given (with room for stalls of a
    # loaded machine: one over 195 ms in ~165 requests misses), missed with a 98% margin (4 ms).
    slo = {"latency_ms": 200.0, "percentile": 99.0}
    cfg = Config(models={"m": ModelConfig(ap.ModelSpec("m", factory=_sleeper(5.0)), slo=slo,
                                          load={"concurrency": 1})})
    quick = Settings(warmup_s=0.2, window_s=0.3, stable_windows=3, max_s=3.0)
    loose = measure_config(cfg, quick, margin=0.0)["m"]
    tight = measure_config(cfg, quick, margin=0.98)["m"]
    assert loose.p99_ms is not None and loose.p99_ms < 200.0
    assert loose.slo_met is True and tight.slo_met is False
    assert tight.goodput < loose.goodput  # counted against 4 ms: none of the ~5 ms requests
    with pytest.raises(ValueError, match="margin must be in"):
        measure_config(cfg, quick, margin=1.0)


def test_validation_says_whether_the_slo_itself_held_without_the_margin() -> None:
    from apportion.tune.measure import Settings, measure_config

    # ~5 ms calls: within a 200 ms SLO, missed with a 98% margin (4 ms) yet within the SLO
    # itself; against a 3 ms SLO missed both ways.
    quick = Settings(warmup_s=0.2, window_s=0.3, stable_windows=3, max_s=3.0)

    def cfg(slo_ms: float) -> Config:
        return Config(models={"m": ModelConfig(ap.ModelSpec("m", factory=_sleeper(5.0)),
                                               slo={"latency_ms": slo_ms, "percentile": 99.0},
                                               load={"concurrency": 1})})

    roomy = measure_config(cfg(200.0), quick, margin=0.98)["m"]
    assert roomy.admitted_met() is False and roomy.within_slo is True
    tight = measure_config(cfg(3.0), quick, margin=0.1)["m"]
    assert tight.admitted_met() is False and tight.within_slo is False
    # No margin: nothing to tell apart (the verdict is admitted_met's). No SLO: no verdict.
    assert measure_config(cfg(200.0), quick, margin=0.0)["m"].within_slo is None
    no_slo = Config(models={"m": ModelConfig(ap.ModelSpec("m", factory=_sleeper(1.0)), load={"concurrency": 1})})
    assert measure_config(no_slo, quick, margin=0.1)["m"].within_slo is None


def test_within_the_slo_counts_late_completions_and_expired_requests_together() -> None:
    from types import SimpleNamespace

    from apportion.load import SLO
    from apportion.stats import LatencyStats
    from apportion.tune.measure import _within

    def report(completed: int, expired: int, p99: float, p999: float, top: float) -> Any:
        lat = LatencyStats(count=completed, mean_ms=5.0, p50_ms=5.0, p90_ms=8.0, p99_ms=p99, p999_ms=p999,
                           max_ms=top)
        return SimpleNamespace(completed=completed, expired=expired, failed=0, latency=lat if completed else None)

    slo = SLO(latency_ms=50.0, percentile=99.0)
    # 990 completions with p99 within 50 ms (up to 9.9 late) and 10 expired: up to 19.9 of
    # 1000 missed, the SLO allows 10.
    assert _within(report(990, 10, 40.0, 60.0, 70.0), slo) is False
    # Every completion within it (max 45 ms), 10 expired: 10 of 1000.
    assert _within(report(990, 10, 40.0, 44.0, 45.0), slo) is True
    # Nothing expired, p99 within: up to 1% late.
    assert _within(report(1000, 0, 49.0, 60.0, 90.0), slo) is True
    assert _within(report(1000, 0, 51.0, 60.0, 90.0), slo) is False
    # Everything admitted expired: missed; nothing admitted, or no SLO latency: no verdict.
    assert _within(report(0, 5, 0.0, 0.0, 0.0), slo) is False
    assert _within(report(0, 0, 0.0, 0.0, 0.0), slo) is None
    assert _within(report(10, 0, 1.0, 1.0, 1.0), SLO(timeout_ms=50.0)) is None


def test_validation_counts_a_models_failures_against_its_slo() -> None:
    from apportion.tune.measure import Settings, measure_config

    # Fast (~1 ms against 50 ms) but raising on every tenth call: 90% of what it admitted was
    # served within the SLO, so a p99 SLO is missed, pooled and in every window.
    calls = itertools.count()

    def flaky(ctx: object) -> Callable[[object], object]:
        def call(x: object) -> object:
            time.sleep(0.001)
            if next(calls) % 10 == 9:
                raise RuntimeError("flaky")
            return x
        return call

    slo = {"latency_ms": 50.0, "percentile": 99.0}
    cfg = Config(models={"m": ModelConfig(ap.ModelSpec("m", factory=flaky), slo=slo, load={"concurrency": 1})})
    got = measure_config(cfg, Settings(warmup_s=0.2, window_s=0.3, stable_windows=3, max_s=3.0))["m"]
    assert got.p99_ms is not None and got.p99_ms < 50.0  # what completed was fast
    assert got.slo_met is False
    assert got.windows_met and not any(got.windows_met)


def test_tune_validates_with_its_margin_and_says_so(tmp_path: Path) -> None:
    seen: list[float] = []

    def measure(c: Config) -> dict[str, Measured]:
        seen.append(1.0)
        return _fake_measure(c)

    result = tune(_synthetic_config(), budget_s=30, topology_root=str(SERVER), profiles=TRUTH, measure=measure,
                  progress=False, margin=0.2)
    assert seen and result.margin == 0.2
    assert "tightened by a 20% margin" in result.report()
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ap.QuotaError, match="margin must be a fraction"):
            tune(_synthetic_config(), profiles=TRUTH, measure=measure, progress=False, margin=bad)


def test_a_config_built_in_code_without_a_percentile_gets_its_report(tmp_path: Path) -> None:
    # ModelConfig's slo percentile defaults to 99, but the report read it as a key: KeyError,
    # plan.toml written and report.md not.
    cfg = _synthetic_config()
    cfg = replace(cfg, models={n: replace(m, slo={"latency_ms": 30.0})
                                for n, m in cfg.models.items()})
    result = tune(cfg, budget_s=30, topology_root=str(SERVER), profiles=TRUTH, measure=_fake_measure,
                  progress=False, out_dir=tmp_path)
    assert "p99 <= 30 ms" in result.report() and (tmp_path / "report.md").exists()


def test_the_tuner_says_how_much_capacity_is_missing() -> None:
    # The synthetic demand on a 2-CPU VM: more than it can serve; on the 128-thread server it fits.
    small = tune(_synthetic_config(), budget_s=30, topology_root=str(FIXTURES / "vm2"), profiles=TRUTH,
                 measure=_fake_measure, progress=False)
    missing = small.missing_capacity()
    assert missing and all(c > 0 for c in missing.values())
    for name, cores in missing.items():
        need = next(n for n in small.needs if n.name == name)
        served, shape = need.served(small.allocation[name].cores + cores)
        assert served >= 0.99 * (need.wanted(shape) if shape is not None else need.demand)  # enough, by its model
    assert "more cores for" in small.why() and "more cores for" in small.report()
    big = tune(_synthetic_config(), budget_s=30, topology_root=SERVER, profiles=TRUTH, measure=_fake_measure,
               progress=False)
    assert big.missing_capacity() == {} and big.shortfall() == ""
    # A model without an SLO, or a closed loop, has no demand to serve "within its SLO": it
    # was told "~3.0 more cores" (a closed loop takes whatever it is given).
    for drop in ({"slo": None}, {"load": {"concurrency": 4}}):
        cfg = _synthetic_config()
        cfg = replace(cfg, models={**cfg.models, "encoder": replace(cfg.models["encoder"], **drop)})
        r = tune(cfg, budget_s=30, topology_root=str(FIXTURES / "vm2"), profiles=TRUTH, measure=_fake_measure,
                 progress=False)
        assert "encoder" not in r.missing_capacity() and "'encoder'" not in r.shortfall(), (drop, r.shortfall())


def test_a_winner_that_misses_in_the_longer_confirmation_run_gives_way_to_a_bounded_queue() -> None:
    # The short validation runs pass every plan; once the confirmation starts (the first plan
    # measured twice), a plan passes only if it bounds the ranker's queue below the bound the
    # winner had: a queue that fills only in a longer run.
    seen: dict[str, int] = {}
    long_run: list[int] = []

    def measure(cfg: Config) -> dict[str, Measured]:
        key = repr(sorted((n, m.spec) for n, m in cfg.models.items()))
        seen[key] = seen.get(key, 0) + 1
        q = cfg.models["ranker"].spec.max_queue
        if seen[key] == 2 and not long_run:
            long_run.append(q)
        out = _fake_measure(cfg)
        if long_run and q >= long_run[0]:
            r = out["ranker"]
            out["ranker"] = Measured(r.throughput, 0.9 * r.throughput, 45.0, False, r.wanted)
        return out

    result = tune(_synthetic_config(), budget_s=1000, topology_root=VM2, profiles=TRUTH, measure=measure,
                  progress=False, validate_top=2)
    assert long_run, "the winner was never confirmed"
    first = result.confirmed[0]
    assert result.winner.name != first and result.winner.name in result.confirmed
    assert result.winner.slo_ok() and result.config.models["ranker"].spec.max_queue < long_run[0]
    loser = next(c for c in result.candidates if c.name == first)
    assert not loser.slo_ok()  # it ranks by its confirmation run now
    text = result.summary()
    assert f"Missed in a longer run (3 windows of" in text and f"'{first}'" in text
    assert "Confirmed in a longer run" in text


def test_a_confirmed_winner_that_left_queues_unbounded_is_guarded_when_that_holds() -> None:
    # Demand the 64-core server serves in full: no candidate bounds its queues. The fake
    # machine serves a bounded plan as the unbounded one: the guarded plan holds every
    # SLO at the same goodput and wins; each bound is what its model drained in time for its
    # SLO (less the margin) in the winner's confirmation run, below the config's own 64.
    from apportion.tune.search import measured_bound

    result = tune(_synthetic_config(), budget_s=1000, topology_root=SERVER, profiles=TRUTH, measure=_fake_measure,
                  progress=False, validate_top=2)
    w = result.winner
    assert w.name.endswith(GUARDED) and w.slo_ok() and w.name in result.confirmed
    base = next(c for c in result.candidates if c.name == w.name[: -len(GUARDED)])
    assert base.name in result.confirmed and base.slo_ok()
    for need in result.needs:
        c = base.choices[need.name]
        want = measured_bound(need, c, base.measured[need.name], result.margin)
        want = max(want, c.batching.max_size if c.batching else 1)
        got = w.choices[need.name].max_queue
        if c.max_queue is None and want < 64:
            assert got == want and result.config.models[need.name].spec.max_queue == want
        else:
            assert got == c.max_queue
    text = result.summary()
    assert "Its queues are bounded at what each model drained in time in that run." in text
    assert "Missed in a longer run" not in text  # the unguarded plan held its SLOs too


def test_a_guard_that_costs_goodput_or_misses_is_not_taken() -> None:
    from apportion.tune.tuner import GUARD_COST

    def bounded(cfg: Config) -> bool:
        return all(m.spec.max_queue is not None and m.spec.max_queue < 64 for m in cfg.models.values())

    def costly(cfg: Config) -> dict[str, Measured]:
        out = _fake_measure(cfg)
        if bounded(cfg):  # refuses more than the guard may cost
            out = {n: replace(m, goodput=(1.0 - 2 * GUARD_COST) * m.goodput) for n, m in out.items()}
        return out

    def missing(cfg: Config) -> dict[str, Measured]:
        out = _fake_measure(cfg)
        if bounded(cfg):
            out = {n: replace(m, p99_ms=45.0, slo_met=False) for n, m in out.items()}
        return out

    for measure, why in ((costly, "costs goodput"), (missing, "misses")):
        result = tune(_synthetic_config(), budget_s=1000, topology_root=SERVER, profiles=TRUTH, measure=measure,
                      progress=False, validate_top=2)
        guard = [c for c in result.candidates if c.name.endswith(GUARDED)]
        assert guard and guard[0].name in result.confirmed, why
        assert not result.winner.name.endswith(GUARDED) and result.winner.slo_ok(), why
    text = result.summary()
    assert re.search(rf"Missed in a longer run \(3 windows of [\d.]+ s\): '{re.escape(guard[0].name)}'\. "
                     r"Confirmed in a longer run", text), text


def test_confirmation_settings_have_windows_of_at_least_a_second() -> None:
    from apportion.tune.measure import Settings
    from apportion.tune.tuner import confirmation_settings

    c = confirmation_settings(Settings(warmup_s=0.3, window_s=0.6, stable_windows=3, max_s=4.0))
    assert (c.warmup_s, c.window_s, c.stable_windows, c.max_s) == (1.0, 1.0, 3, 7.0)
    c = confirmation_settings(Settings(warmup_s=2.0, window_s=2.0, stable_windows=3, max_s=180.0))
    assert (c.window_s, c.max_s) == (2.0, 14.0)


def _missing_measure(cfg: Config) -> dict[str, Measured]:
    """As _fake_measure, with every model missing its SLO (p99 60 ms, half its requests good)."""
    return {n: Measured(m.throughput, 0.5 * m.throughput, 60.0, False, m.wanted)
            for n, m in _fake_measure(cfg).items()}


def test_the_summary_says_why_a_winner_was_not_confirmed() -> None:
    # No candidate meets the SLOs: nothing to confirm. A tight simulated budget: no time left.
    result = tune(_synthetic_config(), budget_s=1000, topology_root=VM2, profiles=TRUTH, measure=_missing_measure,
                  progress=False, validate_top=2)
    assert result.confirmed == [] and not result.winner.slo_ok()
    assert "Not confirmed in a longer run: no candidate met every SLO in validation." in result.summary()
    slow = _SimulatedRuns(_fake_measure, 30.0)
    result = tune(_synthetic_config(), budget_s=10, topology_root=VM2, profiles=TRUTH, measure=slow.measure,
                  progress=False, validate_top=2, clock=slow.clock)
    assert result.confirmed == [] and result.winner.slo_ok()
    assert "Not confirmed in a longer run: no budget was left for it." in result.summary()


def test_when_nothing_meets_the_slos_the_time_kept_for_confirming_goes_to_the_search() -> None:
    missing = _SimulatedRuns(_missing_measure, 2.0)
    budget = 40.0
    result = tune(_synthetic_config(), budget_s=budget, topology_root=VM2, profiles=TRUTH, measure=missing.measure,
                  progress=False, validate_top=2, clock=missing.clock)
    starts = missing.starts
    per_run = result.settings.max_s
    reserve = min(2 * (result.confirm_settings.max_s + 0.5), 0.3 * budget)
    assert max(starts) > budget - reserve - per_run  # refinement went on into the reserve
    assert max(starts) + per_run <= budget and result.confirmed == []


def test_a_plan_keeps_the_users_word_on_serving_a_batch_of_one_unbatched() -> None:
    # single_unbatched says what the model can serve, not how to batch it: a plan's batching
    # (from its shapes) dropped it, so a numpy model the user marked paid for the stacking again.
    from apportion.tune.search import Choice, apply

    cfg = _synthetic_config()
    name = next(iter(cfg.models))
    m = cfg.models[name]
    chosen = Choice("shared", None, 2, 1, ap.Batching(8, 2.0))
    for word in (True, False):
        users = cfg.replace_models(**{name: replace(m, spec=replace(m.spec, batching=ap.Batching(
            4, 1.0, single_unbatched=word)))})
        assert apply(users, {name: chosen}).models[name].spec.batching == ap.Batching(8, 2.0, single_unbatched=word)
    assert apply(cfg, {name: chosen}).models[name].spec.batching == ap.Batching(8, 2.0), "no word of the user's"
    assert apply(cfg, {name: replace(chosen, batching=None)}).models[name].spec.batching is None
