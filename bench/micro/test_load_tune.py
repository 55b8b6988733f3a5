"""The load generator's and the tuner's own speed (moved here from tests/python, which assert
behaviour only).

- ``load: closed loop on a 2 ms sleeper``: one ``load.run`` of a closed loop (4 outstanding,
  4 instances) against a 2 ms sleeper; ``extra_info`` records the completions per second
  against the ideal 4 / 2 ms (the band test_load.py used to assert), and a plain loop of
  4-wide ``submit`` bursts on the same model is the baseline.
- ``tune: search on synthetic profiles``: a whole ``tune`` on the 128-thread server fixture
  with given cost models and a simulated measurement (no model runs): the search's own cost.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import apportion as ap
from apportion import load
from apportion.config import Config, ModelConfig
from apportion.spec import ModelSpec
from apportion.tune import RHO, CostModel, Measured, tune

SERVICE_S = 0.002
SERVER = str(Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "topology" / "server_2s128t")


def sleeper(x: object) -> object:
    time.sleep(SERVICE_S)
    return x


@pytest.fixture(scope="module")
def sleepers() -> Any:
    rt = ap.Runtime()
    rt.add_model("s", model=sleeper, instances=4, max_queue=64)
    rt.start()
    yield rt
    rt.close()


@pytest.mark.benchmark(group="load: closed loop on a 2 ms sleeper")
def test_load_run_closed_loop(benchmark: Any, sleepers: ap.Runtime) -> None:
    def once() -> float:
        report = load.run(sleepers, load.ModelLoad("s", concurrency=4), warmup_s=0.1, window_s=0.2,
                          stable_windows=2, max_s=0.5, seed=1)
        return report["s"].throughput

    rates = []
    benchmark.pedantic(lambda: rates.append(once()), rounds=3, iterations=1)
    ideal = 4 / SERVICE_S
    benchmark.extra_info["throughput_per_s"] = max(rates)
    benchmark.extra_info["fraction_of_ideal"] = max(rates) / ideal


@pytest.mark.benchmark(group="load: closed loop on a 2 ms sleeper")
def test_baseline_submit_bursts(benchmark: Any, sleepers: ap.Runtime) -> None:
    n = int(0.4 / SERVICE_S)  # as many 4-wide bursts as 0.4 s of ideal service holds

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(n // 4):
            for f in [sleepers.submit("s", None) for _ in range(4)]:
                f.result()
        return (n // 4 * 4) / (time.perf_counter() - t0)

    rates: list[float] = []
    benchmark.pedantic(lambda: rates.append(once()), rounds=3, iterations=1)
    benchmark.extra_info["throughput_per_s"] = max(rates)
    benchmark.extra_info["fraction_of_ideal"] = max(rates) / (4 / SERVICE_S)


TRUTH = {"ranker": CostModel(1.0, 0.5, serial=0.3), "encoder": CostModel(0.0, 3.0, serial=0.1, batchable=False)}
DEMAND = {"ranker": 3000.0, "encoder": 2000.0}


def _measure(cfg: Config) -> dict[str, Measured]:
    out = {}
    for n, m in cfg.models.items():
        s = m.spec
        b = s.batching.max_size if s.batching else 1
        call = TRUTH[n].call_ms(s.threads, b)
        good = min(DEMAND[n], RHO * s.instances * b * 1000.0 / call)
        out[n] = Measured(good, good, 2 * call, 2 * call <= 30.0, DEMAND[n])
    return out


@pytest.mark.benchmark(group="tune: search on synthetic profiles")
def test_tune_search(benchmark: Any) -> None:
    cfg = Config(models={n: ModelConfig(ModelSpec(n, factory="apportion.demo:build_mlp", max_queue=64),
                                        load={"rate": DEMAND[n]}, slo={"latency_ms": 30.0, "percentile": 99.0})
                         for n in TRUTH})
    result = benchmark.pedantic(lambda: tune(cfg, budget_s=30, topology_root=SERVER, profiles=TRUTH,
                                             measure=_measure, progress=False), rounds=3, iterations=1)
    assert result.winner.slo_ok()
