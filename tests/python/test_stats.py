"""Metrics: outcome counters add up; latency histograms; readable table."""

from __future__ import annotations

import time

import apportion as ap


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
