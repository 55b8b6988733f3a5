"""ap.wait and ap.as_completed: concurrent.futures semantics for apportion futures."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

import apportion as ap


def test_wait_all_completed(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: x * 2, instances=2)
    rt.start()
    fs = rt.submit_many("m", range(50))
    done, not_done = ap.wait(fs, timeout=30)
    assert not_done == set() and done == set(fs)
    assert sorted(f.result() for f in done) == [2 * i for i in range(50)]


def test_wait_first_completed_and_timeout(rt: ap.Runtime, gate) -> None:
    rt.add_model("slow", model=gate)
    rt.add_model("fast", model=lambda x: x)
    rt.start()
    blocked = rt.submit("slow", 1)
    quick = rt.submit("fast", 2)
    done, not_done = ap.wait([blocked, quick], timeout=30, return_when=ap.FIRST_COMPLETED)
    assert quick in done and blocked in not_done
    t0 = time.monotonic()
    done, not_done = ap.wait([blocked], timeout=0.05)
    assert done == set() and not_done == {blocked}
    assert time.monotonic() - t0 >= 0.04
    gate.release.set()
    assert blocked.result(30) == 1


def test_wait_first_exception_mixes_with_concurrent_futures(rt: ap.Runtime, gate) -> None:
    def bad(x):
        raise ValueError(x)

    rt.add_model("bad", model=bad)
    rt.add_model("slow", model=gate)
    rt.start()
    hold = threading.Event()
    with cf.ThreadPoolExecutor(1) as pool:
        other = pool.submit(hold.wait, 30)
        blocked = rt.submit("slow", 0)
        failing = rt.submit("bad", 1)
        done, not_done = ap.wait([other, blocked, failing], timeout=30,
                                 return_when=ap.FIRST_EXCEPTION)
        assert failing in done and blocked in not_done and other in not_done
        gate.release.set()
        hold.set()
    with pytest.raises(ValueError, match="return_when must be"):
        ap.wait([failing], return_when="SOMETIMES")


def test_as_completed_yields_in_completion_order_and_times_out(rt: ap.Runtime, gate) -> None:
    rt.add_model("slow", model=gate)
    rt.add_model("fast", model=lambda x: x)
    rt.start()
    blocked = rt.submit("slow", "slow")
    quick = [rt.submit("fast", i) for i in range(5)]
    it = ap.as_completed([blocked, *quick], timeout=30)
    first_five = [next(it) for _ in range(5)]
    assert set(first_five) == set(quick)
    gate.release.set()
    assert next(it) is blocked
    with pytest.raises(StopIteration):
        next(it)

    gate.release.clear()
    stuck = rt.submit("slow", "stuck")
    with pytest.raises(TimeoutError, match="1 \\(of 1\\) futures unfinished"):
        list(ap.as_completed([stuck], timeout=0.05))
    gate.release.set()
    assert stuck.result(30) == "stuck"


def test_result_and_exception_timeouts_are_checked_naming_the_model(rt: ap.Runtime, gate) -> None:
    import math

    import numpy as np

    rt.add_model("slow", model=gate)
    rt.start()
    fut = rt.submit("slow", 1)
    for wait in (fut.result, fut.exception):
        for bad in ("1", [1], True, math.nan, np.float64("nan")):
            with pytest.raises(ap.QuotaError, match=r"model 'slow', field 'timeout': must be a number") as err:
                wait(timeout=bad)
            assert err.value.model == "slow" and err.value.field == "timeout"
        for fine in (0, -1, np.float32(0.001), 0.001):  # any other real number waits at most that long
            with pytest.raises(TimeoutError, match="model 'slow'"):
                wait(timeout=fine)
    assert not fut.done()  # the refusals did not touch the request
    gate.release.set()
    assert fut.result(timeout=10**400) == 1 and fut.exception(timeout=None) is None
