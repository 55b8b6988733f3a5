"""Prometheus text from runtime stats: parsed back with prometheus_client's own parser, the
values equal rt.stats() (counts exactly), histograms are the native buckets."""

from __future__ import annotations

import time

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
