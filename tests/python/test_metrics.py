"""Prometheus text from runtime stats: parsed back with prometheus_client's own parser, the
values equal rt.stats() (counts exactly), histograms are the native buckets."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import apportion as ap
from apportion import _core
from apportion.metrics import CONTENT_TYPE, StatsCollector, latency_bounds_ns, prometheus_text

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """({family name: type}, {(sample name, sorted labels): value})."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def buckets(samples: Samples, name: str, model: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of one model's histogram, by le."""
    out = [(float(dict(k[1])["le"]), v) for k, v in samples.items()
           if k[0] == f"{name}_bucket" and dict(k[1])["model"] == model]
    return sorted(out)


def check_histogram(samples: Samples, name: str, model: str, hist: ap.HistogramSnapshot,
                    per_unit: float) -> None:
    """The family's buckets are the native ones: each cumulative count equals the native
    counts of the buckets whose largest value is <= le; _count and _sum are the native ones."""
    got = buckets(samples, name, model)
    assert got[-1] == (float("inf"), hist.count)
    counts = [c for _, c in got]
    assert counts == sorted(counts)  # cumulative
    for le, c in got[:-1]:
        assert c == sum(n for ub, n in zip(hist.upper_bounds, hist.counts) if ub <= round(le * per_unit))
    assert value(samples, f"{name}_count", model=model) == hist.count
    assert value(samples, f"{name}_sum", model=model) == pytest.approx(hist.sum / per_unit)


def test_text_after_a_known_load_equals_the_stats(rt: ap.Runtime, gate) -> None:
    def boom(x: int) -> int:
        if x % 2:
            raise ValueError(x)
        return x

    rt.add_model("echo", model=lambda x: x, instances=2)
    rt.add_model("boom", model=boom)
    rt.add_model("gated", model=gate, max_queue=2)
    rt.start()
    for f in rt.submit_many("echo", range(20)):
        f.result(10)
    for f in rt.submit_many("boom", range(10)):
        f.exception(10)
    rt.submit("gated", 0)
    assert gate.entered.wait(10)
    # Long enough that the stats below are read before the expiry timer takes it (1 ms raced
    # them on a loaded machine), short enough to wait for below.
    expiring = rt.submit("gated", 1, timeout_ms=500)
    rt.submit("gated", 2)
    with pytest.raises(ap.QueueFull):
        rt.submit("gated", 3)

    stats = rt.stats()
    types, samples = parse(prometheus_text(stats))
    assert all(name.startswith("apportion_") for name in types)
    assert types["apportion_requests"] == "counter"  # the parser strips _total from counters
    assert types["apportion_end_to_end_seconds"] == types["apportion_batch_size"] == "histogram"
    assert types["apportion_queue_depth"] == types["apportion_in_flight"] == "gauge"
    assert "apportion_gpu_memory_bytes" not in types  # no model has a GPU budget

    expected = {  # (completed, failed, rejected, expired, cancelled, submitted, queued, in flight)
        "echo": (20, 0, 0, 0, 0, 20, 0, 0),
        "boom": (5, 5, 0, 0, 0, 10, 0, 0),
        "gated": (0, 0, 1, 0, 0, 4, 2, 3),
    }
    for model, (done, failed, rejected, expired, cancelled, submitted, queued, running) in expected.items():
        s = stats[model]
        for outcome, n in zip(("completed", "failed", "rejected", "expired", "cancelled"),
                              (done, failed, rejected, expired, cancelled)):
            assert value(samples, "apportion_requests_total", model=model, outcome=outcome) == n == getattr(s, outcome)
        assert value(samples, "apportion_requests_submitted_total", model=model) == submitted == s.submitted
        assert value(samples, "apportion_queue_depth", model=model) == queued == s.queued
        assert value(samples, "apportion_in_flight", model=model) == running == s.in_flight
        assert value(samples, "apportion_instances", model=model) == s.instances
        assert value(samples, "apportion_max_queue", model=model) == s.max_queue
        assert value(samples, "apportion_shared_pool_calls_total", model=model) == s.pool_calls == 0
        assert value(samples, "apportion_shared_pool_seconds_total", model=model) == s.pool_time_s == 0.0
        assert value(samples, "apportion_model_moves_total", model=model) == s.moves == 0
        for field in ("queue_wait", "compute", "end_to_end"):
            hist = getattr(s, field).histogram
            assert hist is not None
            check_histogram(samples, f"apportion_{field}_seconds", model, hist, 1e9)
        assert s.batch_size is not None
        check_histogram(samples, "apportion_batch_size", model, s.batch_size, 1.0)
    assert value(samples, "apportion_end_to_end_seconds_count", model="echo") == 20
    assert value(samples, "apportion_batch_size_bucket", model="echo", le="1.0") == 20  # no batching

    expiring.exception(10)  # expired in the queue, behind the held call
    gate.release.set()
    rt.close()
    stats = rt.stats()
    _, samples = parse(prometheus_text(stats))
    assert value(samples, "apportion_requests_total", model="gated", outcome="expired") == 1
    assert value(samples, "apportion_requests_total", model="gated", outcome="completed") == 2
    assert value(samples, "apportion_in_flight", model="gated") == 0


