"""Admission by deadline (``admission="deadline"``): a request that would wait past its deadline
behind the queue is refused at submit with QueueFull, and every request still completes
exactly once. Timing-free: the model sleeps, so its measured pace is at least that long."""

from __future__ import annotations

import re
import threading
import time

import pytest

import apportion as ap
from apportion import QueueFull, QuotaError
from apportion.spec import ModelSpec

SLEEP_S = 0.01


class Held:
    """Sleeps SLEEP_S per call; a call on "hold" waits for ``release``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()

    def __call__(self, x):
        if x == "hold":
            self.holding.set()
            assert self.release.wait(30)
        else:
            time.sleep(SLEEP_S)
        return x


def _backlog(rt: ap.Runtime, name: str, n: int = 6) -> None:
    """Runs ``n`` requests submitted at once: a backlog whose completions measure the pace."""
    for f in rt.submit_many(name, list(range(n))):
        f.result(timeout=30)


def _accounted(s) -> bool:
    return s.submitted == s.completed + s.failed + s.rejected + s.expired + s.cancelled + s.in_flight


@pytest.mark.parametrize("admission", ["deadline", "queue"])
def test_a_request_that_would_wait_past_its_deadline_is_refused_at_once(admission: str) -> None:
    model = Held()
    with ap.Runtime() as rt:
        rt.add_model("m", model=model, admission=admission, max_queue=64)
        rt.start()
        _backlog(rt, "m")
        blocker = rt.submit("m", "hold")
        assert model.holding.wait(30)
        ahead = rt.submit_many("m", [1, 2, 3])
        # The held call and three queued ahead at >= 10 ms each, then its own call: 50 ms or
        # more, against a 15 ms deadline.
        if admission == "deadline":
            with pytest.raises(QueueFull, match=r"model 'm': would wait past its deadline.*4 queued or in calls ahead.*then a"):
                rt.submit("m", 4, timeout_ms=15)
            with pytest.raises(QueueFull, match="would wait past its deadline"):
                rt.submit_many("m", [5, 6], timeout_ms=15)
            tight = None
        else:
            tight = rt.submit("m", 4, timeout_ms=15)
        far = rt.submit("m", 7, timeout_ms=60_000)
        unbounded = rt.submit("m", 8)
        model.release.set()
        assert blocker.result(timeout=30) == "hold"
        assert [f.result(timeout=30) for f in ahead] == [1, 2, 3]
        assert far.result(timeout=30) == 7 and unbounded.result(timeout=30) == 8
        if tight is not None:
            with pytest.raises(ap.DeadlineExceeded):
                tight.result(timeout=30)
        s = rt.stats()["m"]
        assert s.rejected == (3 if admission == "deadline" else 0)
        assert s.expired == (0 if admission == "deadline" else 1)
        assert _accounted(s)


def test_an_empty_queue_admits_whatever_the_deadline() -> None:
    model = Held()
    with ap.Runtime() as rt:
        rt.add_model("m", model=model, admission="deadline")
        rt.start()
        _backlog(rt, "m")
        # Nothing queued: admitted, though the deadline is far shorter than one call.
        f = rt.submit("m", 1, timeout_ms=0.001)
        with pytest.raises(ap.DeadlineExceeded):
            f.result(timeout=30)
        assert rt.stats()["m"].rejected == 0


def test_a_burst_becomes_refusals_not_expirations() -> None:
    """A closed burst far beyond what the deadline allows: with admission by deadline nearly all
    of the excess is refused at submit (the first few, before the pace is measured, may still
    expire); with the queue bound alone it is admitted and expires."""
    results = {}
    for admission in ("deadline", "queue"):
        with ap.Runtime() as rt:
            rt.add_model("m", model=Held(), admission=admission, max_queue=256)
            rt.start()
            _backlog(rt, "m")
            futs, refused = [], 0
            for i in range(60):
                try:
                    futs.append(rt.submit("m", i, timeout_ms=50))
                except QueueFull:
                    refused += 1
            outcomes = {"ok": 0, "expired": 0}
            for f in futs:
                try:
                    f.result(timeout=30)
                    outcomes["ok"] += 1
                except ap.DeadlineExceeded:
                    outcomes["expired"] += 1
            s = rt.stats()["m"]
            assert _accounted(s) and s.rejected == refused
            results[admission] = (refused, outcomes)
    deadline_refused, deadline_out = results["deadline"]
    queue_refused, queue_out = results["queue"]
    assert queue_refused == 0 and queue_out["expired"] >= 40  # 50 ms holds at most ~5 of 60 calls
    assert deadline_refused >= 40 and deadline_out["expired"] <= 3


def test_admission_adds_how_late_recent_requests_ran_past_its_estimate() -> None:
    # Calls that stretch after admission (here from 10 ms to 60 ms, as on a host whose CPUs
    # are taken) make requests complete past the estimate they were admitted with; admission
    # then asks that much more room of the next request's deadline, and says so.
    model = Held()
    with ap.Runtime() as rt:
        rt.add_model("m", model=model, admission="deadline", max_queue=64)
        rt.start()
        _backlog(rt, "m")
        blocker = rt.submit("m", "hold")
        assert model.holding.wait(30)
        ahead = rt.submit("m", 1)
        with pytest.raises(QueueFull, match="would wait past its deadline") as quiet:
            rt.submit("m", 2, timeout_ms=5)
        model.release.set()
        assert blocker.result(timeout=30) == "hold" and ahead.result(timeout=30) == 1
        late_ms = float(re.search(r"recent requests ran ([0-9.e+-]+) ms past", str(quiet.value)).group(1))
        assert late_ms < 10

        global SLEEP_S
        SLEEP_S, quick = 0.06, SLEEP_S
        try:
            _backlog(rt, "m", 4)  # admitted expecting ~10 ms calls; each took 60 ms
        finally:
            SLEEP_S = quick
        model.release.clear()
        model.holding.clear()
        blocker = rt.submit("m", "hold")
        assert model.holding.wait(30)
        ahead = rt.submit("m", 1)
        with pytest.raises(QueueFull, match="would wait past its deadline") as busy:
            rt.submit("m", 2, timeout_ms=5)
        late_ms = float(re.search(r"recent requests ran ([0-9.e+-]+) ms past", str(busy.value)).group(1))
        assert late_ms >= 20
        roomy = rt.submit("m", 3, timeout_ms=60_000)
        model.release.set()
        assert [f.result(timeout=30) for f in (blocker, ahead, roomy)] == ["hold", 1, 3]
        s = rt.stats()["m"]
        assert s.rejected == 2 and s.expired == 0 and _accounted(s)


def test_admission_is_validated_and_fixed_while_registered() -> None:
    with pytest.raises(QuotaError) as err:
        ModelSpec("m", model=lambda x: x, admission="wait")
    assert err.value.model == "m" and err.value.field == "admission"
    with pytest.raises(QuotaError, match="priority_levels=1") as err:
        ModelSpec("m", model=lambda x: x, admission="deadline", priority_levels=2)
    assert err.value.field == "admission"
    spec = ModelSpec("m", factory="math:sqrt", admission="deadline")
    assert spec.to_table()["admission"] == "deadline"
    assert ModelSpec.from_table("m", spec.to_table()) == spec
