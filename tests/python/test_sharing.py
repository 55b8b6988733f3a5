"""The scheduled shared pool: weights, priority classes, work conservation, burst, validation.

The pool's capacity is one unit per shared-pool CPU; a call of a shared model holds as many
units as its instance has intra-op threads. These tests pin the runtime to CPUs that exist on
any machine (CPU 0, or the first two) and count work, never time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

import apportion as ap

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs in this process's affinity")


def make_runtime(n_cpus: int, shared_pool: str = "scheduled") -> ap.Runtime:
    return ap.Runtime(cpus=CPUS[:n_cpus], shared_pool=shared_pool)


@needs_two
@pytest.mark.parametrize("threads", [1, 2])
def test_backlogged_models_share_the_pool_by_weight(threads: int, tally) -> None:
    # Same work per call (a sleep, so the calls do not compete for CPU): the shares are counts.
    # threads=2 makes every call hold both units, so the shares come from the grant order
    # alone; threads=1 lets two calls run at once.
    def work(x):
        time.sleep(0.002)
        return x

    rt = make_runtime(2)
    rt.add_model("heavy", model=work, instances=3, threads=threads, weight=3.0, max_queue=4096)
    rt.add_model("light", model=work, instances=3, threads=threads, weight=1.0, max_queue=4096)
    n = 700
    # Both backlogged before the first call; the first completions (models start one after
    # the other) are left out of the count. Everything counted completes before close().
    for i in range(n):
        tally.watch(rt.submit("heavy", i), "heavy")
        tally.watch(rt.submit("light", i), "light")
    rt.start()
    deadline = time.monotonic() + 120
    while len(tally.order) < 480 and time.monotonic() < deadline:
        time.sleep(0.01)
    rt.close(drain=False)
    with tally.lock:
        window = Counter(tally.order[80:480])
    assert sum(window.values()) == 400
    ratio = window["heavy"] / window["light"]
    assert 2.4 <= ratio <= 3.6, window  # 3 by weight (1 without): 20% for a worker kept off its CPU
    stats = rt.stats()
    assert stats["heavy"].pool_calls > 0 and stats["light"].pool_calls > 0
    assert stats["heavy"].pool_time_s > stats["light"].pool_time_s > 0


def _blocked_pool(rt: ap.Runtime, order: list[str], release: threading.Event):
    def model(tag: str):
        def call(x):
            order.append(tag)
            if x == "block":
                release.wait(30)
            return x

        return call

    return model


def test_a_higher_priority_class_is_served_before_a_backlogged_lower_one() -> None:
    rt = make_runtime(1)  # one pool CPU: one call at a time
    order: list[str] = []
    release = threading.Event()
    model = _blocked_pool(rt, order, release)
    rt.add_model("batch", model=model("batch"), instances=2, weight=50.0, priority_class=0)
    rt.add_model("critical", model=model("critical"), instances=2, priority_class=1)
    rt.start()
    try:
        blocker = rt.submit("batch", "block")
        while order != ["batch"]:
            time.sleep(0.001)
        lows = rt.submit_many("batch", range(6))
        time.sleep(0.2)  # the batch model's other worker now waits for the pool, first in line
        highs = rt.submit_many("critical", range(4))
        time.sleep(0.2)
        release.set()
        for f in [blocker, *lows, *highs]:
            f.result(timeout=30)
        # After the blocking call: every critical call before any further batch call.
        assert order == ["batch"] + ["critical"] * 4 + ["batch"] * 6
    finally:
        release.set()
        rt.close()


def test_a_class_changed_live_orders_the_waiting_calls_and_starts_no_instance() -> None:
    # As above, then the backlogged batch model is raised above critical while both wait for
    # the pool: its calls go first, on the instances it had.
    rt = make_runtime(1)
    order: list[str] = []
    release = threading.Event()
    model = _blocked_pool(rt, order, release)
    built: list[str] = []

    def factory(tag: str):
        def make(ctx: ap.InstanceContext):
            built.append(tag)
            return model(tag)

        return make

    rt.add_model("batch", factory=factory("batch"), instances=2, priority_class=0)
    rt.add_model("critical", factory=factory("critical"), instances=2, priority_class=1)
    rt.start()
    try:
        blocker = rt.submit("batch", "block")
        while order != ["batch"]:
            time.sleep(0.001)
        lows = rt.submit_many("batch", range(6))
        highs = rt.submit_many("critical", range(4))
        time.sleep(0.2)  # both models' free workers now wait for the pool
        spec = rt.spec("batch")
        assert rt.apply(ap.ModelSpec("batch", factory=spec.factory, instances=2, priority_class=2)) == ["batch"]
        assert rt.spec("batch").priority_class == 2 and rt._priority_class("batch") == 2
        release.set()
        for f in [blocker, *lows, *highs]:
            f.result(timeout=30)
        assert order == ["batch"] * 7 + ["critical"] * 4
        assert sorted(built) == ["batch", "batch", "critical", "critical"]  # no instance started
        # Lowered again in the same apply as an instance more.
        assert rt.apply(ap.ModelSpec("batch", factory=spec.factory, instances=3)) == ["batch"]
        assert rt.spec("batch").priority_class is None and built.count("batch") == 5
        assert rt._priority_class("batch") == 0 and rt._priority_class("critical") == 1
    finally:
        release.set()
        rt.close()


def test_a_move_that_fails_sets_back_the_class_it_lowered() -> None:
    # "m" is lowered from class 2 to 0 before its move to two instances; the second instance
    # fails to start: the move is undone, and so is the class, on the engine as in the record.
    def factory(ctx: ap.InstanceContext):
        if ctx.instance >= 1:
            raise RuntimeError("no second instance here")
        return lambda x: x

    with make_runtime(1) as rt:
        rt.add_model("m", factory=factory, priority_class=2)
        rt.add_model("other", model=lambda x: x, priority_class=1)
        rt.start()
        with pytest.raises(RuntimeError, match="no second instance here"):
            rt.apply([ap.ModelSpec("m", factory=factory, instances=2, priority_class=0),
                      ap.ModelSpec("other", model=rt.spec("other").model, priority_class=3)])
        assert rt._priority_class("m") == 2 and rt.spec("m").priority_class == 2
        assert rt._priority_class("other") == 1 and rt.spec("other").priority_class == 1  # never raised
        assert rt.spec("m").instances == 1 and rt.call("m", 4) == 4
        with pytest.raises(ap.ModelNotFound):
            rt._priority_class("nope")


def test_a_class_cannot_change_live_off_the_scheduled_pool_or_beside_a_reservation() -> None:
    with ap.Runtime(cpus=CPUS[:1], shared_pool="scheduled", pool_reserve={1: 1}) as rt:
        rt.add_model("m", model=lambda x: x, priority_class=0)
        with pytest.raises(ap.QuotaError, match="pool_reserve") as err:
            rt.apply(ap.ModelSpec("m", model=rt.spec("m").model, priority_class=1))
        assert (err.value.model, err.value.field) == ("m", "priority_class")
        assert rt.spec("m").priority_class == 0
    with ap.Runtime(cpus=CPUS[:1], shared_pool="os") as rt:
        rt.add_model("m", model=lambda x: x)
        with pytest.raises(ap.QuotaError, match="scheduled shared pool") as err:
            rt.apply(ap.ModelSpec("m", model=rt.spec("m").model, priority_class=1))
        assert (err.value.model, err.value.field) == ("m", "priority_class")
        assert rt._priority_class("m") is None  # it draws on no scheduled pool
    # A process model without cores draws on the scheduled pool (its calls hold units): it is
    # never moved, but its class changes in place like its admission bound.
    with make_runtime(1) as rt:
        rt.add_model("p", factory="tests.python.process_models:echo", isolation="process", priority_class=1)
        assert rt.apply(ap.ModelSpec("p", factory="tests.python.process_models:echo", isolation="process",
                                     priority_class=2)) == ["p"]
        assert rt._priority_class("p") == 2 and rt.spec("p").priority_class == 2


def test_removing_a_model_without_drain_does_not_wait_for_the_pool() -> None:
    # The lower class's worker waits in the pool's line behind a higher class's call; removing
    # its model without drain cancels its queue at once instead of waiting for that call (with
    # a higher class that keeps the pool busy, it waited as long as the load lasted).
    rt = make_runtime(1)  # one pool CPU: one call at a time
    entered, release = threading.Event(), threading.Event()

    def blocking(x: object) -> object:
        entered.set()
        assert release.wait(30)
        return x

    rt.add_model("hi", model=blocking, priority_class=1)
    rt.add_model("lo", model=lambda x: x, instances=2)
    rt.start()
    try:
        held = rt.submit("hi", "holds the pool")
        assert entered.wait(10)
        lows = rt.submit_many("lo", range(8))
        time.sleep(0.1)  # lo's workers are in the pool's line now
        remover = threading.Thread(target=rt.remove_model, args=("lo",), kwargs={"drain": False})
        remover.start()
        remover.join(10)
        assert not remover.is_alive(), "remove_model(drain=False) waited for another model's call"
        assert all(f.cancelled() for f in lows)
        assert rt.models == ["hi"]
        release.set()
        assert held.result(10) == "holds the pool"
    finally:
        release.set()
        rt.close()


@needs_two
def test_an_idle_models_share_goes_to_the_busy_one() -> None:
    # "light" has weight 1 against an idle weight-100 model: it still gets both units (its two
    # calls meet at a barrier only if they run at the same time).
    barrier = threading.Barrier(2, timeout=20)

    def meet(x):
        barrier.wait()
        return x

    rt = make_runtime(2)
    rt.add_model("idle", model=lambda x: x, instances=2, weight=100.0)
    rt.add_model("light", model=meet, instances=2, threads=1, weight=1.0)
    with rt:
        for f in rt.submit_many("light", range(10)):
            assert f.result(timeout=30) in range(10)


@needs_two
def test_scheduled_pool_never_runs_more_threads_than_it_has_cpus() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def call(x):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.005)
        with lock:
            running -= 1
        return x

    rt = make_runtime(2)
    rt.add_model("a", model=call, instances=3, threads=1)
    rt.add_model("b", model=call, instances=3, threads=1)
    with rt:
        futs = rt.submit_many("a", range(60)) + rt.submit_many("b", range(60))
        for f in futs:
            f.result(timeout=30)
    assert peak == 2


@needs_two
def test_os_shared_pool_runs_every_worker_at_once() -> None:
    # shared_pool="os": no capacity: three instances on two CPUs all run (they meet).
    barrier = threading.Barrier(3, timeout=20)

    def meet(x):
        barrier.wait()
        return x

    rt = make_runtime(2, shared_pool="os")
    rt.add_model("m", model=meet, instances=3, threads=1)
    with rt:
        for f in rt.submit_many("m", range(9)):
            f.result(timeout=30)
        assert rt.stats()["m"].pool_calls == 0


@needs_two
def test_burst_instances_serve_on_the_pool_while_own_instances_are_busy() -> None:
    release = threading.Event()
    seen: dict[int, tuple[bool, tuple[int, ...] | None]] = {}

    def factory(ctx: ap.InstanceContext):
        seen[ctx.instance] = (ctx.burst, ctx.cpus)

        def call(x):
            if x == "block":
                release.wait(30)
            return (ctx.instance, x)

        return call

    rt = make_runtime(2)
    rt.add_model("guaranteed", factory=factory, cores=1, isolation="exclusive", threads=1,
                 burst=True)
    with rt:
        assert set(seen) == {0, 1}
        own_burst, own_cpus = seen[0]
        burst_burst, burst_cpus = seen[1]
        assert not own_burst and burst_burst
        assert own_cpus is not None and burst_cpus == tuple(rt.plan().shared_pool)
        assert set(own_cpus).isdisjoint(burst_cpus)
        blocker = rt.submit("guaranteed", "block")
        time.sleep(0.05)
        # The own instance is held: the burst instance serves these meanwhile.
        results = [f.result(timeout=30) for f in rt.submit_many("guaranteed", range(5))]
        assert results == [(1, i) for i in range(5)]
        assert not blocker.done()
        release.set()
        assert blocker.result(timeout=30) == (0, "block")
        stats = rt.stats()["guaranteed"]
        assert stats.burst_served == 5
        assert stats.pool_calls == 5


def test_a_lone_callers_requests_never_go_to_the_burst_instance() -> None:
    # Its next request arrived while the own worker that answered the last one was still
    # leaving its call (counted busy): a burst worker took 10-28% of a lone caller's requests,
    # using shared-pool time with no peak at all.
    def factory(ctx: ap.InstanceContext):
        def call(x):
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:
                pass
            return ctx.burst

        return call

    rt = make_runtime(2)
    rt.add_model("guaranteed", factory=factory, cores=1, isolation="exclusive", threads=1, burst=True)
    # A busy loop beside it, as on a busy host: the own worker then leaves its call later (3-23%
    # went to the burst instance: 9-70 of 300; quiet, a few).
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 60\n"
                            "while time.monotonic() < end: pass"])
    try:
        with rt:
            on_burst = sum(rt.submit("guaranteed", i).result(timeout=30) for i in range(600))
            # (A busy host may keep the own worker off its CPU for longer than the burst worker
            # watches: a stray few are not the defect, 18 or more of 600 were.)
            assert on_burst <= 8 and rt.stats()["guaranteed"].burst_served == on_burst
    finally:
        hog.kill()
        hog.wait()


def test_every_request_completes_once_through_the_pool_and_burst_paths(tally) -> None:
    rt = make_runtime(min(2, len(CPUS)))
    rt.add_model("a", model=lambda x: x, instances=2, weight=2.0, priority_levels=2)
    rt.add_model("b", model=lambda xs: list(xs), instances=2, priority_class=1,
                 batching=ap.Batching(max_size=4, max_delay_ms=0.2))
    if len(CPUS) >= 2:
        rt.add_model("c", model=lambda x: x, cores=1, isolation="exclusive", threads=1, burst=2)
    names = rt.models
    rt.start()
    futs = []

    def submitter(k: int) -> None:
        for i in range(600):
            name = names[(i + k) % len(names)]
            try:
                f = rt.submit(name, i, priority=i % 2 if name == "a" else None)
            except (ap.QueueFull, ap.RuntimeClosed):
                continue
            tally.watch(f, name)
            futs.append(f)
            if i % 7 == 0:
                f.cancel()

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    rt.close(drain=False)
    for t in threads:
        t.join()
    for f in futs:  # some were cancelled: check_once() would raise on them
        assert f.done()
        assert tally.done[id(f)] == 1
    for s in rt.stats().values():
        assert s.in_flight == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weight": 0}, "weight"),
        ({"weight": -1.5}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"weight": True}, "weight"),
        ({"weight": "3"}, "weight"),
        ({"priority_class": 1.5}, "priority_class"),
        ({"priority_class": 5000}, "priority_class"),
        ({"priority_class": True}, "priority_class"),
        ({"burst": True}, "burst"),  # a shared model
        ({"burst": -1}, "burst"),
        ({"burst": "yes"}, "burst"),
        ({"cores": 1, "isolation": "exclusive", "weight": 2.0}, "weight"),
        ({"cores": 1, "isolation": "exclusive", "priority_class": 1}, "priority_class"),
    ],
)
def test_invalid_sharing_quotas_name_the_model_and_field(kwargs, field) -> None:
    rt = make_runtime(1)
    with pytest.raises(ap.QuotaError) as e:
        rt.add_model("ranker", model=lambda x: x, **kwargs)
    assert "'ranker'" in str(e.value) and field in str(e.value)
    assert rt.models == []
    rt.close()


@pytest.mark.parametrize("kwargs", [{"weight": 2.0}, {"priority_class": 1},
                                    {"cores": 1, "isolation": "exclusive", "burst": True}])
def test_sharing_quotas_need_the_scheduled_pool(kwargs) -> None:
    rt = make_runtime(1, shared_pool="os")
    with pytest.raises(ap.QuotaError, match="shared_pool='os'"):
        rt.add_model("ranker", model=lambda x: x, **kwargs)
    rt.close()


def test_shared_pool_mode_is_validated_and_defaults_to_os() -> None:
    with pytest.raises(ap.QuotaError, match="shared_pool must be 'scheduled' or 'os'"):
        ap.Runtime(shared_pool="fair")
    rt = ap.Runtime(cpus=CPUS[:1])
    with pytest.raises(ap.QuotaError, match="Runtime\\(shared_pool='scheduled'\\)"):
        rt.add_model("ranker", model=lambda x: x, weight=2.0)
    rt.close()


def test_burst_needs_a_non_empty_shared_pool() -> None:
    rt = make_runtime(1)
    with pytest.raises(ap.PlacementError, match="'ranker', field 'burst'"):
        rt.add_model("ranker", model=lambda x: x, cores=1, isolation="exclusive", burst=True)
    assert rt.models == []
    rt.close()


@needs_two
def test_a_model_added_later_may_not_empty_a_burst_models_pool() -> None:
    # Checked only for the model being added: an exclusive model added after a burst model
    # took the pool's last CPU, and at start the burst instances waited for the pool for good;
    # a drained close (SIGTERM on apportion serve) then never returned.
    rt = make_runtime(2)
    try:
        rt.add_model("b", model=lambda x: x, cores=1, isolation="exclusive", burst=True)
        rt.add_model("x", model=lambda x: x, cores=1, isolation="exclusive")
        with pytest.raises(ap.PlacementError, match="'b', field 'burst': the shared pool is empty"):
            rt.start()
        assert not rt.started
    finally:
        rt.close()


def test_a_move_that_would_empty_a_burst_models_pool_is_refused() -> None:
    # On the 2-socket fixture (not started: its CPUs may not exist here). The move took every
    # pool CPU: the burst instances would wait for the pool for good.
    from pathlib import Path

    server = str(Path(__file__).resolve().parents[1] / "fixtures" / "topology" / "server_2s128t")
    rt = ap.Runtime(topology_root=server, shared_pool="scheduled")
    try:
        rt.add_model("b", model=lambda x: x, cores="0", isolation="exclusive", burst=True)
        rt.add_model("x", model=lambda x: x, cores=2, isolation="exclusive")
        b_cpus = {*rt.plan()["b"].cpus, *rt.plan()["b"].reserved}
        rest = ",".join(str(c) for c in rt.topology.usable if c not in b_cpus)  # b stays where it is
        with pytest.raises(ap.PlacementError, match="'b', field 'burst': the shared pool is empty"):
            rt.apply(ap.ModelSpec("x", model=rt.spec("x").model, cores=rest, isolation="exclusive", smt=True))
        assert rt.spec("x").cores == 2 and rt.plan().shared_pool
    finally:
        rt.close(drain=False)


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_reserved_class_is_served_while_lower_calls_hold_the_whole_pool() -> None:
    # One pool CPU, held by a low-class call that blocks until the test lets it go: without a
    # reservation the critical call waits for it (checked below on a second runtime).
    for reserve, served in (({1: 1}, True), (None, False)):
        rt = ap.Runtime(cpus=CPUS[:1], shared_pool="scheduled", pool_reserve=reserve)
        started, release = threading.Event(), threading.Event()

        def slow(x: object) -> str:
            started.set()
            release.wait(30)
            return "batch"

        rt.add_model("batch", model=slow, priority_class=0)
        rt.add_model("critical", model=lambda x: "critical", priority_class=1)
        rt.start()
        try:
            low = rt.submit("batch", 0)
            assert started.wait(30)
            high = rt.submit("critical", 0)
            if served:
                assert high.result(timeout=30) == "critical"
                assert not low.done()  # served beside the low call, not after it
            else:
                with pytest.raises(TimeoutError):
                    high.result(timeout=0.3)
            release.set()
            assert low.result(timeout=30) == "batch"
            assert high.result(timeout=30) == "critical"
        finally:
            release.set()
            rt.close()


@needs_two
def test_workers_below_a_reserved_class_run_at_a_lower_os_priority() -> None:
    base = _thread_nice()
    rt = ap.Runtime(cpus=CPUS[:2], shared_pool="scheduled", pool_reserve={2: 1}, reserve_nice=7)
    rt.add_model("low", model=lambda x: _thread_nice(), priority_class=0)
    rt.add_model("mid", model=lambda x: _thread_nice(), priority_class=1)
    rt.add_model("high", model=lambda x: _thread_nice(), priority_class=2)
    rt.add_model("top", model=lambda x: _thread_nice(), priority_class=3)
    rt.add_model("own", model=lambda x: _thread_nice(), isolation="exclusive", cores=1)
    rt.start()
    try:
        got = {m: rt.call(m, 0) for m in ("low", "mid", "high", "top", "own")}
    finally:
        rt.close()
    want = min(19, base + 7)
    assert got == {"low": want, "mid": want, "high": base, "top": base, "own": base}
    assert _thread_nice() == base  # the caller's thread is untouched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(pool_reserve={1: 1}), "pool_reserve needs shared_pool='scheduled'"),
        (dict(shared_pool="scheduled", pool_reserve={}), "non-empty"),
        (dict(shared_pool="scheduled", pool_reserve=[(1, 1)]), "non-empty"),
        (dict(shared_pool="scheduled", pool_reserve={"1": 1}), "key '1' is not a priority class"),
        (dict(shared_pool="scheduled", pool_reserve={True: 1}), "not a priority class"),
        (dict(shared_pool="scheduled", pool_reserve={5000: 1}), "key 5000 is not a priority class"),
        (dict(shared_pool="scheduled", pool_reserve={1: 0}), r"pool_reserve\[1\] must be a unit count in \[1, 65536\]"),
        (dict(shared_pool="scheduled", pool_reserve={1: 1.5}), r"pool_reserve\[1\] must be a unit count"),
        (dict(shared_pool="scheduled", pool_reserve={1: 2**32}), r"pool_reserve\[1\] must be a unit count in \[1, 65536\]"),
        (dict(shared_pool="scheduled", pool_reserve={1: 1}, reserve_nice=0), "reserve_nice must be an integer in 1..19"),
        (dict(shared_pool="scheduled", pool_reserve={1: 1}, reserve_nice=20), "reserve_nice"),
        (dict(shared_pool="scheduled", pool_reserve={1: 1}, reserve_nice=2.0), "reserve_nice"),
        (dict(reserve_nice=0), "reserve_nice must be an integer in 1..19"),  # without a reservation too
        (dict(reserve_nice="5"), "reserve_nice must be an integer in 1..19"),
    ],
)
def test_invalid_pool_reservations_are_refused(kwargs, message) -> None:
    with pytest.raises(ap.QuotaError, match=message):
        ap.Runtime(**kwargs)
