"""Sharing policies in the small: the micro parts of bench/python/bench_sharing.py, each mode
next to its baseline, one session. The long neighbour, fairness and open-loop scenarios stay in
that script.

- ``sharing: batching``: BURST one-sample requests to an MLP on one exclusive core and thread,
  submitted at once and collected; batch 1 against ``Batching(max_size=16, max_delay_ms=2)``.
- ``sharing: replicas``: BURST requests to the critical MLP; one model with two instances
  pulling from one queue against two single-instance models with requests routed at random.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import apportion as ap

from ..conftest import micro

pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from bench_sharing import BATCHING, batchable_factory, batchable_input, critical_factory, critical_input  # noqa: E402

BURST = 64


def _burst(rt: ap.Runtime, names: list[str], x: Any, rng: random.Random) -> int:
    futs = [rt.submit(names[0] if len(names) == 1 else rng.choice(names), x) for _ in range(BURST)]
    for f in futs:
        f.result()
    return len(futs)


@pytest.fixture(scope="module", params=["batch 1", "batched"])
def batching_rt(request: Any) -> Iterator[ap.Runtime]:
    rt = ap.Runtime()
    rt.add_model("mlp", factory=batchable_factory, isolation="exclusive", cores=1, threads=1, max_queue=256,
                 batching=ap.Batching(**BATCHING) if request.param == "batched" else None)
    rt.start()
    try:
        yield rt
    finally:
        rt.close()


@pytest.mark.benchmark(group="sharing: batching")
def test_batching(benchmark: Any, batching_rt: ap.Runtime) -> None:
    x, rng = batchable_input(), random.Random(0)
    assert micro(benchmark, lambda: _burst(batching_rt, ["mlp"], x, rng), rounds=5, iterations=1) == BURST


@pytest.fixture(scope="module", params=["one queue, 2 instances", "2 models, random routing"])
def replicas_rt(request: Any) -> Iterator[tuple[ap.Runtime, list[str]]]:
    rt = ap.Runtime()
    if request.param.startswith("one queue"):
        rt.add_model("m", factory=critical_factory, isolation="exclusive", cores=2, instances=2, threads=1,
                     max_queue=256)
        names = ["m"]
    else:
        names = ["m0", "m1"]
        for n in names:
            rt.add_model(n, factory=critical_factory, isolation="exclusive", cores=1, threads=1, max_queue=256)
    rt.start()
    try:
        yield rt, names
    finally:
        rt.close()


# Two torch instances on one exclusive pair of CPUs: the runtime's confinement check can see a
# torch helper thread on the other instance's CPU and warns (a PinningWarning); the warning is
# about placement hygiene, not this measurement, so it does not fail the benchmark.
@pytest.mark.filterwarnings("ignore::apportion.errors.PinningWarning")
@pytest.mark.benchmark(group="sharing: replicas")
def test_replicas(benchmark: Any, replicas_rt: tuple[ap.Runtime, list[str]]) -> None:
    rt, names = replicas_rt
    x, rng = critical_input(), random.Random(0)
    assert micro(benchmark, lambda: _burst(rt, names, x, rng), rounds=5, iterations=1) == BURST
