"""Metrics: outcome counters add up; latency histograms; readable table."""

from __future__ import annotations

import pickle
import time

import pytest

import apportion as ap
from apportion import _core


def test_counts_and_latencies(rt: ap.Runtime) -> None:
    def model(x):
        if x % 5 == 0:
            raise ValueError(x)
        time.sleep(0.002)
        return x

    rt.add_model("m", model=model, instances=2)
    rt.start()
    futs = rt.submit_many("m", range(1, 51))
    for f in futs:
        f.exception(10)
    s = rt.stats()["m"]
    assert (s.submitted, s.completed, s.failed, s.in_flight) == (50, 40, 10, 0)
    assert s.compute.count == s.end_to_end.count == s.queue_wait.count == 50
    # successful calls sleep 2 ms: the compute p50 reflects it (histogram error ~3%)
    assert 1.9 <= s.compute.p50_ms < 50
    assert s.compute.p50_ms <= s.compute.p90_ms <= s.compute.p99_ms <= s.compute.p999_ms <= s.compute.max_ms
    assert s.end_to_end.p99_ms >= s.compute.p99_ms * 0.96
    assert s.instances == 2 and s.max_queue == 1024


def test_stats_mapping_and_table(rt: ap.Runtime) -> None:
    rt.add_model("alpha", model=lambda x: x)
    rt.add_model("beta", model=lambda x: x)
    rt.start()
    rt.submit("alpha", 1).result(10)
    stats = rt.stats()
    assert set(stats) == {"alpha", "beta"} and len(stats) == 2
    assert stats["alpha"].completed == 1 and stats["beta"].submitted == 0
    assert stats["beta"].end_to_end.count == 0 and stats["beta"].end_to_end.p99_ms == 0.0
    table = str(stats)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "inst", "submitted"]
    assert "p99 ms" in lines[0]
    assert lines[2].startswith("alpha") and lines[3].startswith("beta")


def test_rejections_and_expiries_are_counted(rt: ap.Runtime, gate) -> None:
    rt.add_model("m", model=gate, max_queue=2)
    rt.start()
    rt.submit("m", 0)
    assert gate.entered.wait(10)
    a = rt.submit("m", 1, timeout_ms=1)
    rt.submit("m", 2)
    try:
        rt.submit("m", 3)
    except ap.QueueFull:
        pass
    time.sleep(0.01)
    gate.release.set()
    a.exception(10)
    rt.close()
    s = rt.stats()["m"]
    assert (s.submitted, s.completed, s.rejected, s.expired, s.in_flight) == (4, 2, 1, 1, 0)


# -- native histogram snapshots: buckets, windows, quantiles -------------------------------------


def recorded(*values: int, hist: _core.LogHistogram | None = None) -> tuple[_core.LogHistogram, ap.HistogramSnapshot]:
    h = hist or _core.LogHistogram()
    for v in values:
        h.record(v)
    return h, h.snapshot()


def test_histogram_snapshot_buckets_and_quantiles() -> None:
    _, s = recorded(*[1_500] * 99, 40_000)
    bounds = s.upper_bounds
    assert len(s.counts) == len(bounds) == 1280 and list(bounds) == sorted(bounds)
    assert bounds[:3] == (0, 1, 2) and bounds[-1] == 2**64 - 1  # exact below 32, clamped at the top
    assert (s.count, s.sum, s.max) == (100, 99 * 1_500 + 40_000, 40_000)
    assert s.mean == pytest.approx((99 * 1_500 + 40_000) / 100)
    nonzero = {bounds[i]: c for i, c in enumerate(s.counts) if c}
    assert list(nonzero.values()) == [99, 1]
    lo, hi = nonzero  # each value lies in its bucket: (previous bound, bound]
    assert lo >= 1_500 and bounds[bounds.index(lo) - 1] < 1_500
    assert hi >= 40_000 and bounds[bounds.index(hi) - 1] < 40_000
    assert s.quantile(0.5) == pytest.approx(1_500, rel=0.03)
    assert s.quantile(0.99) == pytest.approx(1_500, rel=0.03)
    assert s.quantile(1.0) == pytest.approx(40_000, rel=0.03) and s.quantile(1.0) <= s.max
    assert s.quantile(0.0) == s.quantile(0.01)  # rank 0 is the smallest value
    assert _core.LogHistogram().snapshot().quantile(0.99) == 0
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
            s.quantile(bad)


