"""Live moves (Runtime.apply): a model moves to other CPUs, instances, threads, batching or
admission while it serves, every request completes exactly once, each runs on a CPU of its
model's plan at that moment (checked from inside the model), and a move that fails or is refused
leaves the model where it was."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import apportion as ap
from apportion.errors import ModelNotFound, PlacementError, QuotaError

needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")

_libc = ctypes.CDLL(None, use_errno=True)


class Where:
    """A model factory whose instances record, for every call, when it ran and on which CPUs
    (the calling thread's affinity and the CPU it is on)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: list[tuple[int, frozenset[int], int]] = []
        self.built: list[tuple[int, tuple[int, ...] | None]] = []
        self.fail_on: set[int] = set()

    def __call__(self, ctx: ap.InstanceContext) -> Any:
        with self.lock:
            self.built.append((ctx.instance, ctx.cpus))
        if ctx.cpus is not None and self.fail_on & set(ctx.cpus):
            raise RuntimeError(f"no instance on CPUs {ctx.cpus}")

        def model(x: Any) -> Any:
            seen = (time.monotonic_ns(), frozenset(os.sched_getaffinity(0)), _libc.sched_getcpu())
            with self.lock:  # one entry per request: a batch (a list) holds several
                self.runs.extend([seen] * (len(x) if isinstance(x, list) else 1))
            return x

        return model


def _cpus(rt: ap.Runtime, name: str) -> frozenset[int]:
    return frozenset(c for i in rt.plan()[name].instances for c in i.cpus)


def _closed_loop(rt: ap.Runtime, name: str, clients: int, per_client: int) -> tuple[list[threading.Thread], list]:
    results: list[list[int]] = [[] for _ in range(clients)]

    def client(k: int) -> None:
        for i in range(per_client):
            results[k].append(rt.call(name, k * per_client + i))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return threads, results


@needs_two_cpus
def test_moves_under_closed_loop_load_lose_nothing_and_run_only_on_planned_cpus() -> None:
    where = Where()
    base = ap.ModelSpec("m", factory=where, cores="0", isolation="exclusive", threads=1)
    targets = [
        dataclasses.replace(base, cores="1"),
        dataclasses.replace(base, cores=None, isolation="shared", instances=2),
        dataclasses.replace(base, cores="0", batching=ap.Batching(4, 0.2)),
        dataclasses.replace(base, cores="1", instances=1, max_queue=512),
        base,
    ]
    clients, per_client = 4, 1000
    with ap.Runtime() as rt:
        rt.add(base)
        rt.start()
        # (start, end, CPUs before, CPUs after) of every move.
        moves: list[tuple[int, int, frozenset[int], frozenset[int]]] = []
        threads, results = _closed_loop(rt, "m", clients, per_client)
        k = 0
        while any(t.is_alive() for t in threads) and k < 60:
            before = _cpus(rt, "m")
            t0 = time.monotonic_ns()
            assert rt.apply(targets[k % len(targets)]) == ["m"]
            moves.append((t0, time.monotonic_ns(), before, _cpus(rt, "m")))
            k += 1
        for t in threads:
            t.join(120)
        s = rt.stats()["m"]
    total = clients * per_client
    got = sorted(x for r in results for x in r)
    assert got == list(range(total)), "every request answered exactly once"
    assert s.submitted == s.completed == total
    assert s.moves == len(moves)
    assert len(where.runs) == total, "every request ran exactly once"
    assert moves, "the load outlasted at least one move"
    first = moves[0][2]

    def allowed(t: int) -> frozenset[int]:
        cpus = first
        for t0, t1, before, after in moves:
            if t < t0:
                return cpus
            if t <= t1:
                return before | after  # during the move: old or new instances
            cpus = after
        return cpus

    for t, affinity, cpu in where.runs:
        ok = allowed(t)
        assert affinity <= ok, f"ran with affinity {set(affinity)} while the plan allowed {set(ok)}"
        assert cpu in ok


@needs_two_cpus
def test_a_failed_move_raises_and_keeps_the_old_placement_serving() -> None:
    where = Where()
    where.fail_on = {1}
    with ap.Runtime() as rt:
        rt.add_model("m", factory=where, cores="0", isolation="exclusive")
        rt.start()
        before = rt.plan()
        futs = [rt.submit("m", i) for i in range(200)]
        with pytest.raises(RuntimeError, match=r"no instance on CPUs \(1,\)"):
            rt.apply(ap.ModelSpec("m", factory=where, cores="1", isolation="exclusive"))
        assert rt.plan() == before
        futs += [rt.submit("m", 200 + i) for i in range(200)]
        assert [f.result(30) for f in futs] == list(range(400))
        s = rt.stats()["m"]
        assert s.completed == 400 and s.instances == 1
    assert {a for _, a, _ in where.runs} == {frozenset({0})}
    # The model can still move once the factory builds there.
    where.fail_on = set()


def test_apply_on_a_closed_runtime_is_refused_even_when_nothing_would_change() -> None:
    # A target equal to the current specs returned [] after close(), while any change raised.
    rt = ap.Runtime()
    rt.add_model("a", model=lambda x: x)
    rt.start()
    spec = rt.spec("a")
    rt.close()
    with pytest.raises(ap.RuntimeClosed, match="apply"):
        rt.apply(spec)


@contextlib.contextmanager
def exclusive_a_shared_b() -> Iterator[tuple[ap.Runtime, Where, Where]]:
    """A started runtime with model a exclusive on CPU 0 and model b on the shared pool (the
    other CPU), each built by a Where."""
    a, b = Where(), Where()
    with ap.Runtime() as rt:
        rt.add_model("a", factory=a, cores="0", isolation="exclusive")
        rt.add_model("b", factory=b)
        rt.start()
        yield rt, a, b


@needs_two_cpus
def test_a_move_that_leaves_another_model_no_room_names_the_moving_model() -> None:
    # The planner's error named the model it could not place ('c'), not the one the caller
    # moved: "model 'c', field 'cores': ... 0 free cores left".
    with ap.Runtime() as rt:
        echo = lambda x: x  # noqa: E731 - one callable: a move may not change it
        rt.add_model("c", model=echo, cores=1, isolation="exclusive")
        rt.add_model("a", model=echo)
        rt.start()
        before = rt.plan()
        with pytest.raises(PlacementError) as err:
            rt.apply(ap.ModelSpec("a", model=echo, cores="0-1", isolation="exclusive"))
        assert str(err.value).startswith("apply(): the new settings of 'a' leave no room for model 'c': ")
        assert (err.value.model, err.value.displaced) == ("a", "c")  # type: ignore[attr-defined]
        assert rt.plan() == before and rt.call("a", 1) == 1 and rt.call("c", 2) == 2


@needs_two_cpus
def test_a_model_that_cannot_move_back_is_shown_where_it_serves() -> None:
    # The plan was placed afresh from the specs: it showed the shared model on the CPU the
    # stuck one had left, where none of its instances ran.
    with exclusive_a_shared_b() as (rt, a, b):
        before = rt.plan()
        a.fail_on = b.fail_on = {0}  # a moves to CPU 1, b fails on CPU 0, a cannot go back to 0
        with pytest.raises(RuntimeError, match=r"no instance on CPUs \(0,\)") as err:
            rt.apply([ap.ModelSpec("a", factory=a, cores="1", isolation="exclusive")])
        notes = getattr(err.value, "__notes__", [])
        assert any("model 'a' could not be moved back" in n and "serves as moved" in n for n in notes), notes
        now = rt.plan()
        assert now["a"].cpus == (1,) and [i.cpus for i in now["a"].instances] == [(1,)]
        assert now["b"] == before["b"] and now.shared_pool == before.shared_pool
        assert rt.spec("a").cores == "1"
        assert rt.call("a", 1) == 1 and rt.call("b", 2) == 2
        assert a.runs[-1][1] == frozenset(now["a"].cpus)
        assert b.runs[-1][1] == frozenset(c for i in now["b"].instances for c in i.cpus)
        # The next apply starts from where the models are: a moves back once it can.
        a.fail_on = set()
        assert rt.apply([ap.ModelSpec("a", factory=a, cores="0", isolation="exclusive")]) == ["a"]
        assert rt.plan() == before
        assert rt.call("a", 3) == 3 and a.runs[-1][1] == frozenset({0})


@needs_two_cpus
def test_a_failed_move_moves_back_the_models_moved_before_it() -> None:
    with exclusive_a_shared_b() as (rt, a, b):
        before = rt.plan()
        b.fail_on = {0}
        with pytest.raises(RuntimeError) as err:
            # a moves to CPU 1 first (a before b: neither gives up CPUs), then b, displaced to
            # CPU 0, fails to build there.
            rt.apply([ap.ModelSpec("a", factory=a, cores="1", isolation="exclusive")])
        assert any("moved back" in n for n in getattr(err.value, "__notes__", []))
        assert rt.plan() == before
        assert rt.call("a", 1) == 1 and rt.call("b", 2) == 2
    assert a.runs[-1][1] == frozenset({0}) and b.runs[-1][1] == frozenset({1})


@needs_two_cpus
def test_models_the_new_plan_displaces_move_too() -> None:
    a, b = Where(), Where()
    with ap.Runtime() as rt:
        rt.add_model("a", factory=a, cores="0", isolation="exclusive")
        rt.add_model("b", factory=b)
        rt.start()
        moved = rt.apply(ap.ModelSpec("a", factory=a, cores="1", isolation="exclusive"))
        assert sorted(moved) == ["a", "b"]
        assert _cpus(rt, "a") == {1} and _cpus(rt, "b") == {0}
        assert rt.call("a", 1) == 1 and rt.call("b", 2) == 2
        # Nothing changes: nothing moves.
        assert rt.apply(ap.ModelSpec("a", factory=a, cores="1", isolation="exclusive")) == []
    assert a.runs[-1][1] == frozenset({1}) and b.runs[-1][1] == frozenset({0})


def test_invalid_targets_fail_before_anything_moves() -> None:
    where = Where()
    with ap.Runtime() as rt:
        rt.add_model("m", factory=where, max_queue=64, timeout_ms=100)
        rt.start()
        built = len(where.built)
        base = ap.ModelSpec("m", factory=where, max_queue=64, timeout_ms=100)
        with pytest.raises(ModelNotFound, match="'nope'"):
            rt.apply(dataclasses.replace(base, name="nope"))
        for change, fld in (({"factory": Where()}, "factory"), ({"max_queue": 65}, "max_queue"),
                            ({"timeout_ms": 50}, "timeout_ms"), ({"priority_levels": 2}, "priority_levels"),
                            ({"on_timeout": "delay"}, "on_timeout"), ({"admission": "deadline"}, "admission")):
            with pytest.raises(QuotaError) as err:
                rt.apply(dataclasses.replace(base, **change))
            assert err.value.model == "m" and err.value.field == fld
        with pytest.raises((PlacementError, QuotaError), match="'m'"):
            rt.apply(dataclasses.replace(base, cores=64, isolation="exclusive"))
        with pytest.raises(QuotaError, match="more than once"):
            rt.apply([base, base])
        with pytest.raises(QuotaError, match="ModelSpec"):
            rt.apply(["m"])
        with pytest.raises(QuotaError, match="key 'other' names another model than its spec") as err:
            rt.apply({"other": dataclasses.replace(base, instances=2)})
        assert (err.value.model, err.value.field) == ("m", "name")
        assert len(where.built) == built
        assert rt.call("m", 3) == 3


def test_process_models_are_not_moved_live() -> None:
    with ap.Runtime() as rt:
        rt.add_model("p", factory="tests.python.process_models:echo", isolation="process")
        with pytest.raises(QuotaError) as err:
            rt.apply(ap.ModelSpec("p", factory="tests.python.process_models:echo", isolation="process",
                                  instances=2))
        assert err.value.field == "isolation"


def test_a_move_switches_batching_and_warms_every_batch_size() -> None:
    sizes: list[int] = []
    lock = threading.Lock()

    def factory(ctx: ap.InstanceContext) -> Any:
        def model(x: Any) -> Any:
            if isinstance(x, list):
                with lock:
                    sizes.append(len(x))
                return [v * 10 for v in x]
            return x * 10

        return model

    with ap.Runtime() as rt:
        rt.add_model("m", factory=factory, warmup=(1,))
        rt.start()
        assert rt.call("m", 1) == 10
        assert rt.apply(ap.ModelSpec("m", factory=factory, warmup=(1,), batching=ap.Batching(4, 1.0))) == ["m"]
        assert sorted(set(sizes)) == [1, 2, 4], "the new instance was warmed at each size before serving"
        warmed = len(sizes)
        futs = rt.submit_many("m", list(range(8)))
        assert [f.result(30) for f in futs] == [v * 10 for v in range(8)]
        assert len(sizes) > warmed
        rt.apply(ap.ModelSpec("m", factory=factory, warmup=(1,)))
        assert rt.call("m", 2) == 20
        s = rt.stats()["m"]
        assert s.completed == 10


def test_a_new_admission_bound_alone_takes_effect_at_once_without_new_instances(gate: Any) -> None:
    built: list[int] = []

    def factory(ctx: ap.InstanceContext) -> Any:
        built.append(threading.get_ident())
        return gate

    with ap.Runtime() as rt:
        rt.add_model("m", factory=factory, max_queue=8)
        assert rt.apply(ap.ModelSpec("m", factory=factory, max_queue=2)) == ["m"]  # before start
        rt.start()
        assert rt.stats()["m"].max_queue == 2 and rt.spec("m").max_queue == 2 and len(built) == 1
        held = rt.submit("m", 0)
        assert gate.entered.wait(10)
        queued = [rt.submit("m", 1), rt.submit("m", 2)]
        with pytest.raises(ap.QueueFull, match="max_queue=2"):
            rt.submit("m", 3)
        # Raised while its instance is inside a call: at once, and the same instance serves on.
        assert rt.apply(ap.ModelSpec("m", factory=factory, max_queue=8)) == ["m"]
        assert rt.stats()["m"].max_queue == 8 and rt.queue_size("m") == 8
        queued += [rt.submit("m", i) for i in range(3, 9)]
        # Lowered below what is queued: nothing queued is dropped, new requests are refused.
        assert rt.apply(ap.ModelSpec("m", factory=factory, max_queue=1)) == ["m"]
        with pytest.raises(ap.QueueFull, match="max_queue=1"):
            rt.submit("m", 9)
        gate.release.set()
        assert [f.result(10) for f in [held, *queued]] == list(range(9))
        assert rt.submit("m", 10).result(10) == 10  # drained: admitted again
        assert len(built) == 1, "a new bound alone must not start new instances"
        s = rt.stats()["m"]
        assert (s.completed, s.rejected) == (10, 2)
        # Never beyond the queue the model was added with; nothing changes then.
        with pytest.raises(QuotaError, match="max_queue=9 is above 8") as e:
            rt.apply(ap.ModelSpec("m", factory=factory, max_queue=9))
        assert e.value.model == "m" and e.value.field == "max_queue"
        assert rt.stats()["m"].max_queue == 1 and rt.spec("m").max_queue == 1
        with pytest.raises(ModelNotFound, match="no model named 'x'"):
            rt.queue_size("x")


def test_apply_before_start_changes_what_starts() -> None:
    where = Where()
    rt = ap.Runtime()
    try:
        rt.add_model("m", factory=where)
        assert rt.apply(ap.ModelSpec("m", factory=where, instances=2)) == ["m"]
        assert where.built == []
        rt.start()
        assert sorted(i for i, _ in where.built) == [0, 1]
        assert rt.stats()["m"].instances == 2
        assert rt.call("m", 5) == 5
    finally:
        rt.close()


def test_apply_takes_a_config() -> None:
    where = Where()
    from apportion.config import ModelConfig

    cfg = ap.Config(models={"m": ModelConfig(spec=ap.ModelSpec("m", factory=where, instances=2))})
    with ap.Runtime() as rt:
        rt.add_model("m", factory=where)
        rt.start()
        assert rt.apply(cfg) == ["m"]
        assert rt.stats()["m"].instances == 2


def test_apply_on_a_closed_runtime_raises_runtime_closed() -> None:
    def echo(x: Any) -> Any:
        return x

    rt = ap.Runtime()
    rt.add_model("m", model=echo)
    rt.start()
    rt.close()
    with pytest.raises(ap.RuntimeClosed, match="cannot move model 'm'"):
        rt.apply(ap.ModelSpec("m", model=echo, instances=2))


def test_models_that_give_up_cpus_move_before_those_that_take_them() -> None:
    # On the 2-socket fixture (not started: its CPUs may not exist here) the order is the plan's.
    from pathlib import Path

    server = str(Path(__file__).resolve().parents[1] / "fixtures" / "topology" / "server_2s128t")
    rt = ap.Runtime(topology_root=server)
    try:
        def echo(x: Any) -> Any:
            return x

        rt.add_model("a", model=echo, cores=2, isolation="exclusive")
        rt.add_model("z", model=echo, cores=6, isolation="exclusive")
        moved = rt.apply([ap.ModelSpec("a", model=echo, cores=6, isolation="exclusive"),
                          ap.ModelSpec("z", model=echo, cores=2, isolation="exclusive")])
        assert moved == ["z", "a"], "z gives up four cores before a takes them"
        assert len(_cpus(rt, "a")) == 6 and len(_cpus(rt, "z")) == 2
        assert rt.spec("a").cores == 6 and rt.spec("z").cores == 2
    finally:
        rt.close(drain=False)


def test_an_apply_that_close_stopped_raises_runtime_closed() -> None:
    # close() stops a move's new instances (its warm-up here): the apply returned as if the
    # move were made, and counted it.
    def slow_warmup() -> int:
        time.sleep(0.6)
        return 1

    rt = ap.Runtime()
    rt.add_model("m", model=lambda x: x)
    rt.start()
    outcome: list[Any] = []

    def mover() -> None:
        try:
            outcome.append(rt.apply(ap.ModelSpec("m", model=rt.spec("m").model, instances=2, warmup=slow_warmup)))
        except ap.ApportionError as e:
            outcome.append(e)

    t = threading.Thread(target=mover)
    t.start()
    time.sleep(0.2)
    rt.close()
    t.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ap.RuntimeClosed), outcome
    assert "runtime was closed while 'm' moved" in str(outcome[0])
    # The record and the plan agree on the move (the spec was the new one, the plan the old:
    # the next add_model() placed against the old plan and blamed the running model).
    planned = next(p for p in rt.plan().models if p.name == "m")
    assert rt.spec("m").instances == 2 == len(planned.instances)
    # What stops a model added now is the close, whatever else it would meet.
    for name in ("c", "m"):
        with pytest.raises(ap.RuntimeClosed, match=f"runtime is closed: cannot add model '{name}'"):
            rt.add_model(name, model=abs)


