"""Closing: draining, cancelling, idempotence, context manager, interpreter exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError

import pytest

import apportion as ap


def test_close_drain_finishes_queued_work(gate) -> None:
    rt = ap.Runtime()
    rt.add_model("m", model=gate, instances=1)
    rt.start()
    futs = [rt.submit("m", i) for i in range(10)]
    assert gate.entered.wait(10)
    threading.Timer(0.05, gate.release.set).start()
    rt.close(drain=True)
    assert [f.result(0) for f in futs] == list(range(10))
    assert rt.closed


def test_close_without_drain_cancels_queued_and_waits_for_running(gate) -> None:
    rt = ap.Runtime()
    rt.add_model("m", model=gate)
    rt.start()
    futs = [rt.submit("m", i) for i in range(10)]
    assert gate.entered.wait(10)
    threading.Timer(0.05, gate.release.set).start()
    rt.close(drain=False)
    assert futs[0].result(0) == 0
    for f in futs[1:]:
        assert f.cancelled()
        with pytest.raises(CancelledError):
            f.result(0)
    s = rt.stats()["m"]
    assert (s.completed, s.cancelled, s.in_flight) == (1, 9, 0)


def test_close_is_idempotent_and_refuses_new_work() -> None:
    rt = ap.Runtime()
    rt.add_model("m", model=lambda x: x)
    rt.start()
    rt.close()
    rt.close()
    rt.close(drain=False)
    with pytest.raises(ap.RuntimeClosed, match="runtime is closed"):
        rt.submit("m", 1)
    with pytest.raises(ap.RuntimeClosed):
        rt.submit_many("m", [1])
    with pytest.raises(ap.RuntimeClosed):
        rt.add_model("n", model=print)
    with pytest.raises(ap.RuntimeClosed):
        rt.start()


def test_close_never_started_runtime_cancels_its_queue() -> None:
    rt = ap.Runtime()
    rt.add_model("m", model=lambda x: x)
    f = rt.submit("m", 1)
    rt.close(drain=True)  # no worker ever existed: nothing can drain it
    assert f.cancelled()


def test_context_manager_starts_and_drains() -> None:
    with ap.Runtime() as rt:
        rt.add_model("m", model=lambda x: x * 2)
        futs = rt.submit_many("m", range(100))
    assert rt.closed
    assert [f.result(0) for f in futs] == [2 * i for i in range(100)]


def test_concurrent_close_from_two_threads(gate) -> None:
    rt = ap.Runtime()
    rt.add_model("m", model=gate, instances=2)
    rt.start()
    futs = [rt.submit("m", i) for i in range(20)]
    errors = []

    def closer(drain):
        try:
            rt.close(drain=drain)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=closer, args=(d,)) for d in (True, False)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.release.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert errors == []
    assert all(f.done() for f in futs)


@pytest.mark.parametrize("style", ["blocked-model", "idle", "never-started", "pending-futures"])
def test_interpreter_exit_with_live_runtime_neither_hangs_nor_crashes(style: str) -> None:
    code = textwrap.dedent(f"""
        import time, apportion as ap
        style = {style!r}
        rt = ap.Runtime()
        rt.add_model("slow", model=lambda x: time.sleep(0.2) or x, instances=2)
        if style != "never-started":
            rt.start()
        futs = rt.submit_many("slow", range(50))
        if style == "blocked-model":
            time.sleep(0.05)
        if style == "pending-futures":
            futs[0].add_done_callback(lambda f: None)
        print("exiting", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout
    assert "Fatal" not in proc.stderr and "Traceback" not in proc.stderr


def test_garbage_collected_runtime_stops_its_workers() -> None:
    import gc

    before = threading.active_count()
    names_before = set(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else set()
    rt = ap.Runtime()
    rt.add_model("m", model=lambda x: x, instances=3)
    rt.start()
    assert rt.submit("m", 1).result(10) == 1
    del rt
    gc.collect()
    if names_before:
        assert set(os.listdir("/proc/self/task")) <= names_before | set()
    assert threading.active_count() == before