def test_latency_buckets_hold_exact_counts_at_their_bounds() -> None:
    h = _core.LogHistogram()
    for v in [1_500] * 3 + [2_000_000] * 2 + [10**12]:  # 1.5 us, 2 ms, 1000 s (past the top bound)
        h.record(v)
    snap = h.snapshot()
    lat = ap.LatencyStats.from_histogram(snap)
    batch = _core.LogHistogram()
    for size in (1, 3, 16, 16, 40, 100):
        batch.record(size)
    s = ap.ModelStats(name="m", instances=1, max_queue=8, submitted=6, completed=6, failed=0, rejected=0,
                      expired=0, cancelled=0, queued=0, queue_wait=lat, compute=lat, end_to_end=lat,
                      gpu_memory_bytes=1 << 30, batch_size=batch.snapshot())
    types, samples = parse(prometheus_text({"m": s}))
    got = dict(buckets(samples, "apportion_compute_seconds", "m"))
    assert got[1023e-9] == 0 and got[1535e-9] == 3 and got[2047e-9] == 3  # 1.5 us <= 1.535 us
    assert got[(2**21 - 1) / 1e9] == 5  # 2 ms <= 2.097 ms
    assert got[(2**36 - 1) / 1e9] == 5 and got[float("inf")] == 6  # past the last bound: only +Inf
    assert value(samples, "apportion_compute_seconds_sum", model="m") == pytest.approx((4_500 + 4e6 + 1e12) / 1e9)
    b = dict(buckets(samples, "apportion_batch_size", "m"))
    assert (b[1.0], b[2.0], b[4.0], b[16.0], b[32.0], b[63.0], b[127.0], b[float("inf")]) == (1, 1, 2, 4, 4, 5, 6, 6)
    assert value(samples, "apportion_gpu_memory_bytes", model="m") == 1 << 30
    check_histogram(samples, "apportion_compute_seconds", "m", snap, 1e9)

    # A histogram-less figure (built by hand) has no series; the others still render.
    bare = ap.LatencyStats(count=0, mean_ms=0.0, p50_ms=0.0, p90_ms=0.0, p99_ms=0.0, p999_ms=0.0, max_ms=0.0)
    _, samples = parse(prometheus_text({"m": ap.ModelStats(
        name="m", instances=1, max_queue=8, submitted=0, completed=0, failed=0, rejected=0, expired=0,
        cancelled=0, queued=0, queue_wait=bare, compute=bare, end_to_end=bare)}))
    assert not buckets(samples, "apportion_compute_seconds", "m")
    assert value(samples, "apportion_requests_submitted_total", model="m") == 0


