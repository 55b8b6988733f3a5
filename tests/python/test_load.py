"""Load generator: figures against models whose service time is known, and argument checks.

The subjects sleep, which releases the GIL, so N instances really serve N requests at once
even on a 2-core machine. Bounds come from queueing theory with room for a loaded machine:
a closed loop of N over N instances of service time S completes at most N/S per second and,
with generator and runtime overhead, not less than half of that; nothing finishes faster
than S.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

import apportion as ap
from apportion import load
from apportion.load import SLO, LoadError, ModelLoad, WindowStats

SERVICE_S = 0.002
CAPACITY_1 = 1.0 / SERVICE_S  # requests per second of one instance
# Short windows keep the file fast; the statistical bounds below are sized for them.
FAST = dict(warmup_s=0.2, window_s=0.4, max_s=4.0, seed=7)


def sleeper(x: object) -> object:
    time.sleep(SERVICE_S if x is None else float(x))  # type: ignore[arg-type]
    return x


def started(rt: ap.Runtime, **models: dict) -> ap.Runtime:
    for name, kw in models.items():
        rt.add_model(name, model=kw.pop("model", sleeper), **kw)
    return rt.start()


def check_accounting(m: load.ModelReport) -> None:
    assert m.offered == m.submitted + m.rejected
    assert m.good <= m.completed
    assert m.latency is None or m.latency.count == m.completed
    assert len(m.windows) >= 1


# -- closed loop ------------------------------------------------------------------------------


def test_closed_loop_one_outstanding_matches_service_time(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 1})
    report = load.run(rt, ModelLoad("s", concurrency=1), **FAST)
    m = report["s"]
    check_accounting(m)
    assert 0.5 * CAPACITY_1 <= m.throughput <= 1.05 * CAPACITY_1
    assert m.latency is not None and m.latency.p50_ms >= SERVICE_S * 1e3
    assert m.latency.p50_ms <= m.latency.p90_ms <= m.latency.p99_ms <= m.latency.max_ms
    assert m.compute_mean_ms is not None and m.compute_mean_ms >= SERVICE_S * 1e3
    # One request at a time: it never waits behind another.
    assert m.queue_wait_mean_ms is not None and m.queue_wait_mean_ms < SERVICE_S * 1e3
    assert m.rejected == m.expired == m.failed == 0
    assert m.goodput == m.throughput  # no SLO: every completion counts
    assert m.mode == "closed" and m.load == "closed x1"


def test_closed_loop_four_instances_four_outstanding_is_about_four_times(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 4})
    m = load.run(rt, ModelLoad("s", concurrency=4), **FAST)["s"]
    check_accounting(m)
    # Above what one instance can ever do, so the four really ran side by side.
    assert 0.5 * 4 * CAPACITY_1 <= m.throughput <= 1.05 * 4 * CAPACITY_1
    assert m.throughput > 1.05 * CAPACITY_1
    assert m.latency is not None and m.latency.p50_ms >= SERVICE_S * 1e3


# -- open loop --------------------------------------------------------------------------------


def test_open_loop_below_capacity_serves_the_offered_rate(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 1})
    rate = 0.5 * CAPACITY_1
    m = load.run(rt, ModelLoad("s", rate=rate), warmup_s=0.2, window_s=0.6, max_s=4.0, seed=3)["s"]
    check_accounting(m)
    # Poisson arrivals: ~rate * 1.8 s = 450 expected, one standard deviation ~5%.
    assert 0.8 * rate <= m.offered_rate <= 1.2 * rate
    assert 0.8 * rate <= m.throughput <= 1.2 * rate
    assert m.rejected == 0
    assert m.mode == "open" and m.rate == rate
    assert m.schedule_lag_p99_ms is not None


def test_open_loop_above_capacity_rejects_and_serves_capacity(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 1, "max_queue": 4})
    m = load.run(rt, ModelLoad("s", rate=4 * CAPACITY_1), **FAST)["s"]
    check_accounting(m)
    assert m.rejected > 0
    assert 0.5 * CAPACITY_1 <= m.throughput <= 1.05 * CAPACITY_1
    # Rejected arrivals are dropped, not retried: offered follows the schedule, not capacity.
    assert m.offered_rate > 2 * m.throughput


# -- goodput, outcomes ------------------------------------------------------------------------


def test_goodput_counts_only_completions_within_the_slo(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 1})
    fast, slow = 0.0005, 0.008
    spec = ModelLoad("s", concurrency=1, inputs=[fast, slow], slo=SLO(latency_ms=4.0, percentile=99))
    report = load.run(rt, spec, **FAST)
    m = report["s"]
    check_accounting(m)
    assert m.completed > 0
    assert 0.35 <= m.goodput / m.throughput <= 0.65
    assert m.slo_met is False  # half the requests take 8 ms: p99 is far above 4 ms
    assert "p99<=4ms MISSED" in str(report)


def test_failures_expiries_and_the_report_forms(rt: ap.Runtime) -> None:
    def flaky(x: object) -> object:
        time.sleep(0.001)
        if x == "boom":
            raise ValueError("boom")
        return x

    started(rt, flaky={"model": flaky}, slow={"instances": 1})
    report = load.run(rt, [
        ModelLoad("flaky", concurrency=1, inputs=["ok", "boom"]),
        # Four outstanding behind one 5 ms instance wait ~15 ms: most expire at 3 ms.
        ModelLoad("slow", concurrency=4, inputs=lambda: 0.005, slo=SLO(timeout_ms=3.0)),
    ], **{**FAST, "max_s": 2.0})
    f, s = report["flaky"], report["slow"]
    check_accounting(f)
    check_accounting(s)
    assert f.failed > 0 and f.completed > 0
    assert 0.35 <= f.failed / (f.failed + f.completed) <= 0.65
    assert s.expired > 0 and s.completed > 0
    assert s.slo_met is None  # a timeout alone is no latency objective
    assert s.good <= s.completed

    text = str(report)
    assert "flaky" in text and "slow" in text and "closed x4" in text and "p99 ms" in text
    d = json.loads(report.to_json())
    assert d["models"]["flaky"]["failed"] == f.failed
    assert d["models"]["slow"]["slo"]["timeout_ms"] == 3.0
    assert d["goodput"] == pytest.approx(report.goodput)
    assert set(d) >= {"stable", "windows", "window_s", "tolerance", "models"}


# -- stability --------------------------------------------------------------------------------


def test_steady_model_is_reported_stable(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 2})
    seen: list[int] = []
    report = load.run(rt, ModelLoad("s", concurrency=2), warmup_s=0.2, window_s=0.4,
                      tolerance=0.3, max_s=8.0, on_window=lambda i, w: seen.append(i))
    assert report.stable and report["s"].stable
    assert report.windows >= 3 and seen == list(range(report.windows))
    assert report["s"].duration_s == pytest.approx(3 * 0.4)
    assert "stable after" in str(report)


def test_a_model_that_keeps_slowing_down_is_not_stable(rt: ap.Runtime) -> None:
    t0: list[float] = []

    def slowing(x: object) -> object:
        if not t0:
            t0.append(time.monotonic())
        # Service time doubles every 0.3 s: throughput never settles.
        time.sleep(min(0.05, 0.001 * 2 ** ((time.monotonic() - t0[0]) / 0.3)))
        return x

    started(rt, s={"model": slowing})
    report = load.run(rt, ModelLoad("s", concurrency=1), warmup_s=0.1, window_s=0.3, max_s=1.3)
    assert not report.stable and not report["s"].stable
    assert report.windows == 4  # (1.3 - 0.1) / 0.3
    assert "NOT stable" in str(report)


def window(tp: float, p99: float | None) -> WindowStats:
    return WindowStats(index=0, throughput=tp, goodput=tp, p99_ms=p99, rejected=0, expired=0, failed=0)


def test_stability_rule() -> None:
    ok = [window(100, 5.0), window(104, 5.2), window(97, 4.9)]
    assert load.windows_stable(ok, 3, 0.1)
    assert not load.windows_stable(ok[:2], 3, 0.1)  # too few windows
    assert not load.windows_stable([*ok[:2], window(130, 5.0)], 3, 0.1)  # throughput moved
    assert not load.windows_stable([*ok[:2], window(100, 9.0)], 3, 0.1)  # p99 moved
    assert load.windows_stable([window(300, 1.0), *ok], 3, 0.1)  # only the last ones count
    assert load.windows_stable([window(0, None)] * 3, 3, 0.1)
    assert not load.windows_stable([*ok[:2], window(0, None)], 3, 0.1)


# -- inputs -----------------------------------------------------------------------------------


def test_an_iterator_that_runs_dry_ends_that_models_load(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 1})
    report = load.run(rt, ModelLoad("s", concurrency=2, inputs=iter([0.001] * 20)), **FAST)
    assert report["s"].inputs_exhausted
    assert rt.stats()["s"].submitted == 20


def test_an_inputs_callable_error_reaches_the_caller(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 1})

    def bad() -> object:
        raise RuntimeError("no more data")

    with pytest.raises(RuntimeError, match="no more data") as info:
        load.run(rt, ModelLoad("s", concurrency=1, inputs=bad), **FAST)
    assert any("'s'" in n for n in getattr(info.value, "__notes__", []))


# -- invalid arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "error", "words"), [
    (ModelLoad("nope", concurrency=1), ap.ModelNotFound, ["'nope'", "model", "'echo'"]),
    (ModelLoad("echo", rate=0.0), LoadError, ["'echo'", "rate"]),
    (ModelLoad("echo", rate=-5), LoadError, ["'echo'", "rate"]),
    (ModelLoad("echo", concurrency=0), LoadError, ["'echo'", "concurrency", ">= 1"]),
    (ModelLoad("echo", concurrency=1.5), LoadError, ["'echo'", "concurrency"]),  # type: ignore[arg-type]
    (ModelLoad("echo"), LoadError, ["'echo'", "concurrency", "rate"]),
    (ModelLoad("echo", concurrency=1, rate=10), LoadError, ["'echo'", "exactly one"]),
    (ModelLoad("echo", concurrency=1, slo=SLO(latency_ms=0)), LoadError, ["'echo'", "slo.latency_ms"]),
    (ModelLoad("echo", concurrency=1, slo=SLO(latency_ms=5, percentile=150)), LoadError,
     ["'echo'", "slo.percentile"]),
    (ModelLoad("echo", concurrency=1, slo=SLO(timeout_ms=-1)), LoadError, ["'echo'", "slo.timeout_ms"]),
    (ModelLoad("echo", concurrency=1, slo=SLO()), LoadError, ["'echo'", "latency_ms", "timeout_ms"]),
    (ModelLoad("echo", concurrency=1, inputs=[]), LoadError, ["'echo'", "inputs"]),
    (ModelLoad("echo", rate=10, arrivals="bursty"), LoadError, ["'echo'", "arrivals"]),  # type: ignore[arg-type]
])
def test_invalid_loads_name_the_model_and_field(rt: ap.Runtime, spec: ModelLoad,
                                                error: type[Exception], words: list[str]) -> None:
    started(rt, echo={"model": lambda x: x})
    with pytest.raises(error) as info:
        load.run(rt, spec, **FAST)
    for w in words:
        assert w in str(info.value)
    assert rt.stats()["echo"].submitted == 0  # checked before anything was sent


@pytest.mark.parametrize(("settings", "words"), [
    ({"window_s": 0}, ["window_s"]),
    ({"warmup_s": -1}, ["warmup_s"]),
    ({"tolerance": 0}, ["tolerance"]),
    ({"stable_windows": 0}, ["stable_windows"]),
    ({"max_s": 1.0, "warmup_s": 0.5, "window_s": 0.5}, ["max_s", "2"]),
])
def test_invalid_settings_name_the_field(rt: ap.Runtime, settings: dict, words: list[str]) -> None:
    started(rt, echo={"model": lambda x: x})
    with pytest.raises(LoadError) as info:
        load.run(rt, ModelLoad("echo", concurrency=1), **settings)
    for w in words:
        assert w in str(info.value)


def test_loads_must_be_distinct_and_the_runtime_serving(rt: ap.Runtime) -> None:
    rt.add_model("echo", model=lambda x: x)
    with pytest.raises(ap.RuntimeClosed, match="start"):
        load.run(rt, ModelLoad("echo", concurrency=1))
    rt.start()
    with pytest.raises(LoadError, match="'echo'.*more than once"):
        load.run(rt, [ModelLoad("echo", concurrency=1), ModelLoad("echo", rate=5)])
    with pytest.raises(LoadError, match="empty"):
        load.run(rt, [])
    rt.close()
    with pytest.raises(ap.RuntimeClosed):
        load.run(rt, ModelLoad("echo", concurrency=1))


def test_the_generator_stops_its_threads(rt: ap.Runtime) -> None:
    started(rt, s={"instances": 1})
    load.run(rt, ModelLoad("s", rate=100), warmup_s=0.0, window_s=0.2, stable_windows=1, max_s=0.5)
    assert not [t for t in threading.enumerate() if t.name.startswith("apportion-load-")]
    s = rt.stats()["s"]
    assert s.in_flight == 0  # queued requests were cancelled, running ones waited for


# -- descriptions from configs and command lines -----------------------------------------------


def test_specs_from_command_lines_and_tables() -> None:
    spec = load.parse_spec("ranker:concurrency=4,latency_ms=20,percentile=99.9")
    assert spec == ModelLoad("ranker", concurrency=4, slo=SLO(latency_ms=20.0, percentile=99.9))
    spec = load.parse_spec("echo: rate=500, arrivals=constant, timeout_ms=50")
    assert spec.rate == 500.0 and spec.arrivals == "constant" and spec.slo == SLO(timeout_ms=50.0)
    assert load.model_load("m", {"rate": 10, "latency_ms": 5}).rate == 10.0
    with pytest.raises(LoadError, match="'m'.*unknown key 'conc'.*concurrency"):
        load.model_load("m", {"conc": 4})
    with pytest.raises(LoadError, match="'m'.*concurrency must be an integer"):
        load.parse_spec("m:concurrency=four")
    with pytest.raises(LoadError, match="NAME:key=value"):
        load.parse_spec("ranker")
    with pytest.raises(LoadError, match="'m'.*slo.percentile"):
        load.parse_spec("m:concurrency=1,latency_ms=5,percentile=0")
