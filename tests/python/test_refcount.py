"""Inputs are released when a request completes; outputs when the future is dropped."""

from __future__ import annotations

import gc
import sys
import weakref

import apportion as ap


class Payload:
    pass


def test_inputs_released_at_completion_outputs_with_the_future(rt: ap.Runtime) -> None:
    outputs: list[weakref.ref] = []

    def model(x):
        out = Payload()
        outputs.append(weakref.ref(out))
        return out

    rt.add_model("m", model=model)
    rt.start()
    inp = Payload()
    in_ref = weakref.ref(inp)
    fut = rt.submit("m", inp)
    del inp
    result = fut.result(10)
    gc.collect()
    assert in_ref() is None  # the request no longer holds its input once complete
    assert outputs[0]() is result
    del result
    gc.collect()
    assert outputs[0]() is not None  # still owned by the future
    del fut
    gc.collect()
    assert outputs[0]() is None


def test_no_reference_leaks_over_many_requests(rt: ap.Runtime) -> None:
    rt.add_model("ok", model=lambda x: [x])
    rt.add_model("err", model=lambda x: 1 / 0)
    rt.start()
    token = object()
    base = sys.getrefcount(token)
    for _ in range(3):
        futs = rt.submit_many("ok", [token] * 500) + rt.submit_many("err", [token] * 500)
        for f in futs:
            f.exception(10)
        del futs, f
    gc.collect()
    assert sys.getrefcount(token) == base


def test_cancelled_and_rejected_requests_release_inputs(rt: ap.Runtime, gate) -> None:
    rt.add_model("m", model=gate, max_queue=2)
    rt.start()
    token = object()
    base = sys.getrefcount(token)
    running = rt.submit("m", None)
    assert gate.entered.wait(10)
    queued = rt.submit("m", token)
    assert sys.getrefcount(token) == base + 1
    queued.cancel()
    assert sys.getrefcount(token) == base
    rt.submit("m", None)
    try:
        rt.submit_many("m", [token, token])
    except ap.QueueFull:
        pass
    assert sys.getrefcount(token) == base
    gate.release.set()
    running.result(10)
