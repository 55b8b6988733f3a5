"""apportion.ray.Cluster on a real local Ray cluster (a head and two workers on 127.0.0.1): start,
routing, errors, stats per node and in total, and a node removed under load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import apportion as ap

pytest.importorskip("ray", reason="ray is not installed: pip install 'apportion[ray]'")

import ray  # noqa: E402

from apportion.ray import ClusterPlacementError  # noqa: E402
from apportion.ray.cluster import Cluster, ray_nodes  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def specs(**models: dict[str, Any]) -> list[ap.ModelSpec]:
    return [ap.ModelSpec(name, **{"factory": "ray_models:echo", "cores": 1, "isolation": "exclusive", **kw})
            for name, kw in models.items()]


@pytest.fixture(scope="module")
def basic(local_ray: Any) -> Iterator[Cluster]:
    # echo on every node (head first: it has one CPU), where and narrow on the workers.
    c = Cluster(specs(echo={}, where={"factory": "ray_models:where"}, narrow={"max_queue": 2}),
                replicas={"echo": 3})
    try:
        yield c
    finally:
        c.close()


def cpus_free() -> float:
    return ray.available_resources().get("CPU", 0.0)


def test_nodes_are_described_from_ray(local_ray: Any) -> None:
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # loopback only
    nodes = {n.name: n for n in ray_nodes()}
    assert nodes[local_ray.head].cpus == 1 and nodes[local_ray.head].cpu_set == "0"
    for w in local_ray.workers:
        assert nodes[w].cpus == 2 and nodes[w].cpu_set == "0-1"


def test_a_node_whose_label_names_fewer_cpus_than_its_resource_gives_apportion_those(local_ray: Any) -> None:
    # Such a node was refused ("cpu_set '0' has 1 CPUs, fewer than cpus=2"), and with it every
    # deployment() and Cluster on the cluster: a label could not leave part of a node to other Ray work.
    from apportion.ray.cluster import CPU_SET_LABEL

    from apportion.ray.serve import deployment

    node = local_ray.cluster.add_node(num_cpus=3, labels={CPU_SET_LABEL: "0", "apportion-test-bad": "0_x"},
                                      object_store_memory=80 * 2**20)
    try:
        local_ray.cluster.wait_for_nodes()
        nodes = {n.name: n for n in ray_nodes()}
        assert (nodes[node.node_id].cpus, nodes[node.node_id].cpu_set) == (1, "0")
        assert nodes[local_ray.head].cpus == 1 and all(nodes[w].cpus == 2 for w in local_ray.workers)
        with pytest.raises(ap.QuotaError, match=rf"node '{node.node_id}': cpu_set '0,x' is not a CPU list"):
            ray_nodes("apportion-test-bad")
        # A Serve replica is placed by Ray's resources: reserving the node's 3 CPUs fits there
        # (whatever its label gives apportion), 4 fit nowhere.
        echo = [ap.ModelSpec("e", factory="ray_models:echo")]
        assert deployment(echo, num_cpus=3)._bound_deployment.ray_actor_options == {"num_cpus": 3.0}
        with pytest.raises(ap.PlacementError, match=r"reserves 4 CPUs; no node .* \(the largest: 3 CPUs, 0 GPUs\)"):
            deployment(echo, num_cpus=4)
    finally:
        local_ray.cluster.remove_node(node)
        wait_for(lambda: ray.cluster_resources().get("CPU", 0.0) == 5.0, "the labelled node never left")


def test_one_actor_per_used_node_reserving_its_cpus(local_ray: Any, basic: Cluster) -> None:
    assert sorted(n.node.name for n in basic.plan.used) == sorted([local_ray.head, *local_ray.workers])
    assert cpus_free() == 0.0  # every node's CPUs are held by its apportion actor
    assert set(basic.nodes_of("echo")) == {local_ray.head, *local_ray.workers}
    assert len(basic.nodes_of("where")) == 1 and basic.nodes_of("where")[0] in local_ray.workers
    # Each node's runtime divides its own CPU set: the head's runtime has CPU 0 only.
    plans = basic.node_plans()
    assert set(plans) == {local_ray.head, *local_ray.workers}
    out = basic.call("where", 1)
    assert out["x"] == 1 and len(out["cpus"]) == 1 and set(out["cpus"]) <= {0, 1}


def test_caller_node_first(local_ray: Any, basic: Cluster) -> None:
    before = basic.stats().nodes
    for i in range(20):
        assert basic.call("echo", i) == i
    after = basic.stats().nodes
    done = {n: after[n]["echo"].completed - before[n]["echo"].completed for n in after}
    assert done[local_ray.head] == 20 and all(done[w] == 0 for w in local_ray.workers)
    w = next(iter(local_ray.workers))
    f = basic.submit("echo", 1, node=w)
    assert f.result(30) == 1 and f.node == w


def test_busy_caller_node_spreads_by_queue_depth(local_ray: Any, basic: Cluster) -> None:
    before = basic.stats().nodes
    futs = [basic.submit("echo", {"sleep": 0.2, "i": i}) for i in range(12)]
    assert [f.result(60)["i"] for f in futs] == list(range(12))
    after = basic.stats().nodes
    done = {n: after[n]["echo"].completed - before[n]["echo"].completed for n in after}
    assert sum(done.values()) == 12 and all(v > 0 for v in done.values()), done
    assert {f.node for f in futs} == set(done)


def test_stats_per_node_and_total(basic: Cluster) -> None:
    basic.call("echo", 0)
    s = basic.stats()
    for m in ("echo", "where", "narrow"):
        per = [s.nodes[n][m] for n in s.nodes if m in s.nodes[n]]
        assert s.total[m].completed == sum(c.completed for c in per)
        assert s.total[m].submitted == sum(c.submitted for c in per)
    assert s.total["echo"].completed >= 1 and s.total["echo"].in_flight == 0


def test_errors_are_the_single_host_ones(basic: Cluster) -> None:
    with pytest.raises(ap.ModelNotFound, match="'nope'") as nf:
        basic.submit("nope", 1)
    assert nf.value.model == "nope"
    with pytest.raises(ap.ModelNotFound, match="'where' is not served on node x") as nf:
        basic.submit("where", 1, node="x")
    assert nf.value.model == "where"
    with pytest.raises(ValueError, match="boom") as e:
        basic.call("echo", {"raise": "boom"})
    assert type(e.value) is ValueError  # the model's own exception, not a wrapper
    with pytest.raises(RuntimeError, match=r"model 'echo' raised ray_models\.CodedError: coded") as coded:
        basic.call("echo", {"raise_coded": "coded"})
    assert "could not be sent" in str(coded.value)  # cannot be rebuilt here: named, not Ray's wrapper
    # A model's SystemExit or KeyboardInterrupt ended the node's actor (every model there lost,
    # and with idempotent= the retry ended the next node's too): a RuntimeError naming it.
    nodes = sorted(basic.nodes_of("echo"))
    for poison, word in (({"exit": 3}, "builtins.SystemExit: 3"), ({"interrupt": "stop"}, "builtins.KeyboardInterrupt: stop")):
        with pytest.raises(RuntimeError, match=re.escape(f"model 'echo' raised {word} (sent as a RuntimeError")):
            basic.call("echo", poison)
    assert sorted(basic.nodes_of("echo")) == nodes and basic.call("echo", 5) == 5
    # Each request is its own actor call, and a threaded actor runs calls in any order: a
    # request goes after another only once that one is running.
    first = basic.submit("narrow", {"sleep": 0.5})
    wait_running(basic, "narrow")
    late = basic.submit("narrow", 1, timeout_ms=50)
    assert isinstance(late.exception(30), ap.DeadlineExceeded)
    with pytest.raises(ap.DeadlineExceeded):
        late.result(30)
    first.result(30)
    busy = basic.submit("narrow", {"sleep": 0.5})
    wait_running(basic, "narrow")
    with pytest.raises(TimeoutError) as waited:
        busy.result(0.01)
    assert type(waited.value) is TimeoutError and not busy.done()  # a wait that ran out; it goes on
    more = [basic.submit("narrow", i) for i in range(3)]
    outcomes = [f.exception(30) for f in more]
    assert any(isinstance(x, ap.QueueFull) for x in outcomes), outcomes
    assert all(x is None or isinstance(x, ap.QueueFull) for x in outcomes)
    assert busy.result(30) == {"sleep": 0.5} and busy.done() and busy.exception() is None


def test_asyncio_and_from_a_ray_task(basic: Cluster) -> None:
    async def main() -> tuple[Any, BaseException]:
        ok = await basic.infer("echo", 5)
        try:
            await basic.infer("echo", {"raise": "async boom"})
        except ValueError as e:
            return ok, e
        raise AssertionError("no error")

    ok, err = asyncio.run(main())
    assert ok == 5 and type(err) is ValueError and str(err) == "async boom"

    @ray.remote(num_cpus=0)
    def use(c: Cluster) -> Any:
        return c.call("echo", 7)

    assert ray.get(use.remote(basic), timeout=60) == 7


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def wait_running(c: Cluster, model: str) -> None:
    """Until a request to ``model`` is running (admitted, not queued) on some node."""
    def running() -> bool:
        t = c.stats().total[model]
        return t.in_flight - t.queued >= 1
    wait_for(running, f"no request to {model!r} started")


def test_cancelled_infer_cancels_the_queued_request(basic: Cluster) -> None:
    before = basic.stats().total["narrow"]
    busy = basic.submit("narrow", {"sleep": 2.0})  # long: the stats polls below are slow on a busy host
    wait_running(basic, "narrow")

    async def main() -> None:
        task = asyncio.ensure_future(basic.infer("narrow", 1))
        await asyncio.to_thread(wait_for, lambda: basic.stats().total["narrow"].submitted == before.submitted + 2,
                                "the request never reached its node")
        seen = basic.stats().total["narrow"]
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            return
        raise AssertionError(f"not cancelled: returned {got!r}; before {before}, at the cancel {seen}")

    asyncio.run(main())
    assert busy.result(30) == {"sleep": 2.0}
    wait_for(lambda: basic.stats().total["narrow"].in_flight == 0, "the cancelled request never finished")
    after = basic.stats().total["narrow"]
    assert after.cancelled == before.cancelled + 1 and after.completed == before.completed + 1


def test_does_not_fit_names_the_model(local_ray: Any) -> None:
    with pytest.raises(ClusterPlacementError) as e:
        Cluster(specs(wide={"cores": 3}))
    assert e.value.model == "wide" and e.value.shortfall == 1


def test_node_loss_under_load_exactly_once(local_ray: Any, basic: Cluster) -> None:
    basic.close()  # frees every node's CPUs for this test's own cluster
    with pytest.raises(ap.RuntimeClosed, match="'echo': the cluster is closed"):
        basic.submit("echo", 1)
    wait_for(lambda: cpus_free() == 5.0, "the closed cluster's CPUs never came back")  # released asynchronously
    # A node whose models cannot start: the runtime's own error, and no CPU stays reserved.
    with pytest.raises(ap.QuotaError, match="'ray_models:nope' cannot be imported") as bad:
        Cluster(specs(bad={"factory": "ray_models:nope"}))
    assert bad.value.model == "bad" and bad.value.field == "factory"
    wait_for(lambda: cpus_free() == 5.0, "the failed cluster's CPUs never came back")
    # Placement (best fit): idem on the head (one CPU) and on the first worker, with once;
    # the second worker is free for re-placement.
    c = Cluster(specs(idem={}, once={}), replicas={"idem": 2}, idempotent=["idem"])
    try:
        (victim,) = c.nodes_of("once")
        assert set(c.nodes_of("idem")) == {local_ray.head, victim}
        spare = next(w for w in local_ray.workers if w != victim)
        futs: list[tuple[str, int, Any]] = []
        stop = threading.Event()

        def load() -> None:
            # Bounded: at most 2,000 requests, and 16 outstanding (the oldest is awaited first).
            window: list[Any] = []
            for i in range(2000):
                if stop.is_set():
                    break
                m = ("idem", "once")[i % 2]
                try:
                    f = c.submit(m, {"sleep": 0.01, "i": i})
                except ap.WorkerCrashed as e:  # between the loss and the re-placement
                    futs.append((m, i, e))
                    continue
                futs.append((m, i, f))
                window.append(f)
                if len(window) >= 16:
                    window.pop(0).exception(60)

        t = threading.Thread(target=load)
        t.start()
        deadline = time.monotonic() + 60
        while sum(1 for m, _, f in futs if m == "once") < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Two idempotent requests still running (or queued) on the victim when it leaves.
        long = [c.submit("idem", {"sleep": 1.0, "i": -k}, node=victim) for k in range(2)]
        doomed = c.submit("once", {"sleep": 1.0}, node=victim)
        local_ray.cluster.remove_node(local_ray.workers.pop(victim), allow_graceful=False)
        time.sleep(1.0)
        stop.set()
        t.join(60)

        results, crashed = 0, 0
        for m, i, f in futs:
            out = f if isinstance(f, Exception) else f.exception(120)
            if out is None:
                assert f.result() == {"sleep": 0.01, "i": i}
                results += 1
            else:
                assert isinstance(out, ap.WorkerCrashed), repr(out)
                assert m == "once", f"an idempotent request failed: {out}"
                assert victim in str(out) or "no node serves it now" in str(out)
                crashed += 1
        assert results + crashed == len(futs)  # each completed once, with a result or an error
        s = c.stats()
        assert s.crashed == sum(1 for m, _, f in futs if not isinstance(f, Exception)
                                and isinstance(f.exception(0), ap.WorkerCrashed))
        # Re-placed on the spare worker: both models serve from there now.
        assert victim not in c.nodes_of("once") and spare in c.nodes_of("once"), c.lost_capacity
        assert set(c.nodes_of("idem")) == {local_ray.head, spare}
        assert c.lost_capacity == {}
        assert c.call("once", 3) == 3 and c.call("idem", 4) == 4
        assert victim not in s.nodes
        # The victim's long requests were sent once more, to a survivor, and returned there.
        assert [f.result(60) for f in long] == [{"sleep": 1.0, "i": -k} for k in range(2)]
        with pytest.raises(ap.WorkerCrashed, match=f"model 'once': node {victim} left the cluster"):
            doomed.result(60)
        after = c.stats()
        assert all(f.node != victim for f in long) and after.retried >= 2
        assert after.crashed == s.crashed + 1
        assert after.total["once"].completed == s.total["once"].completed + 1

        # The spare leaves too: "once" now fits on no survivor (the head is full) and says so,
        # while idem keeps serving from the head.
        local_ray.cluster.remove_node(local_ray.workers.pop(spare), allow_graceful=False)
        deadline = time.monotonic() + 60
        while spare in c.nodes_of("idem"):  # a request that meets the dead node reports it
            assert time.monotonic() < deadline, "the spare's loss was never noticed"
            try:
                assert c.submit("idem", 6, node=spare).result(60) == 6
            except ap.ModelNotFound:  # noticed by another request meanwhile
                break
            time.sleep(0.05)
        c.check_nodes()  # returns once the spare's re-placement (begun by that request) is over
        assert "0 of 1 replicas left" in c.lost_capacity["once"]
        with pytest.raises(ap.WorkerCrashed, match=r"'once': no node serves it now \(0 of 1 replicas left"):
            c.submit("once", 1)
        assert c.nodes_of("idem") == [local_ray.head] and c.call("idem", 7) == 7
    finally:
        c.close()


def test_a_node_runtime_cancels_by_key_even_when_the_cancel_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # The node actor's own logic, without Ray: a cancel that overtakes its request (they travel
    # as two actor calls) is applied when the request arrives, which then never enters the
    # runtime (an idle worker could start it first); a cancel reaches a queued request;
    # a cancel for a request that already ended changes nothing.
    from apportion.ray._node import _CANCELS_KEPT, NodeRuntime

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # ray_models
    node = NodeRuntime(None, specs(narrow={"max_queue": 4}))
    assert node.error is None
    try:
        assert node.cancel(7) is False
        with pytest.raises(concurrent.futures.CancelledError, match="'narrow' was cancelled before it reached the node"):
            node.call("narrow", 1, None, None, key=7)
        assert 7 not in node._cancelled and node.stats()["narrow"].submitted == 0
        out: dict[str, Any] = {}
        busy = threading.Thread(target=lambda: out.setdefault("busy", node.call("narrow", {"sleep": 0.5}, None, None, 1)))
        busy.start()
        wait_for(lambda: node.stats()["narrow"].in_flight == 1, "the busy request never started")
        def queued_call() -> None:
            try:
                out["queued"] = node.call("narrow", 2, None, None, key=2)
            except BaseException as e:  # noqa: BLE001 - the outcome under test
                out["queued"] = e

        queued = threading.Thread(target=queued_call)
        queued.start()
        wait_for(lambda: 2 in node._pending, "the queued request never arrived")
        assert node.cancel(2) is True
        queued.join(5)
        busy.join(5)
        assert out["busy"] == {"sleep": 0.5} and isinstance(out["queued"], concurrent.futures.CancelledError)
        assert node.call("narrow", 3, None, None, key=3) == 3 and node.cancel(3) is False
        assert node._pending == {}
        for k in range(100, 100 + _CANCELS_KEPT + 10):
            node.cancel(k)
        assert len(node._cancelled) == _CANCELS_KEPT  # the oldest go: bounded memory
        counts = node.stats()["narrow"]
        assert counts.submitted == 3 and counts.cancelled == 1 and counts.completed == 2 and counts.in_flight == 0
    finally:
        node.close()


def test_a_node_actor_starts_one_thread_per_request_its_runtime_may_hold_within_bounds() -> None:
    from apportion.ray.cluster import MAX_ACTOR_THREADS, actor_threads

    assert actor_threads(specs(a={"max_queue": 100, "instances": 2}, b={"max_queue": 50})) == 153
    assert actor_threads(specs(a={"max_queue": 1})) == 32  # at least 32: admin calls and short bursts
    assert actor_threads(specs(a={}, b={}, c={})) == MAX_ACTOR_THREADS  # three default queues of 1024


def two_workers(local_ray: Any) -> None:
    """Adds workers (2 CPUs each) until there are two again (the node-loss tests remove theirs),
    and waits until every CPU of the cluster is free."""
    from apportion.ray.cluster import CPU_SET_LABEL

    for _ in range(2 - len(local_ray.workers)):
        node = local_ray.cluster.add_node(num_cpus=2, labels={CPU_SET_LABEL: "0-1"}, object_store_memory=80 * 2**20)
        local_ray.workers[node.node_id] = node
    local_ray.cluster.wait_for_nodes()
    wait_for(lambda: cpus_free() == 5.0, "the workers never joined, or a cluster kept their CPUs")


def test_a_failed_re_placement_frees_its_node_and_leaves_the_plan_honest(local_ray: Any) -> None:
    # The actor started for the re-placement stayed (reserving the spare's CPUs, and failing
    # every stats() with an AttributeError), and the plan showed the model on the spare.
    import os

    flag = Path(os.environ["APPORTION_TEST_REFUSE_FLAG"])  # set by the fixture for every node
    try:
        two_workers(local_ray)
        c = Cluster(specs(m={"factory": "ray_models:refuses_once_flagged", "cores": 2}))
        try:
            (victim,) = c.nodes_of("m")
            spare = next(w for w in local_ray.workers if w != victim)
            flag.write_text("")
            local_ray.cluster.remove_node(local_ray.workers.pop(victim), allow_graceful=False)
            wait_for(lambda: c.check_nodes() == [victim] or victim not in c.nodes_of("m"), "the loss was not seen")
            assert "re-placing it on node" in c.lost_capacity["m"] and "flagged" in c.lost_capacity["m"]
            assert c.nodes_of("m") == [] and "m" not in str(c.plan)
            assert c.stats().nodes == {}  # no actor left to ask
            wait_for(lambda: cpus_free() == 3.0, "the failed re-placement's actor kept the spare's CPUs")
            with pytest.raises(ap.WorkerCrashed, match="no node serves it now"):
                c.submit("m", 1)
            with pytest.raises(ValueError, match="drain_timeout_s must be a finite number >= 0"):
                c.close(drain_timeout_s=-1)
        finally:
            c.close()
        assert spare in local_ray.workers
    finally:
        flag.unlink(missing_ok=True)


def test_a_factory_that_never_returns_fails_the_cluster_within_its_start_timeout(local_ray: Any) -> None:
    # The failed start then waited 30 s more for a close call the building actor could not take.
    two_workers(local_ray)
    started = time.monotonic()
    with pytest.raises(ap.PlacementError, match="was not running within 3 s"):
        Cluster(specs(slow={"factory": "ray_models:never_builds"}), start_timeout_s=3)
    assert time.monotonic() - started < 3 + 15


def test_a_node_actor_that_dies_on_a_live_node_is_not_said_to_have_left_the_cluster_alone(local_ray: Any) -> None:
    # The node was still in the Ray cluster: "node X left the cluster" sent readers to Ray's
    # node list, which showed it alive.
    two_workers(local_ray)
    c = Cluster(specs(k={}))
    try:
        (node,) = c.nodes_of("k")
        running = c.submit("k", {"sleep": 2.0})
        wait_running(c, "k")
        ray.kill(c._actors[node])
        with pytest.raises(ap.WorkerCrashed, match=f"node {node} left the cluster or its apportion actor died"):
            running.result(60)
    finally:
        c.close()


def test_a_request_whose_node_left_keeps_its_timeout_while_its_model_is_re_placed(local_ray: Any) -> None:
    # result(timeout) re-placed the lost node's models itself (starting an actor and building
    # them: up to start_timeout_s) before it looked at its timeout again, and a second caller
    # waited for the first one's re-placement as long.
    import tempfile
    import uuid

    name = f"m{uuid.uuid4().hex[:8]}"
    flag = Path(tempfile.gettempdir()) / f"apportion-test-slow-{name}"
    try:
        two_workers(local_ray)
        c = Cluster([ap.ModelSpec(name, factory="ray_models:builds_slowly_flagged", cores=2, isolation="exclusive")],
                    idempotent=[name])
        try:
            (victim,) = c.nodes_of(name)
            spare = next(w for w in local_ray.workers if w != victim)
            first = c.submit(name, {"sleep": 2.0, "i": 1})
            second = c.submit(name, {"sleep": 2.0, "i": 2})
            wait_running(c, name)
            flag.write_text("")  # the re-placement's build takes 8 s
            ray.kill(c._actors[victim])
            wait_for(lambda: len(ray.wait([first.ref, second.ref], num_returns=2, timeout=0)[0]) == 2,
                     "the killed actor's requests never failed")
            took: dict[str, float] = {}

            def wait_second() -> None:
                t0 = time.monotonic()
                with pytest.raises(TimeoutError, match=f"'{name}': no result within 1.0 s .*being re-placed"):
                    second.result(timeout=1.0)
                took["second"] = time.monotonic() - t0

            t = threading.Thread(target=wait_second)
            t0 = time.monotonic()
            t.start()
            with pytest.raises(TimeoutError, match=f"'{name}': no result within 1.0 s"):
                first.result(timeout=1.0)
            took["first"] = time.monotonic() - t0
            t.join(30)
            assert took["first"] < 1.0 + 3.0 and took["second"] < 1.0 + 3.0, took
            with pytest.raises(ap.WorkerCrashed, match=f"'{name}': no node serves it now .*a re-placement is under way"):
                c.submit(name, 0)
            # Sent again once the model serves on the spare, and answered there, once each.
            assert first.result(60) == {"sleep": 2.0, "i": 1} and second.result(60) == {"sleep": 2.0, "i": 2}
            assert first.node == spare == second.node and c.nodes_of(name) == [spare]
            s = c.stats()
            assert s.retried == 2 and s.crashed == 0 and s.total[name].completed == 2
        finally:
            c.close()
    finally:
        flag.unlink(missing_ok=True)


def test_a_factory_that_ends_its_process_fails_the_start_naming_node_and_model(local_ray: Any) -> None:
    # Ray's bare ActorDiedError ("The actor died unexpectedly before finishing this task")
    # reached the caller, naming neither the node nor the model.
    two_workers(local_ray)
    with pytest.raises(ap.PlacementError, match=r"node \w+: its apportion actor died while building models "
                                                r"\['crash'\] \(\w+Error"):
        Cluster(specs(crash={"factory": "ray_models:exits_while_building"}), start_timeout_s=60)
    wait_for(lambda: cpus_free() == 5.0, "the failed start kept CPUs")


def test_a_node_lost_while_a_re_placement_routes_it_is_not_routed_again() -> None:
    # The re-placement (on a thread of its own) routed a node that a request had seen leave in
    # the meantime: later submits chose it and failed with a bare KeyError, for good. And a
    # close() between a loss and the start of its re-placement thread raised, leaving every
    # actor running. (The routing state alone: no Ray cluster needed.)
    from apportion.ray.plan import ClusterPlan

    c = Cluster.__new__(Cluster)
    c._init_local()
    c._plan, c._closed, c._routes, c._lost_nodes, c.lost_capacity = ClusterPlan(()), False, {}, set(), {}
    c._actors = {"n1": object(), "n2": object()}
    m = specs(m={})
    c._route("n1", m)
    c._lost("n2").wait(10)  # the loss comes first ...
    c._route("n2", m)  # ... and then the re-placement's route for it
    assert c.nodes_of("m") == ["n1"] and "n2" not in c._actors
    c._actors = {}
    c._lost("n1")
    c.close(drain_timeout_s=0.0)  # at once after a loss: no error, nothing left
    assert c._closed and c._actors == {}


def test_a_re_placement_that_fails_in_its_planning_says_so_in_lost_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    # On its own thread, an error of the re-planning ended that thread with a traceback on
    # stderr, and lost_capacity kept no reason. (The routing state alone: no Ray cluster needed.)
    from apportion.ray import cluster as cluster_module
    from apportion.ray.plan import Node, plan

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("no plan today")

    monkeypatch.setattr(cluster_module, "replace_lost", broken)
    c = Cluster.__new__(Cluster)
    c._init_local()
    c._plan = plan(specs(m={}), [Node("n1", 2, None, 0, {}), Node("n2", 2, None, 0, {})])
    c._closed, c._routes, c._lost_nodes, c.lost_capacity, c._actors = False, {}, set(), {}, {"n1": object()}
    c._route("n1", specs(m={}))
    assert c._lost("n1").wait(10)
    assert c.lost_capacity == {"m": "re-placing it after node n1 left failed: RuntimeError: no plan today"}
    with pytest.raises(ap.WorkerCrashed, match="'m': no node serves it now \\(re-placing it after node n1 left failed"):
        c.submit("m", 1)
