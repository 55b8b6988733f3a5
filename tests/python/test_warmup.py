"""Warm-up: every instance runs the model's sample inputs (each batch size it will be called
with) before the model takes requests, so the first requests run at steady-state speed."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import apportion as ap
from apportion.config import Config

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # process_models, for the worker processes and config files

SLOW_FIRST_S = 0.04


class SlowFirstCall:
    """A model whose first call in each thread for each batch size is slow (like a framework
    that initialises per thread and per shape), and that records every call."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.calls: list[tuple[Any, float]] = []  # (input, seconds)
        self.lock = threading.Lock()

    def __call__(self, x: Any) -> Any:
        t0 = time.perf_counter()
        key = (threading.get_ident(), len(x) if isinstance(x, list) else 0)
        with self.lock:
            first = key not in self.seen
            self.seen.add(key)
        if first:
            time.sleep(SLOW_FIRST_S)
        with self.lock:
            self.calls.append((x, time.perf_counter() - t0))
        return x


def first_and_steady(rt: ap.Runtime, model: SlowFirstCall, name: str, n: int = 20) -> tuple[float, float]:
    before = len(model.calls)
    for i in range(n):
        assert rt.call(name, i) == i
    durations = [d for _, d in model.calls[before:]]
    return durations[0], sorted(durations)[len(durations) // 2]


def test_without_warm_up_the_first_request_pays(rt: ap.Runtime) -> None:
    model = SlowFirstCall()
    rt.add_model("m", model=model)
    rt.start()
    first, steady = first_and_steady(rt, model, "m")
    assert first > 10 * steady and first >= SLOW_FIRST_S  # the premise the next test relies on


@pytest.mark.parametrize("instances", [1, 2])
def test_warmed_instances_serve_their_first_request_at_steady_speed(rt: ap.Runtime, instances: int) -> None:
    model = SlowFirstCall()
    rt.add_model("m", model=model, instances=instances, warmup=["a", "b"])
    rt.start()
    warm = [x for x, _ in model.calls]
    assert sorted(warm) == sorted(["a", "b"] * instances)  # each instance ran each sample, before start returned
    first, steady = first_and_steady(rt, model, "m")
    # Within 1.5x of the steady state; a loaded machine may stall any one call for a few ms, so
    # the bound never goes below a quarter of what a cold first call costs.
    assert first <= max(1.5 * steady, SLOW_FIRST_S / 4)


def test_batching_models_are_warmed_at_each_batch_size(rt: ap.Runtime) -> None:
    model = SlowFirstCall()
    rt.add_model("m", model=model, batching=ap.Batching(max_size=6, max_delay_ms=0.0, preferred_sizes=[3]),
                 warmup=lambda: 7)
    rt.start()
    sizes = [len(x) for x, _ in model.calls]
    assert sizes == [1, 2, 3, 4, 6]  # 1, the powers of two below max_size, the preferred size, max_size
    assert all(v == 7 for x, _ in model.calls for v in x)
    # Every size it was warmed at now runs at steady speed.
    assert all(d < SLOW_FIRST_S for x, d in model.calls[len(sizes):])
    futs = rt.submit_many("m", list(range(6)))
    assert [f.result(10) for f in futs] == list(range(6))
    assert all(d < SLOW_FIRST_S for _, d in model.calls[len(sizes):])


def test_a_model_added_to_a_running_runtime_is_warm_before_add_model_returns(rt: ap.Runtime) -> None:
    rt.add_model("other", model=lambda x: x)
    rt.start()
    model = SlowFirstCall()
    rt.add_model("m", model=model, warmup=[0])
    assert [x for x, _ in model.calls] == [0]  # warmed before it became callable
    first, steady = first_and_steady(rt, model, "m")
    assert first <= max(1.5 * steady, SLOW_FIRST_S / 4)


def test_requests_queued_before_start_run_after_the_warm_up(rt: ap.Runtime) -> None:
    model = SlowFirstCall()
    rt.add_model("m", model=model, warmup=["w"])
    f = rt.submit("m", "request")
    rt.start()
    assert f.result(10) == "request"
    assert [x for x, _ in model.calls] == ["w", "request"]


def test_a_failing_warm_up_fails_the_start_and_says_so(rt: ap.Runtime) -> None:
    def model(x: Any) -> Any:
        if x == "bad":
            raise ValueError("cannot take 'bad'")
        return x

    rt.start()
    with pytest.raises(ValueError, match="cannot take 'bad'") as err:
        rt.add_model("m", model=model, warmup=["ok", "bad"])
    assert any("warm-up of model 'm', instance 0" in n for n in getattr(err.value, "__notes__", []))
    assert "m" not in rt.models


def test_a_process_model_is_warmed_in_its_worker(rt: ap.Runtime) -> None:
    rt.add_model("p", factory="process_models:echo", isolation="process", warmup=[1, 2])
    rt.start()
    assert rt.stats()["p"].submitted == 0  # warm-up calls are not requests
    assert rt.call("p", 5) == 5


def test_warm_up_path_from_a_config_file(tmp_path: Any) -> None:
    path = tmp_path / "w.toml"
    path.write_text('[models.m]\nfactory = "process_models:echo"\nwarmup = "process_models:sample_input"\n'
                    '[models.n]\nfactory = "process_models:echo"\nwarmup = [1, 2.5, "x"]\n')
    cfg = Config.load(path)
    assert cfg.models["m"].spec.warmup == "process_models:sample_input"
    assert cfg.models["n"].spec.warmup == (1, 2.5, "x")
    assert Config.loads(cfg.to_toml()).models == cfg.models
    rt = cfg.runtime(start=True)
    try:
        assert rt.call("m", 3) == 3 and rt.call("n", 4) == 4
    finally:
        rt.close()


@pytest.mark.parametrize("value,reason", [
    ([], "at least one sample"),
    ("nope", "not an import path"),
    (3, "give sample inputs"),
])
def test_invalid_warm_up_names_model_and_field(value: Any, reason: str) -> None:
    with pytest.raises(ap.QuotaError) as err:
        ap.ModelSpec("m", model=len, warmup=value)
    assert (err.value.model, err.value.field) == ("m", "warmup") and reason in err.value.reason


def test_a_warm_up_path_that_does_not_import_is_refused_at_add(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError) as err:
        rt.add_model("m", model=len, warmup="apportion.nothing_here:make")
    assert (err.value.model, err.value.field) == ("m", "warmup")
    assert rt.models == []


@pytest.mark.parametrize("path,kind", [("math:pi", "float"), ("sys:argv", "list"), ("os:sep", "str")])
def test_a_warm_up_path_to_something_not_callable_is_refused_at_add(rt: ap.Runtime, path: str, kind: str) -> None:
    with pytest.raises(ap.QuotaError) as err:
        rt.add_model("m", model=len, warmup=path)
    assert (err.value.model, err.value.field) == ("m", "warmup")
    assert f"names a {kind}, not a zero-argument callable" in err.value.reason
    assert rt.models == []
