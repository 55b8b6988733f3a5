"""Request priority levels within a model, and the queue policy on_timeout="reject" | "delay"."""

from __future__ import annotations

import time

import pytest

import apportion as ap


def wait_until(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.001)


def test_strict_priority_order_fifo_within_a_level(rt: ap.Runtime, gate) -> None:
    rt.add_model("m", model=gate, priority_levels=3)
    rt.start()
    first = rt.submit("m", "blocker")
    assert gate.entered.wait(10)
    # Queued behind the blocker at mixed priorities.
    prios = [2, 1, 0, 2, 0, 1, 1, 2, 0]
    futs = [rt.submit("m", (p, i), priority=p) for i, p in enumerate(prios)]
    futs += rt.submit_many("m", [(0, "many-a"), (0, "many-b")], priority=0)
    gate.release.set()
    for f in [first, *futs]:
        f.result(10)
    order = gate.calls[1:]
    assert [p for p, _ in order] == sorted(p for p, _ in order)
    assert order == [(0, 2), (0, 4), (0, 8), (0, "many-a"), (0, "many-b"),
                     (1, 1), (1, 5), (1, 6), (2, 0), (2, 3), (2, 7)]


def test_priority_must_be_below_priority_levels(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: x, priority_levels=2)
    rt.start()
    assert rt.submit("m", 1, priority=1).result(10) == 1
    with pytest.raises(ValueError, match=r"model 'm', field 'priority': must be an int in \[0, 2\)"):
        rt.submit("m", 1, priority=2)
    with pytest.raises(ValueError, match="priority"):
        rt.submit_many("m", [1, 2], priority=5)


def test_max_queue_bounds_every_level_together(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: x, priority_levels=4, max_queue=4)
    futs = [rt.submit("m", i, priority=i) for i in range(4)]  # not started: they stay queued
    with pytest.raises(ap.QueueFull, match="max_queue=4"):
        rt.submit("m", 9, priority=0)
    rt.start()
    assert [f.result(10) for f in futs] == [0, 1, 2, 3]


def test_on_timeout_is_validated(rt: ap.Runtime) -> None:
    with pytest.raises(ap.QuotaError, match=r"model 'm', field 'on_timeout': got 'drop'; give \"reject\" or \"delay\""):
        rt.add_model("m", model=lambda x: x, on_timeout="drop")
    assert rt.models == []


def _expire_behind_blocker(rt: ap.Runtime, gate, on_timeout: str):
    rt.add_model("m", model=gate, priority_levels=2, on_timeout=on_timeout)
    rt.start()
    first = rt.submit("m", "blocker")
    assert gate.entered.wait(10)
    late = rt.submit("m", "late", timeout_ms=5, priority=0)
    low = rt.submit("m", "low", priority=1)
    high = rt.submit("m", "high", priority=0)
    time.sleep(0.03)  # the deadline passes while the only worker is held
    gate.release.set()
    return first, late, low, high


def test_reject_expires_a_request_whose_deadline_passed_in_the_queue(rt: ap.Runtime, gate) -> None:
    first, late, low, high = _expire_behind_blocker(rt, gate, "reject")
    with pytest.raises(ap.DeadlineExceeded, match=r"model 'm': deadline of [\d.]+ ms passed"):
        late.result(10)
    assert (low.result(10), high.result(10)) == ("low", "high")
    assert "late" not in gate.calls
    s = rt.stats()["m"]
    assert (s.expired, s.delayed, s.completed) == (1, 0, 3)


def test_delay_runs_an_expired_request_after_everything_else(rt: ap.Runtime, gate) -> None:
    first, late, low, high = _expire_behind_blocker(rt, gate, "delay")
    assert late.result(10) == "late"  # not failed: it ran, after the others
    assert gate.calls == ["blocker", "high", "low", "late"]
    s = rt.stats()["m"]
    assert (s.expired, s.delayed, s.completed, s.in_flight) == (0, 1, 4, 0)
    assert s.submitted == s.completed


def test_delayed_request_can_still_be_cancelled_once(rt: ap.Runtime, gate) -> None:
    rt.add_model("m", model=gate, on_timeout="delay")
    rt.start()
    rt.submit("m", "blocker")
    assert gate.entered.wait(10)
    late = rt.submit("m", "late", timeout_ms=1)
    calls = []
    late.add_done_callback(calls.append)
    time.sleep(0.01)
    assert late.cancel()
    assert late.cancel()  # already cancelled: still True, completes nothing again
    gate.release.set()
    rt.close(drain=True)
    assert late.cancelled() and len(calls) == 1
    assert "late" not in gate.calls
    s = rt.stats()["m"]
    assert (s.cancelled, s.completed, s.in_flight) == (1, 1, 0)


def test_close_without_drain_cancels_delayed_requests(rt: ap.Runtime, gate) -> None:
    rt.add_model("m", model=gate, on_timeout="delay")
    rt.start()
    rt.submit("m", "blocker")
    assert gate.entered.wait(10)
    late = [rt.submit("m", i, timeout_ms=1) for i in range(5)]
    time.sleep(0.01)
    gate.release.set()
    rt.close(drain=False)
    for f in late:
        assert f.done()
    s = rt.stats()["m"]
    assert s.in_flight == 0 and s.submitted == s.completed + s.cancelled
