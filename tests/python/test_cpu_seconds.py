"""rt.cpu_seconds(): CPU time per model, its worker threads and the threads they created (a
framework's intra-op pool), and its Prometheus counter."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import apportion as ap

pytestmark = pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"), reason="needs /proc")


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class WithPool:
    """A model that, like a framework, keeps a helper thread it created on its first call and
    burns CPU in it (0.3 s) and in the worker itself (0.2 s) on each call."""

    def __init__(self) -> None:
        self.go, self.done = threading.Event(), threading.Event()
        self.helper: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            self.go.wait()
            self.go.clear()
            burn(0.3)
            self.done.set()

    def __call__(self, x: Any) -> Any:
        if self.helper is None:
            self.helper = threading.Thread(target=self._loop, daemon=True)
            self.helper.start()
        self.go.set()
        burn(0.2)
        assert self.done.wait(30)
        self.done.clear()
        return x


def test_cpu_time_counts_workers_and_the_threads_they_created(rt: ap.Runtime) -> None:
    rt.add_model("busy", model=WithPool())
    rt.add_model("idle", model=lambda x: x)
    rt.start()
    before = rt.cpu_seconds()
    assert set(before) == {"busy", "idle"} and before["busy"] < 0.1
    rt.call("busy", 1)
    first = rt.cpu_seconds()
    assert 0.4 <= first["busy"] - before["busy"] <= 0.8  # 0.2 s in the worker + 0.3 s in its helper
    rt.call("busy", 2)
    rt.call("idle", 3)
    second = rt.cpu_seconds()
    assert 0.4 <= second["busy"] - first["busy"] <= 0.8
    assert second["idle"] < 0.1
    rt.close()
    after = rt.cpu_seconds()
    assert after["busy"] >= second["busy"]  # monotonic: exited workers keep their time


def test_the_prometheus_counter_carries_it() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from apportion.metrics import prometheus_text

    text = prometheus_text({}, cpu_seconds={"a": 1.5, "b": 0.25})
    got = {s.labels["model"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
           if s.name == "apportion_model_cpu_seconds_total"}
    assert got == {"a": 1.5, "b": 0.25}
    assert "apportion_model_cpu_seconds" not in prometheus_text({})


def test_models_whose_thread_names_collide_each_keep_their_workers_time(rt: ap.Runtime) -> None:
    # Both workers are named "ap:a_long_mod:0" (Linux keeps 15 bytes): told apart by tid.
    one, two = "a_long_model_name_one", "a_long_model_name_two"
    rt.add_model(one, model=lambda x: burn(0.3) or x)
    rt.add_model(two, model=lambda x: x)
    rt.start()
    before = rt.cpu_seconds()
    rt.call(one, 1)
    rt.call(two, 2)
    after = rt.cpu_seconds()
    assert 0.25 <= after[one] - before[one] <= 0.6
    assert after[two] - before[two] < 0.1


def test_a_thread_named_like_several_models_workers_counts_for_none() -> None:
    from apportion._private.cputime import CpuTracker

    same, own = b"ap:a_long_mod:0", b"ap:b:0"
    threads = {1: (same, 2.0), 2: (same, 3.0), 3: (same, 1.5), 4: (own, 0.5), 5: (own, 0.25), 6: (b"other", 9.0)}
    tracker = CpuTracker()
    got = tracker.read({"a_long_model_name_one": [1], "a_long_model_name_two": [2], "b": [4]}, threads)
    # 3 was created by one of the colliding workers, which one is unknown; 5 by b's worker.
    assert got == {"a_long_model_name_one": 2.0, "a_long_model_name_two": 3.0, "b": 0.75}
    # Threads seen before keep their model when they exit: b's helper's time stays b's.
    del threads[5]
    assert tracker.read({"a_long_model_name_one": [1], "a_long_model_name_two": [2], "b": [4]}, threads)["b"] == 0.75


def test_a_thread_id_reused_by_another_thread_is_another_thread() -> None:
    # Known by its id alone, a model's helper thread that exited and whose id the kernel gave
    # to another thread between two readings lost its time (the counter went back) and the
    # new thread was billed to the model.
    from apportion._private.cputime import CpuTracker

    tracker = CpuTracker()
    first = {10: (b"ap:x:0", 1.0, 500), 100: (b"ap:x:0", 50.0, 600)}  # the worker and a helper it made
    assert tracker.read({"x": [10]}, first) == {"x": 51.0}
    reused = {10: (b"ap:x:0", 1.1, 500), 100: (b"uvicorn-worker", 0.2, 900)}  # 100 is another thread now
    assert tracker.read({"x": [10]}, reused) == {"x": pytest.approx(51.1)}
    # The same thread renamed (same start time) stays the model's.
    renamed = {10: (b"ap:x:0", 1.2, 500), 100: (b"uvicorn-worker", 0.3, 900), 101: (b"ap:x:0", 0.5, 950)}
    assert tracker.read({"x": [10]}, renamed) == {"x": pytest.approx(51.7)}
    renamed[101] = (b"omp-pool", 0.7, 950)
    assert tracker.read({"x": [10]}, renamed) == {"x": pytest.approx(51.9)}
    # The ids and start times /proc gives, in this process.
    from apportion._private import cputime

    mine = cputime._thread_times()[threading.get_native_id()]
    assert len(mine) == 3 and mine[2] > 0


def test_two_readers_at_once_never_count_an_exited_threads_time_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each reader read /proc outside the lock: an older reading applied after a newer one
    # brought an exited thread back, and the next reading added its time a second time (two
    # Prometheus scrapes at once: the counter kept the doubled value for good).
    from apportion._private import cputime

    alive = {1: (b"ap:m:0", 0.5), 2: (b"ap:m:0", 0.3)}  # the worker and a thread it made
    exited = {1: (b"ap:m:0", 0.6)}  # the helper thread has exited, after 0.3 s
    first_read, release = threading.Event(), threading.Event()

    def thread_times() -> dict[int, tuple[bytes, float]]:
        if threading.current_thread().name == "slow-reader":
            first_read.set()
            release.wait(10)  # holds this (older) reading while the other reader goes on
            return alive
        return exited if first_read.is_set() else alive

    monkeypatch.setattr(cputime, "_thread_times", thread_times)
    tracker = cputime.CpuTracker()
    assert tracker.read({"m": [1]}) == {"m": pytest.approx(0.8)}
    got: dict[str, float] = {}
    slow = threading.Thread(target=lambda: got.update(tracker.read({"m": [1]})), name="slow-reader")
    slow.start()
    assert first_read.wait(10)
    fast = threading.Thread(target=lambda: got.update(fast=tracker.read({"m": [1]})["m"]))
    fast.start()
    time.sleep(0.2)
    release.set()
    slow.join(10)
    fast.join(10)
    assert got["m"] == pytest.approx(0.8) and got["fast"] == pytest.approx(0.9)
    assert tracker.read({"m": [1]}) == {"m": pytest.approx(0.9)}  # 0.6 + 0.3, not 0.6 + 0.3 + 0.3


def test_a_removed_models_thread_that_outlives_it_counts_for_no_model() -> None:
    # A helper thread a factory started outlives the model, named like its workers: a model
    # added again under the name (whose workers get the same names) took its whole time.
    from apportion._private.cputime import CpuTracker

    tracker = CpuTracker()
    before = {10: (b"ap:A:0", 0.1, 500), 11: (b"ap:A:0", 0.4, 510)}  # the worker and its helper
    assert tracker.read({"A": [10]}, before) == {"A": pytest.approx(0.5)}
    tracker.forget("A", threads={11: (b"ap:A:0", 0.4, 510)})  # the worker exited, the helper did not
    again = {11: (b"ap:A:0", 0.6, 510), 20: (b"ap:A:0", 0.05, 900)}  # a new "A" and the old helper
    assert tracker.read({"A": [20]}, again) == {"A": pytest.approx(0.05)}
    # Never read while the model ran: its workers' names, noted before the removal, tell.
    fresh = CpuTracker()
    fresh._comms["B"] = {b"ap:B:0"}  # what note_names() learns from /proc
    fresh.forget("B", threads={31: (b"ap:B:0", 0.4, 510)})
    assert fresh.read({"B": [40]}, {31: (b"ap:B:0", 0.7, 510), 40: (b"ap:B:0", 0.01, 950)}) == {"B": 0.01}


def test_a_model_added_again_starts_from_zero_beside_its_predecessors_helper() -> None:
    burnt = threading.Event()

    def factory(ctx: ap.InstanceContext) -> Any:
        def helper() -> None:
            burn(0.3)
            burnt.set()
            while True:
                time.sleep(1)

        threading.Thread(target=helper, daemon=True).start()
        return lambda x: x

    with ap.Runtime() as rt:
        rt.add_model("A", factory=factory)
        rt.start()
        assert burnt.wait(30)  # not read while it ran: the names are noted at the removal
        rt.remove_model("A")
        rt.add_model("A", model=lambda x: x)
        assert rt.cpu_seconds()["A"] < 0.1  # was 0.3 and more: the old helper's time