@needs_two_cpus
def test_a_new_admission_bound_alone_is_no_move_for_process_or_burst_models(monkeypatch: pytest.MonkeyPatch) -> None:
    # Such models cannot have new instances while they serve, but a bound needs none: it was
    # refused as a move all the same.
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # the child imports process_models
    rt = ap.Runtime(shared_pool="scheduled")
    try:
        rt.add_model("p", factory="process_models:echo", isolation="process", max_queue=100)
        rt.add_model("b", model=lambda x: x, cores=1, isolation="exclusive", burst=1, max_queue=100)
        rt.start()
        assert rt.apply(dataclasses.replace(rt.spec("p"), max_queue=10)) == ["p"]
        assert rt.apply(dataclasses.replace(rt.spec("b"), max_queue=10)) == ["b"]
        assert rt.spec("p").max_queue == 10 and rt.spec("b").max_queue == 10
        assert rt.stats()["p"].moves == 0 and rt.call("p", 3) == 3 and rt.call("b", 4) == 4
        with pytest.raises(QuotaError, match="model 'b', field 'burst': models with burst instances cannot move"):
            rt.apply(dataclasses.replace(rt.spec("b"), batching=ap.Batching(1, 1.0)))
        with pytest.raises(QuotaError, match="model 'p', field 'isolation': process instances cannot move"):
            rt.apply(dataclasses.replace(rt.spec("p"), instances=2))
        # GPU models cannot be added to a serving runtime either: the advice is not "add it again".
        with pytest.raises(QuotaError, match="model 'b', field 'gpu': GPU models cannot move while they serve: GPU "
                                             "models are partitioned together at start"):
            rt.apply(dataclasses.replace(rt.spec("b"), gpu=ap.GPU()))
    finally:
        rt.close()


def test_a_process_models_factory_as_a_function_or_its_path_is_the_same_factory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Added with the function and applied with its "module:function" (a plan read from a file),
    # or the other way round: refused as "factory cannot change", while a thread model took it.
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # the child imports process_models
    import process_models

    rt = ap.Runtime()
    try:
        rt.add_model("p1", factory=process_models.echo, isolation="process", max_queue=64)
        rt.add_model("p2", factory="process_models:echo", isolation="process", max_queue=64)
        rt.start()
        assert rt.apply(dataclasses.replace(rt.spec("p1"), factory="process_models:echo", max_queue=32)) == ["p1"]
        assert rt.apply(dataclasses.replace(rt.spec("p2"), factory=process_models.echo, max_queue=32)) == ["p2"]
        assert (rt.spec("p1").max_queue, rt.spec("p2").max_queue) == (32, 32)
        assert rt.call("p1", 5) == 5 and rt.call("p2", 6) == 6
        with pytest.raises(QuotaError, match="model 'p1', field 'factory': cannot change while the model is "
                                             "registered"):
            rt.apply(dataclasses.replace(rt.spec("p1"), factory="process_models:info"))
    finally:
        rt.close()