def test_window_is_a_later_snapshot_minus_an_earlier_one() -> None:
    h, s1 = recorded(*[2_000_000] * 50)  # window 1: 2 ms
    _, s2 = recorded(*[20_000_000] * 50, hist=h)  # window 2: 20 ms
    w = s2.subtract(s1)
    assert (w.count, w.sum, w.max) == (50, 50 * 20_000_000, 20_000_000)
    assert w.quantile(0.5) == pytest.approx(20e6, rel=0.03) and w.quantile(0.01) == pytest.approx(20e6, rel=0.03)
    assert s2.quantile(0.25) == pytest.approx(2e6, rel=0.03)  # the cumulative one mixes the windows
    assert s1.subtract(s1).count == 0 and s1.subtract(s1).max == 0
    with pytest.raises(ValueError, match="different histograms"):
        s2.subtract(_core.LogHistogram().snapshot())  # an empty snapshot of another histogram
    with pytest.raises(ValueError, match="subtract the earlier snapshot from the later one"):
        s1.subtract(s2)
    # Windows survive pickling (sent between processes) with their origin.
    again = pickle.loads(pickle.dumps(s2))
    assert (again.count, again.sum, again.max, again.origin) == (s2.count, s2.sum, s2.max, s2.origin)
    assert again.subtract(s1).count == 50


def test_a_window_across_the_running_sums_wrap_keeps_its_sum_and_mean() -> None:
    # The sum of nanoseconds is kept modulo 2^64: a backlogged model's queue waits (1e13 ns a
    # second) wrap it in about three weeks, and a window across the wrap must still read.
    h, before = recorded(2**63 - 1, 2**63 - 1)
    _, after = recorded(10_000_000, 30_000_000, hist=h)
    assert after.sum < before.sum
    w = after.subtract(before)
    assert (w.count, w.sum) == (2, 40_000_000)
    since = ap.LatencyStats.from_histogram(after).since(ap.LatencyStats.from_histogram(before))
    assert since.count == 2 and since.mean_ms == pytest.approx(20.0)


def test_model_snapshots_are_bound_types_whose_windows_stay_within_one_histogram(rt: ap.Runtime) -> None:
    rt.add_model("a", model=lambda x: x)
    rt.add_model("b", model=lambda x: x)
    rt.start()
    before = rt._model_stats("a")
    assert isinstance(before, _core.ModelSnapshot) and before.name == "a"
    for i in range(5):
        rt.submit("a", i).result(10)
    after = rt._model_stats("a")
    assert (after.submitted, after.completed, after.lane_groups, after.pool_calls, after.pool_time_ns) == (5, 5, 1, 0, 0)
    assert after.batch_size.count == 5 and after.batch_size.max == 1
    assert after.compute.subtract(before.compute).count == 5
    with pytest.raises(ValueError, match="different histograms"):
        after.compute.subtract(before.queue_wait)  # another histogram of the same model
    with pytest.raises(ValueError, match="different histograms"):
        after.compute.subtract(rt._model_stats("b").compute)  # the same histogram of another model
    with pytest.raises(AttributeError):
        after.submitted = 0  # type: ignore[misc]

    deadline = time.monotonic() + 10
    while rt.stats()["a"].running_calls and time.monotonic() < deadline:
        time.sleep(0.001)  # the last call ends just after its request completed
    s1, s2 = rt.stats()["a"], rt.stats()["a"]
    assert s1.end_to_end.histogram is not None and s1.batch_size is not None
    assert s1 == s2  # histograms are not part of equality: the figures are
    rt.submit("a", 9).result(10)
    w = rt.stats()["a"].end_to_end.since(s1.end_to_end)
    assert w.count == 1 and w.max_ms > 0
    with pytest.raises(ValueError, match="subtract the earlier snapshot"):
        s1.end_to_end.since(rt.stats()["a"].end_to_end)
    bare = ap.LatencyStats(count=0, mean_ms=0.0, p50_ms=0.0, p90_ms=0.0, p99_ms=0.0, p999_ms=0.0, max_ms=0.0)
    with pytest.raises(ValueError, match="need their histogram"):
        s1.end_to_end.since(bare)


def test_a_name_with_a_newline_or_a_tab_stays_on_its_row(rt: ap.Runtime) -> None:
    # Any non-empty name is a model's name; the tables escape what would break a row.
    rt.add_model("a\nb", model=lambda x: x)
    rt.add_model("tab\there", model=lambda x: x)
    rt.start()
    stats, plan = str(rt.stats()).splitlines(), str(rt.plan()).splitlines()
    assert len(stats) == 4 and len(plan) == 5, (stats, plan)  # header, rule, a row each (the plan: + title)
    for lines in (stats, plan):
        assert any(line.lstrip().startswith("a\\nb ") for line in lines), lines
        assert any(line.lstrip().startswith("tab\\there ") for line in lines), lines
        assert not any("\t" in line for line in lines)
    assert len({len(line) for line in stats}) == 1  # every column aligned
    assert plan[-1].index("shared") == plan[-2].index("shared")
