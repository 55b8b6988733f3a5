"""Process round trip: a process instance against the stdlib's process tools, one session.

Group ``process round trip (no-op)``: ``Runtime.call`` and ``submit().result()`` on an
``isolation="process"`` model, a thread instance of the same function, and the baselines
multiprocessing.Pipe (a child echoing on a pipe) and ProcessPoolExecutor(1). Group
``process round trip (1 MiB array)``: the same with a 1 MiB float32 numpy array.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import apportion as ap

from ..conftest import micro

np = pytest.importorskip("numpy")  # before bench_process, which imports it

# The process model's factory is imported by name in its child, with this process's sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from bench_process import _pipe_child, echo, echo_factory  # noqa: E402
TENSOR = np.ones(1 << 18, dtype=np.float32)


@pytest.fixture(scope="module")
def rt() -> Iterator[ap.Runtime]:
    runtime = ap.Runtime()
    runtime.add_model("proc", factory="bench_process:echo_factory", isolation="process", max_queue=1024)
    runtime.add_model("thread", factory=echo_factory, max_queue=1024)
    runtime.start()
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def pipe() -> Iterator[Callable[[Any], Any]]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    child = ctx.Process(target=_pipe_child, args=(b,), daemon=True)
    child.start()

    def call(x: Any) -> Any:
        a.send(x)
        return a.recv()

    yield call
    a.send(None)
    child.join(10)


@pytest.fixture(scope="module")
def ppe() -> Iterator[cf.ProcessPoolExecutor]:
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as p:
        p.submit(echo, 0).result()
        yield p


MODES = ["process call()", "process submit", "thread submit", "mp.Pipe", "ProcessPoolExecutor"]


def _caller(mode: str, rt: ap.Runtime, pipe: Callable[[Any], Any], ppe: cf.ProcessPoolExecutor) -> Callable[[Any], Any]:
    return {
        "process call()": lambda x: rt.call("proc", x),
        "process submit": lambda x: rt.submit("proc", x).result(),
        "thread submit": lambda x: rt.submit("thread", x).result(),
        "mp.Pipe": pipe,
        "ProcessPoolExecutor": lambda x: ppe.submit(echo, x).result(),
    }[mode]


@pytest.mark.benchmark(group="process round trip (no-op)")
@pytest.mark.parametrize("mode", MODES)
def test_noop(benchmark: Any, mode: str, rt: ap.Runtime, pipe: Any, ppe: Any) -> None:
    call = _caller(mode, rt, pipe, ppe)
    assert micro(benchmark, lambda: call(1), rounds=10, iterations=100) == 1


@pytest.mark.benchmark(group="process round trip (1 MiB array)")
@pytest.mark.parametrize("mode", MODES)
def test_tensor(benchmark: Any, mode: str, rt: ap.Runtime, pipe: Any, ppe: Any) -> None:
    call = _caller(mode, rt, pipe, ppe)
    out = micro(benchmark, lambda: call(TENSOR), rounds=10, iterations=10)
    assert out.shape == TENSOR.shape