def test_bounds_and_collector() -> None:
    bounds = latency_bounds_ns(2)
    assert bounds[:3] == (1023, 1535, 2047) and bounds[-1] == 2**36 - 1 and len(bounds) == 53
    assert len(latency_bounds_ns(4)) == 26 * 4 + 1
    with pytest.raises(ValueError, match="per_octave must divide 32"):
        latency_bounds_ns(3)
    with pytest.raises(ValueError, match="low_exp"):
        latency_bounds_ns(2, low_exp=4)
    # Every bound is the top of a native bucket (what makes the counts exact).
    tops = set(_core.LogHistogram().snapshot().upper_bounds)
    assert set(latency_bounds_ns(32)) <= tops
    assert CONTENT_TYPE.startswith("text/plain")

    calls = []

    def source() -> dict[str, ap.ModelStats]:
        calls.append(time.monotonic())
        return {}

    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(StatsCollector(source, per_octave=4))
    assert calls == []  # registering does not read the stats
    text = generate_latest(registry).decode()
    assert len(calls) == 1 and "apportion_requests_total" in text  # empty families still say TYPE


def test_a_kept_collectors_sums_carry_on_across_the_native_wrap_and_restart_with_the_model() -> None:
    # The native sum counts nanoseconds modulo 2**64: a backlogged model's queue waits wrap it
    # in weeks. Read as is, _sum dropped by ~1.8e10 s there, which a scrape reads as a reset.
    from apportion.metrics import RuntimeMetrics

    def stats(*values: int) -> ap.ModelStats:
        h = _core.LogHistogram()
        for v in values:
            h.record(v)
        lat = ap.LatencyStats.from_histogram(h.snapshot())
        return ap.ModelStats(name="m", instances=1, max_queue=8, submitted=len(values), completed=len(values),
                             failed=0, rejected=0, expired=0, cancelled=0, queued=0, queue_wait=lat, compute=lat,
                             end_to_end=lat, batch_size=h.snapshot())

    class Source:  # what RuntimeMetrics reads of a runtime
        def __init__(self) -> None:
            self.now: dict[str, ap.ModelStats] = {}

        def stats(self) -> dict[str, ap.ModelStats]:
            return self.now

        def cpu_seconds(self) -> dict[str, float]:
            return {name: 1.5 for name in self.now}

    def sum_s(page: bytes | str) -> float:
        _, samples = parse(page if isinstance(page, str) else page.decode())
        return value(samples, "apportion_queue_wait_seconds_sum", model="m")

    src = Source()
    page = RuntimeMetrics(src)
    near = 2**64 - 10**9  # one second short of the wrap
    src.now = {"m": stats(near // 2, near // 2)}
    assert sum_s(page.text()) == pytest.approx(near / 1e9)
    src.now = {"m": stats(near // 2, near // 2, 3 * 10**9)}  # the native sum wrapped: 2e9 ns now
    assert src.now["m"].queue_wait.histogram.sum == 2 * 10**9 - 2 * (near % 2)
    assert sum_s(prometheus_text(src.now)) == pytest.approx(2.0)  # one reading alone cannot tell
    assert sum_s(page.text()) == pytest.approx((near + 3 * 10**9) / 1e9)  # carried on across it
    _, samples = parse(page.text().decode())
    assert value(samples, "apportion_model_cpu_seconds_total", model="m") == 1.5
    # The model removed and added again: its count starts over, and so does its sum.
    src.now = {}
    assert "model=\"m\"" not in page.text().decode()
    src.now = {"m": stats(5 * 10**9)}
    assert sum_s(page.text()) == pytest.approx(5.0)
    src.now = {"m": stats(5 * 10**9, 2 * 10**9)}  # and grows on from there
    assert sum_s(page.text()) == pytest.approx(7.0)
    # Added again between two scrapes with more requests than before: its sum (below the old
    # one) is no wrap, since the old sum plus those requests cannot reach 2**64.
    src.now = {"m": stats(10**9, 10**9, 10**9)}
    assert sum_s(page.text()) == pytest.approx(3.0)
    # A collector made after the wrap has only the native reading to go on.
    assert sum_s(RuntimeMetrics(src).text()) == pytest.approx(3.0)


def test_a_torn_reading_after_the_wrap_keeps_the_carry() -> None:
    # A snapshot may hold a new value in its sum but not yet in its max (the native record()
    # stores count, sum, max in turn): its growth then exceeds count x max. Judged a new
    # series, the _sum carried across the wrap fell back to the raw sum.
    from apportion.metrics import _Sums

    def hist(count: int, total: int, high: int) -> ap.HistogramSnapshot:
        counts = [0] * 1280
        counts[-1] = count
        h = ap.HistogramSnapshot.__new__(ap.HistogramSnapshot)
        h.__setstate__((counts, total % 2**64, high, high))
        return h

    sums, big = _Sums(), 2**54  # values of ~208 days: 1,024 of them wrap the sum
    assert sums.total(("m", "q"), hist(1024, 2**64 - 1000, big)) == 2**64 - 1000
    assert sums.total(("m", "q"), hist(1025, 2**64 - 1000 + 10**9, big)) == 2**64 - 1000 + 10**9  # wrapped
    torn = hist(1026, 2**64 - 1000 + 10**9 + 3 * big, big)  # a value of 3 x max, max not updated yet
    assert sums.total(("m", "q"), torn) == 2**64 - 1000 + 10**9 + 3 * big
    # A wrap the new values cannot explain is a new series.
    assert sums.total(("m", "q"), hist(1027, 5, 10)) == 5


def test_scrapes_run_one_at_a_time() -> None:
    # Two scrapes at once (two Prometheus replicas) could total an older reading after a newer
    # one: read as a new series, which lost the _sum carried across the native wrap.
    import threading

    from prometheus_client import CollectorRegistry, generate_latest

    entered, go = threading.Event(), threading.Event()
    calls: list[str] = []

    def source() -> dict[str, ap.ModelStats]:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            entered.set()
            assert go.wait(30)
        return {}

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(source))
    first = threading.Thread(target=generate_latest, args=(registry,), name="first")
    second = threading.Thread(target=generate_latest, args=(registry,), name="second")
    first.start()
    assert entered.wait(30)
    second.start()
    time.sleep(0.2)
    assert calls == ["first"]  # the second waits for the first to finish
    go.set()
    first.join(30)
    second.join(30)
    assert calls == ["first", "second"]


def test_the_controllers_state_is_on_the_page_once_one_was_started() -> None:
    from apportion.controller import Controller
    from apportion.metrics import RuntimeMetrics

    def log(m: Any) -> None:
        raise ValueError("logger down")  # each move also counts one error

    with ap.Runtime() as rt:
        rt.add_model("m", model=lambda x: (time.sleep(0.002), x)[1])
        rt.add_model("other", model=lambda x: x)  # no objective: not the controller's
        rt.start()
        page = RuntimeMetrics(rt)
        types, _ = parse(page.text().decode())
        assert not [n for n in types if n.startswith("apportion_controller")], "no controller, no families"
        assert rt.controller is None
        c = Controller(rt, {"m": 0.5}, percentiles={"m": 99.99999}, capacity=4, confirm=1, dwell_s=0.0,
                       window_s=3600, log=log)
        c.start()
        assert rt.controller is c
        deadline = time.monotonic() + 10
        while c._last is None and time.monotonic() < deadline:  # its thread's first reading, then an hour's wait
            time.sleep(0.001)
        assert c._last is not None
        for i in range(20):
            rt.call("m", i)
        moves = c.step()
        assert [m.change for m in moves] == ["instances 1 -> 2"], c.errors
        state = c.stats()
        types, samples = parse(page.text().decode())
        assert {n: t for n, t in types.items() if n.startswith("apportion_controller")} == {
            "apportion_controller_running": "gauge", "apportion_controller_errors": "counter",
            "apportion_controller_idle_cpus": "gauge", "apportion_controller_outside_cpus": "gauge",
            "apportion_controller_objective_seconds": "gauge",
            "apportion_controller_window_latency_seconds": "gauge",
            "apportion_controller_window_arrivals_per_second": "gauge",
            "apportion_controller_window_within_objective_ratio": "gauge",
            "apportion_controller_at_risk_windows": "gauge", "apportion_controller_on_trial": "gauge",
            "apportion_controller_moves": "counter", "apportion_controller_undone_moves": "counter",
            "apportion_controller_held_windows": "counter"}
        assert value(samples, "apportion_controller_running") == 1.0
        assert value(samples, "apportion_controller_errors_total") == 1 == state["error_count"]
        assert value(samples, "apportion_controller_idle_cpus") == pytest.approx(state["idle_cpus"])
        assert state["outside_cpus"] is not None  # (Linux: /proc/stat and thread times are read)
        assert value(samples, "apportion_controller_outside_cpus") == pytest.approx(state["outside_cpus"])
        assert value(samples, "apportion_controller_objective_seconds", model="m", percentile="99.99999") == 0.5e-3
        w = state["windows"]["m"]
        assert w.arrivals == 20 and w.good is not None
        assert value(samples, "apportion_controller_window_arrivals_per_second", model="m") == pytest.approx(w.rate)
        assert value(samples, "apportion_controller_window_latency_seconds", model="m") == pytest.approx(
            w.objective_ms / 1e3)
        assert value(samples, "apportion_controller_window_within_objective_ratio", model="m") == pytest.approx(
            w.good / 20)
        assert value(samples, "apportion_controller_on_trial", model="m") == 1.0, "its move is being judged"
        assert value(samples, "apportion_controller_moves_total", model="m") == 1.0
        assert value(samples, "apportion_controller_undone_moves_total", model="m") == 0.0
        assert value(samples, "apportion_controller_held_windows_total", model="m") == 0.0
        assert value(samples, "apportion_controller_at_risk_windows", model="m") == 0.0, "a move resets it"
        assert not [k for k in samples if dict(k[1]).get("model") == "other" and "controller" in k[0]]
        # The runtime's own count of the model's moves agrees.
        assert value(samples, "apportion_model_moves_total", model="m") == 1.0
        c.stop()
        assert value(parse(page.text().decode())[1], "apportion_controller_running") == 0.0
        # One reading, rendered once: the controller's state only when given.
        assert value(parse(prometheus_text(rt.stats(), controller=c))[1], "apportion_controller_moves_total",
                     model="m") == 1.0
        assert "apportion_controller" not in prometheus_text(rt.stats())


def test_running_calls_and_the_oldest_calls_age_show_a_call_that_does_not_return() -> None:
    # A call stuck for good (a deadlock, a hung device) showed as one request in flight, the
    # same as a queued one, until the drain at shutdown gave up on it.
    import threading

    release = threading.Event()
    with ap.Runtime() as rt:
        rt.add_model("one", model=lambda x: release.wait(30) and x, instances=2)
        rt.add_model("batch", model=lambda xs: [release.wait(30) and x for x in xs],
                     batching=ap.Batching(4, 1.0))
        rt.start()
        assert (rt.stats()["one"].running_calls, rt.stats()["one"].oldest_call_s) == (0, 0.0)
        held = [rt.submit("one", i) for i in range(3)] + [rt.submit("batch", i) for i in range(3)]
        deadline = time.monotonic() + 10
        while (rt.stats()["one"].running_calls < 2 or rt.stats()["batch"].running_calls < 1) \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # after every call began: each has run at least this long
        stats = rt.stats()
        one, batch = stats["one"], stats["batch"]
        assert one.running_calls == 2 and one.in_flight == 3, "two run, one waits"
        assert batch.running_calls == 1, "one call for the batch"
        assert one.oldest_call_s >= 0.05 and batch.oldest_call_s >= 0.05
        _, samples = parse(prometheus_text(stats))
        assert value(samples, "apportion_running_calls", model="one") == 2
        assert value(samples, "apportion_oldest_call_seconds", model="batch") == pytest.approx(batch.oldest_call_s)
        release.set()
        assert [f.result(timeout=30) for f in held] == [0, 1, 2, 0, 1, 2]
        # A worker clears its record just after the call returns, which may be after the
        # results are handed out: wait for it (bounded), then nothing runs.
        deadline = time.monotonic() + 10
        while any(s.running_calls for s in rt.stats().values()) and time.monotonic() < deadline:
            time.sleep(0.005)
        after = rt.stats()
        assert all((s.running_calls, s.oldest_call_s) == (0, 0.0) for s in after.values())
