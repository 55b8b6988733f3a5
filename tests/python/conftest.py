from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import apportion as ap

# Ray reads it when imported (test modules import ray at collection): with it off, a local Ray
# cluster's nodes bind and talk on 127.0.0.1 only, never on the machine's outside address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture
def rt() -> Iterator[ap.Runtime]:
    runtime = ap.Runtime()
    try:
        yield runtime
    finally:
        runtime.close(drain=False)


class Gate:
    """A model that blocks until released: makes 'running' and 'queued' states deterministic."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[object] = []
        self._lock = threading.Lock()

    def __call__(self, x: object) -> object:
        with self._lock:
            self.calls.append(x)
        self.entered.set()
        assert self.release.wait(30), "gate never released"
        return x


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()


class Tally:
    """Counts done-callbacks per future (every request must complete exactly once) and keeps
    the order in which tagged futures completed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: Counter[int] = Counter()
        self.order: list[Any] = []

    def watch(self, fut: ap.Future, tag: Any = None) -> ap.Future:
        key = id(fut)

        def cb(f: ap.Future) -> None:
            with self.lock:
                self.done[key] += 1
                if tag is not None:
                    self.order.append(tag)

        fut.add_done_callback(cb)
        return fut

    def check_once(self, futs: list[ap.Future], timeout: float = 60.0) -> None:
        for f in futs:
            f.exception(timeout=timeout)  # completed
        with self.lock:
            assert [self.done[id(f)] for f in futs] == [1] * len(futs)


@pytest.fixture
def tally() -> Tally:
    return Tally()


def _children() -> set[int]:
    """Live (or zombie) children of this process, from /proc."""
    me, kids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        if int(stat[stat.rindex(")") + 2:].split()[1]) == me:
            kids.add(int(entry))
    return kids


@pytest.fixture
def child_pids() -> Callable[[], set[int]]:
    """A function that lists this process's live (or zombie) children."""
    return _children


def _kill(pids: set[int]) -> None:
    """Kills and reaps ``pids`` (children of this process)."""
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


class LocalRay:
    """A Ray cluster of a head and two worker nodes on this machine, all on 127.0.0.1, each with
    its own CPU count and CPU set (the node label apportion reads): head 1 CPU ("0"), workers
    2 CPUs ("0-1") each. ``cluster`` is the ray.cluster_utils.Cluster; ``workers`` maps node
    id to its node handle (what ``remove_node`` takes)."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        from apportion.ray.cluster import CPU_SET_LABEL

        store = 80 * 2**20
        head = {"num_cpus": 1, "labels": {CPU_SET_LABEL: "0"}, "object_store_memory": store,
                "include_dashboard": False}
        # Ray gives its head node 30 s to register with its GCS; on a loaded 2-CPU machine that
        # occasionally runs out (twice in a row once, beside another test run). The timed-out
        # attempt's processes are ours to stop (Ray keeps no handle to them), then another
        # attempt, three in all.
        for attempt in range(3):
            before = _children()
            try:
                self.cluster = Cluster(initialize_head=True, head_node_args=head)
                break
            except Exception as e:
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
                _kill(_children() - before)
        self.workers = {}
        try:
            for _ in range(2):
                node = self.cluster.add_node(num_cpus=2, labels={CPU_SET_LABEL: "0-1"}, object_store_memory=store)
                self.workers[node.node_id] = node
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address)
        except BaseException:
            self.close()
            raise
        self.head = ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[LocalRay]:
    """One local Ray cluster per test module (see LocalRay). Skips when ray cannot be imported."""
    pytest.importorskip("ray", reason="ray is not installed: pip install 'apportion[ray]'")
    import sys
    from pathlib import Path

    import tempfile

    here = str(Path(__file__).resolve().parent)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "APPORTION_TEST_REFUSE_FLAG")}
    # The node processes inherit it and import the test models (ray_models) from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved["PYTHONPATH"]) if p)
    # Set before any node starts, so every node's workers see it (a test that set it later
    # reached only the nodes started after it): a test creates the file to make
    # ray_models.refuses_once_flagged refuse.
    flags = tempfile.TemporaryDirectory(prefix="apportion-ray-flags-")
    os.environ["APPORTION_TEST_REFUSE_FLAG"] = os.path.join(flags.name, "refuse")
    sys.path.insert(0, here)
    local = LocalRay()
    try:
        yield local
    finally:
        local.close()
        flags.cleanup()
        sys.path.remove(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
