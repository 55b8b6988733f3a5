"""``apportion.ray.Cluster``: one apportion runtime per Ray node, and routing between them.

A cluster plans the config's models onto the Ray cluster's alive nodes (:func:`apportion.ray.plan`),
then starts one actor on each node that got replicas, with ``NodeAffinitySchedulingStrategy``
(hard affinity) and ``num_cpus`` = the CPUs apportion divides there (the node's whole CPU
resource, or the CPUs its label names where fewer: :func:`ray_nodes`), so Ray schedules no more
than the rest of the node beside it (Ray counts CPUs, it does not pin them: other Ray work may
still run on the actor's CPUs); the actor runs an :class:`apportion.Runtime` on the node's CPU
set with that node's models (pinning, NUMA, threads, batching and GPU quotas as on one host).

Requests go to a node that holds the model: the caller's own node while it has fewer than
``local_queue`` requests of this caller in flight per instance, else the less loaded of two
nodes drawn at random ("power of two choices" on this caller's requests in flight per node).
Outcomes are those of the single-host runtime: ``QueueFull``, ``DeadlineExceeded``,
``ModelNotFound`` and the model's own exceptions reach the caller unchanged (one that Ray
cannot rebuild in the caller arrives as a RuntimeError naming the model, its class and its
message).

A node's actor is a threaded Ray actor: each request it holds waits on one of its threads, so it
starts one thread per request its runtime may admit (:func:`actor_threads`, at most
:data:`MAX_ACTOR_THREADS`). A node sent more requests at once than that keeps the rest in Ray's
queue for the actor, where no deadline or queue bound of the runtime applies yet.

When a node leaves (its actor dies), each of its requests in flight completes with
:class:`apportion.WorkerCrashed` naming the node and the model, or, for a model listed in
``idempotent=``, is sent once more to another node holding the model. The cluster then re-places
the node's replicas on the survivors (:func:`apportion.ray.replace_lost`), in a thread of its own
so that no caller waits for it beyond its own timeout: a replica moves to the survivor with room
(its actor adds the model while serving the rest), or the model is recorded in
:attr:`Cluster.lost_capacity` with the reason. A model left with no node fails its requests
with WorkerCrashed saying so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as e:
    raise ImportError(f"apportion.ray.Cluster needs Ray ({e}): pip install 'apportion[ray]'",
                      name=__name__) from e

from .._private.checks import finite_number
from ..errors import ModelNotFound, PlacementError, QuotaError, RuntimeClosed, WorkerCrashed
from ..spec import ModelSpec
from ..topology import parse_cpulist
from ..tune.cost import CostModel
from ._node import ModelCounts, NodeRuntime, runtime_settings
from .plan import ClusterPlan, Node, plan, replace_lost

__all__ = ["CPU_SET_LABEL", "Cluster", "ClusterFuture", "ClusterStats", "ModelCounts", "ray_nodes"]

CPU_SET_LABEL = "apportion-cpus"
"""Node label naming the CPUs apportion divides on that node, like ``"0-7"`` (``_`` stands
for ``,``, which Ray labels do not allow: ``"0-3_8"``). Without it a node's runtime uses every
CPU its process may use."""

_node_id: str | None = None


def _caller_node() -> str | None:
    global _node_id
    if _node_id is None:
        try:
            _node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # pragma: no cover - a process not connected to Ray
            return None
    return _node_id


MAX_ACTOR_THREADS = 1024
"""The most threads a node actor starts (Ray starts a threaded actor's threads up front)."""


def actor_threads(specs: Iterable[ModelSpec]) -> int:
    """Threads for a node actor serving ``specs``: one per request the node's runtime may hold
    (each model's ``max_queue`` plus its instances), at least 32 and at most
    :data:`MAX_ACTOR_THREADS`. Past that, requests wait in Ray's queue for the actor before the
    runtime admits them."""
    held = sum(s.max_queue + s.instances + s.burst_instances for s in specs)
    return max(32, min(MAX_ACTOR_THREADS, held))


def ray_nodes(cpu_set_label: str = CPU_SET_LABEL) -> list[Node]:
    """The alive nodes of the connected Ray cluster as the planner describes them: ``name`` is
    the node id, ``cpus`` its CPU resource (whole CPUs), or the CPUs its label names where that
    is fewer (apportion divides only those: label an 8-CPU node ``"0-3"`` to leave the rest to
    other Ray work), ``gpus`` its GPU resource, ``labels`` its Ray labels, ``cpu_set`` the label
    ``cpu_set_label`` (see :data:`CPU_SET_LABEL`). Ray's ``CPU`` counts what the node was
    started with (hardware threads by default), while a model's ``cores`` counts physical
    cores: on an SMT host, describe the nodes yourself. A label that is no CPU list is a
    QuotaError naming the node. (Ray counts CPUs and does not pin them: the other Ray work
    on such a node may still run on the label's CPUs; pin it elsewhere to keep them apart.)"""
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        labels = {k: str(v) for k, v in (n.get("Labels") or {}).items()}
        label = labels.get(cpu_set_label)
        cpu_set = label.replace("_", ",") if label else None
        cpus = int(res.get("CPU", 0))
        if cpu_set is not None:
            try:
                cpus = min(cpus, len(parse_cpulist(cpu_set)))
            except (TypeError, ValueError):
                pass  # Node refuses it, naming the node and the label
        out.append(Node(n["NodeID"], cpus, cpu_set, int(res.get("GPU", 0)), labels))
    return sorted(out, key=lambda n: n.name)


@dataclass(frozen=True)
class ClusterStats:
    """Request outcomes by node (``nodes[node_id][model]``, with per-node latency percentiles)
    and summed over nodes (``total[model]``), and what routing saw in this process:
    ``retried`` (requests sent again after a node left) and ``crashed`` (requests that
    failed with WorkerCrashed)."""

    nodes: dict[str, dict[str, ModelCounts]]
    total: dict[str, ModelCounts]
    retried: int = 0
    crashed: int = 0


@dataclass
class _Route:
    nodes: list[str] = field(default_factory=list)
    instances: dict[str, int] = field(default_factory=dict)


class ClusterFuture:
    """One request sent to a node: ``result(timeout)`` (blocking), ``await fut``, ``done()``;
    ``node`` is the node serving it, ``ref`` the Ray object ref of its result (a raw ref: a
    node's death reads as Ray's error there; ``result`` and ``await`` translate it)."""

    __slots__ = ("_cluster", "_model", "_args", "node", "ref", "_key", "_retried", "_outcome", "_lock")

    def __init__(self, cluster: Cluster, model: str, args: tuple[Any, ...], node: str, ref: Any, key: int,
                 retried: bool = False) -> None:
        self._cluster = cluster
        self._model = model
        self._args = args
        self.node = node
        self.ref = ref
        self._key = key
        self._retried = retried
        self._outcome: tuple[bool, Any] | None = None
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self._model

    def done(self) -> bool:
        if self._outcome is not None:
            return True
        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self, timeout: float | None = None) -> Any:
        """The result, or the request's error raised (TimeoutError when ``timeout`` seconds
        pass first; the request goes on)."""
        return _unwrap(self._settle(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The request's error, or None when it returned a result (TimeoutError as for
        :meth:`result`)."""
        ok, value = self._settle(timeout)
        return None if ok else value

    def _settle(self, timeout: float | None) -> tuple[bool, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._outcome is None:
                try:
                    value = ray.get(self.ref, timeout=_left(deadline))
                    self._outcome = (True, value)
                except GetTimeoutError:
                    raise TimeoutError(f"model {self._model!r}: no result within {timeout} s") from None
                except RayTaskError as e:
                    self._outcome = (False, _cause(e))
                except RayActorError as e:
                    self._outcome = self._node_left(e, deadline, timeout)
            return self._outcome

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        while self._outcome is None:
            try:
                value = await self.ref
                self._outcome = (True, value)
            except RayTaskError as e:
                self._outcome = (False, _cause(e))
            except RayActorError as e:
                outcome = await asyncio.get_running_loop().run_in_executor(None, self._node_left, e)
                self._outcome = outcome
        return _unwrap(self._outcome)

    def _node_left(self, err: BaseException, deadline: float | None = None,
                   timeout: float | None = None) -> tuple[bool, Any] | None:
        """A None outcome: sent again (``ref`` and ``node`` now name the new attempt). The lost
        node's replicas are re-placed in the background; a retry that finds no other node waits
        for that until ``deadline`` (TimeoutError then: the next wait takes it up again)."""
        lost = self.node
        replaced = self._cluster._lost(lost)
        if not self._retried and self._model in self._cluster._idempotent:
            while True:
                try:
                    node, ref, key = self._cluster._send(self._model, self._args, exclude=(lost,))
                    break
                except WorkerCrashed as e:  # no node serves it now: the re-placement may bring one
                    if replaced is None or replaced.is_set():
                        self._cluster._count("crashed")
                        return (False, e)
                    if not replaced.wait(_left(deadline)):
                        raise TimeoutError(f"model {self._model!r}: no result within {timeout} s (node {lost} "
                                           f"left; the model is being re-placed, and the request will be sent "
                                           f"again then)") from None
                except BaseException as e:  # noqa: BLE001 - the retry's own failure is the outcome
                    self._cluster._count("crashed")
                    return (False, e)
            self._cluster._count("retried")
            self.node, self.ref, self._key, self._retried = node, ref, key, True
            return None
        self._cluster._count("crashed")
        crash = WorkerCrashed(f"model {self._model!r}: node {lost} left the cluster or its apportion actor died "
                              f"while serving this request ({type(err).__name__}); it may or may not have run",
                              model=self._model)
        crash.__cause__ = err
        return (False, crash)


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (a time.monotonic() value; None: no deadline), 0 at least."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _cause(e: RayTaskError) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _unwrap(outcome: tuple[bool, Any] | None) -> Any:
    assert outcome is not None
    ok, value = outcome
    if ok:
        return value
    raise value


class Cluster:
    """The config's models served on the connected Ray cluster, one apportion runtime per node
    (see the module documentation). Connects with ``ray.init()`` when this process is not
    connected yet.

    ``nodes``: the nodes to plan on (default: :func:`ray_nodes`, every alive node).
    ``replicas``, ``costs``, ``labels``: as for :func:`apportion.ray.plan`. ``idempotent``:
    models whose requests may run twice: one lost with its node is sent once more to another.
    ``local_queue``: requests in flight per instance on the caller's node before routing
    looks at other nodes. ``start_timeout_s``: how long a node's actor may take to be
    scheduled and to build its models.

    Safe to use from any thread; a Cluster passed to a Ray task or actor routes from there (its
    in-flight counts start at zero in each process). ``close()`` stops the node actors and
    releases their CPUs; it is also a context manager.
    """

    def __init__(self, config: Any, *, nodes: Sequence[Node] | None = None, replicas: int | Mapping[str, int] = 1,
                 costs: Mapping[str, CostModel] | None = None, labels: Mapping[str, Mapping[str, str]] | None = None,
                 idempotent: Iterable[str] = (), local_queue: int = 2, start_timeout_s: float = 120.0) -> None:
        if not ray.is_initialized():
            ray.init()
        self._plan = plan(config, nodes if nodes is not None else ray_nodes(), replicas=replicas, costs=costs,
                          labels=labels)
        self._idempotent = frozenset(idempotent)
        for m in self._idempotent:
            if m not in self._plan.models:
                raise ModelNotFound(f"idempotent names {m!r}, which is not a model of the config "
                                    f"(models: {list(self._plan.models)})", model=m)
        self._local_queue = local_queue
        self._start_timeout_s = start_timeout_s
        self._settings = runtime_settings(config)  # the config's [runtime] table, for every node
        self._actors: dict[str, Any] = {}
        self._routes: dict[str, _Route] = {}
        self._lost_nodes: set[str] = set()
        self.lost_capacity: dict[str, str] = {}
        """Models that lost replicas no survivor had room for: model -> what is left and why
        (updated by the re-placement after a node loss; :meth:`check_nodes` waits for it)."""
        self._closed = False
        self._init_local()
        try:
            self._start([(n.node, n.specs()) for n in self._plan.used])
        except BaseException:
            # Nothing was admitted yet: no drain to wait for (an actor still building its models
            # cannot take the close call, and waited 30 s more before it was killed).
            self.close(drain_timeout_s=0.0)
            raise

    def _init_local(self) -> None:
        self._lock = threading.Lock()
        self._admin = threading.Lock()
        self._inflight: dict[str, int] = {}
        self._counts = {"retried": 0, "crashed": 0}
        self._rng = random.Random(0)
        # Request keys (for cancelling on the node): a random start per process, so routers in
        # different processes do not share keys.
        self._keys = itertools.count(random.SystemRandom().getrandbits(62))
        # Re-placements after a node loss, by lost node: set once over (see _lost).
        self._replacing: dict[str, threading.Event] = {}

    # -- pickling: a Cluster handed to a task or actor routes from there -------------------------
    def __getstate__(self) -> dict[str, Any]:
        keep = ("_plan", "_idempotent", "_local_queue", "_start_timeout_s", "_settings", "_actors", "_routes",
                "_lost_nodes", "lost_capacity", "_closed")
        with self._lock:
            return {k: getattr(self, k) for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local()

    # -- lifecycle ----------------------------------------------------------------------------
    def _start(self, work: Sequence[tuple[Node, Sequence[ModelSpec]]]) -> None:
        pending = {}
        for node, specs in work:
            # A handle as _actors keeps it (Any): Ray types a method's .remote only under @ray.method.
            actor: Any = ray.remote(NodeRuntime).options(
                num_cpus=node.cpus, num_gpus=node.gpus or None, max_restarts=0,
                max_concurrency=actor_threads(specs),
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.name, soft=False),
            ).remote(node.cpu_set, list(specs), self._settings)
            pending[node.name] = (actor, specs, actor.ready.remote())
        for name, (actor, specs, ready) in pending.items():
            self._actors[name] = actor
            try:
                got, _ = ray.get(ready, timeout=self._start_timeout_s)
            except GetTimeoutError:
                raise PlacementError(f"node {name}: its apportion actor was not running within "
                                     f"{self._start_timeout_s:g} s; are the node's CPUs held by other Ray "
                                     f"tasks or actors? (it reserves all of them)") from None
            except RayTaskError as e:
                raise _cause(e) from None
            except RayActorError as e:
                # The process ended while building (a factory calling os._exit, a crash, the
                # OOM killer): whose models, not Ray's bare ActorDiedError.
                raise PlacementError(f"node {name}: its apportion actor died while building models "
                                     f"{[s.name for s in specs]} ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
            assert got == name, f"actor for node {name} started on node {got}"
            self._route(name, specs)

    def _route(self, node: str, specs: Iterable[ModelSpec]) -> None:
        with self._lock:
            if node in self._lost_nodes or node not in self._actors:
                # It left while its actor started or took the models (a re-placement on another
                # thread): routing it again sent requests to an actor no longer listed.
                self._actors.pop(node, None)
                return
            self._inflight.setdefault(node, 0)
            for s in specs:
                r = self._routes.setdefault(s.name, _Route())
                if node not in r.nodes:
                    r.nodes.append(node)
                r.instances[node] = s.instances

    def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stops every node's runtime (queued requests are finished, for at most
        ``drain_timeout_s`` per node: those still unfinished then fail with WorkerCrashed) and
        its actor. A re-placement under way (after a node loss) is waited for up to
        ``drain_timeout_s`` too; an actor it starts later is stopped by it. Idempotent."""
        if self._closed:
            return
        if not (finite_number(drain_timeout_s) and drain_timeout_s >= 0):
            raise QuotaError(f"Cluster.close: drain_timeout_s must be a finite number >= 0, got {drain_timeout_s!r}")
        self._closed = True
        # An actor a re-placement is starting is closed with the others; one still starting
        # when the drain's time is up is killed by the re-placement itself (it sees _closed).
        self._replaced(drain_timeout_s)
        actors = list(self._actors.values())
        closing = [a.close.remote() for a in actors]
        for a, done in zip(actors, closing):
            try:
                ray.get(done, timeout=drain_timeout_s)
            except Exception:  # noqa: BLE001 - a node already gone has nothing to close
                pass
            ray.kill(a)
        for a in actors:
            # Returns once the actors are gone, so their CPUs go back to Ray.
            try:
                ray.get(a.ready.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - RayActorError: it is gone
                pass
        self._actors.clear()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it serves -----------------------------------------------------------------------
    @property
    def plan(self) -> ClusterPlan:
        """The plan in force (after a node left: the plan re-placed on the survivors)."""
        return self._plan

    @property
    def models(self) -> list[str]:
        return list(self._plan.models)

    def nodes_of(self, model: str) -> list[str]:
        """The nodes routing sends ``model``'s requests to now."""
        with self._lock:
            r = self._routes.get(model)
            return list(r.nodes) if r else []

    def node_plans(self) -> dict[str, str]:
        """Each node runtime's own plan (``Runtime.plan()`` as text: cores, threads), by node."""
        refs = {n: a.plan.remote() for n, a in self._actors.items() if n not in self._lost_nodes}
        return {n: ray.get(r) for n, r in refs.items()}

    # -- requests -----------------------------------------------------------------------------
    def submit(self, model: str, inputs: Any, *, timeout_ms: float | None = None, priority: int | None = None,
               node: str | None = None) -> ClusterFuture:
        """Sends one request to a node holding ``model`` (see the module documentation), or to
        ``node`` when given (one of :meth:`nodes_of`; a retry after that node leaves goes
        elsewhere), and returns its :class:`ClusterFuture`. ``timeout_ms`` and ``priority`` are
        those of :meth:`apportion.Runtime.submit`. Raises ModelNotFound for an unknown model
        (or a node that does not hold it), RuntimeClosed after close()."""
        args = (inputs, timeout_ms, priority)
        node, ref, key = self._send(model, args, node=node)
        return ClusterFuture(self, model, args, node, ref, key)

    def call(self, model: str, inputs: Any, *, timeout_ms: float | None = None, priority: int | None = None,
             node: str | None = None) -> Any:
        """``submit(...).result()``: the result, or the request's error raised."""
        return self.submit(model, inputs, timeout_ms=timeout_ms, priority=priority, node=node).result()

    async def infer(self, model: str, inputs: Any, *, timeout_ms: float | None = None,
                    priority: int | None = None, node: str | None = None) -> Any:
        """Submits and awaits one request without blocking the event loop. Cancelling the
        awaiting task cancels the request on its node if it is still queued there."""
        fut = self.submit(model, inputs, timeout_ms=timeout_ms, priority=priority, node=node)
        try:
            return await fut
        except asyncio.CancelledError:
            self._cancel(fut)
            raise

    def _cancel(self, fut: ClusterFuture) -> None:
        """Cancels ``fut``'s request on its node if it is still queued there (no wait)."""
        actor = self._actors.get(fut.node)
        if actor is not None and fut.node not in self._lost_nodes:
            actor.cancel.remote(fut._key)

    def _send(self, model: str, args: tuple[Any, ...], exclude: Iterable[str] = (),
              node: str | None = None) -> tuple[str, Any, int]:
        if self._closed:
            raise RuntimeClosed(f"model {model!r}: the cluster is closed")
        with self._lock:
            route = self._routes.get(model)
            if route is None:
                raise ModelNotFound(f"model {model!r} is not served by this cluster; models: "
                                    f"{list(self._routes) or list(self._plan.models)}", model=model)
            nodes = [n for n in route.nodes if n not in exclude and n in self._actors]
            if not nodes:
                why = self.lost_capacity.get(model, "its nodes left the cluster")
                if any(not e.is_set() for e in self._replacing.values()):
                    why += "; a re-placement is under way"
                raise WorkerCrashed(f"model {model!r}: no node serves it now ({why})", model=model)
            if node is None:
                node = self._choose(nodes, route)
            elif node not in nodes:
                raise ModelNotFound(f"model {model!r} is not served on node {node}; its nodes: {nodes}", model=model)
            # Requests in flight are counted only where routing has a choice to make: the
            # completion callback that uncounts one costs ~60 us per request.
            track = len(nodes) > 1
            if track:
                self._inflight[node] = self._inflight.get(node, 0) + 1
            actor = self._actors[node]
            key = next(self._keys)
        try:
            ref = actor.call.remote(model, *args, key)
        except BaseException:
            if track:
                self._done(node)
            raise
        if track:
            ref.future().add_done_callback(lambda _f, node=node: self._done(node))
        return node, ref, key

    def _choose(self, nodes: list[str], route: _Route) -> str:
        local = _caller_node()
        if local in nodes and self._inflight.get(local, 0) < self._local_queue * route.instances.get(local, 1):
            return local  # type: ignore[return-value]
        if len(nodes) == 1:
            return nodes[0]
        a, b = self._rng.sample(nodes, 2)
        # Ties go to the first in route order, so an idle cluster fills its nodes in turn.
        if self._inflight.get(b, 0) < self._inflight.get(a, 0) or (
                self._inflight.get(b, 0) == self._inflight.get(a, 0) and nodes.index(b) < nodes.index(a)):
            return b
        return a

    def _done(self, node: str) -> None:
        with self._lock:
            self._inflight[node] = self._inflight.get(node, 1) - 1

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    # -- node loss ----------------------------------------------------------------------------
    def _lost(self, node: str) -> threading.Event | None:
        """Node ``node``'s actor is gone: stop routing to it at once, and re-place its replicas
        (once) in a thread of its own, so that no caller waits for actors to start beyond its
        own timeout. Returns the event set when that re-placement is over (None once closed)."""
        with self._lock:
            if self._closed:
                return None
            replaced = self._replacing.get(node)
            if replaced is not None:
                return replaced
            replaced = self._replacing[node] = threading.Event()
            if node in self._lost_nodes:  # lost before this copy was unpickled
                replaced.set()
                return replaced
            self._lost_nodes.add(node)
            for r in self._routes.values():
                if node in r.nodes:
                    r.nodes.remove(node)
                    r.instances.pop(node, None)
            self._actors.pop(node, None)
            threading.Thread(target=self._replace, args=(node, replaced), name="apportion-re-place",
                             daemon=True).start()
        return replaced

    def _replaced(self, timeout_s: float | None = None) -> None:
        """Waits until every re-placement under way is over (at most ``timeout_s`` in all)."""
        with self._lock:
            pending = list(self._replacing.values())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for replaced in pending:  # each set by its re-placement's thread as it ends
            replaced.wait(_left(deadline))

    def _replace(self, node: str, replaced: threading.Event) -> None:
        try:
            with self._admin:
                if not self._closed and node in {n.node.name for n in self._plan.nodes}:
                    try:
                        self._replace_locked(node)
                    except Exception as e:  # noqa: BLE001 - the re-planning's own failure: kept, as a failed start is
                        # On this thread nobody would see it (it reached the caller that saw the
                        # loss before the re-placement had a thread of its own).
                        for r in self._plan.node(node).replicas:
                            self.lost_capacity[r.model] = (f"re-placing it after node {node} left failed: "
                                                           f"{type(e).__name__}: {e}")
        finally:
            replaced.set()

    def _replace_locked(self, node: str) -> None:
        """Re-places lost node ``node``'s replicas on the survivors (``_admin`` held)."""
        replan = replace_lost(self._plan, node)
        self.lost_capacity.update(replan.lost_capacity)
        by_node: dict[str, list[ModelSpec]] = {}
        for n in replan.plan.nodes:
            for r in n.replicas:
                if replan.moved.get(r.model) == n.node.name:
                    by_node.setdefault(n.node.name, []).append(r.spec)
        failed: dict[str, set[str]] = {}
        for target, specs in by_node.items():
            started = target not in self._actors
            try:
                if not started:
                    ray.get(self._actors[target].add.remote(specs), timeout=self._start_timeout_s)
                    self._route(target, specs)
                else:
                    self._start([(replan.plan.node(target).node, specs)])
                    if self._closed:  # close() gave up waiting for this start: the actor is ours to stop
                        actor = self._actors.pop(target, None)
                        if actor is not None:
                            ray.kill(actor)
            except Exception as e:  # noqa: BLE001 - recorded: the rest keeps serving
                for s in specs:
                    self.lost_capacity[s.name] = f"re-placing it on node {target} failed: {e}"
                failed[target] = {s.name for s in specs}
                if started:
                    # The actor started for them serves nothing: it goes, and the node's
                    # CPUs with it (it reserved them all, and every stats() asked it).
                    actor = self._actors.pop(target, None)
                    if actor is not None:
                        ray.kill(actor)
        # The plan shows what serves: not the replicas whose re-placement failed.
        self._plan = dataclasses.replace(replan.plan, nodes=tuple(
            dataclasses.replace(n, replicas=tuple(r for r in n.replicas if r.model not in failed.get(n.node.name, ())))
            for n in replan.plan.nodes))

    def check_nodes(self) -> list[str]:
        """Looks for nodes that left the Ray cluster and handles each like a request that saw
        it leave (re-placement); returns the nodes found gone now, once every re-placement under
        way (these, or those a request's node loss began) is over: :attr:`plan`,
        :meth:`nodes_of` and :attr:`lost_capacity` then show its outcome."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        gone = [n for n in list(self._actors) if n not in alive]
        for n in gone:
            self._lost(n)
        self._replaced()
        return gone

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> ClusterStats:
        """Request outcomes per node and in total (see :class:`ClusterStats`)."""
        self.check_nodes()
        refs = {n: a.stats.remote() for n, a in list(self._actors.items())}
        nodes: dict[str, dict[str, ModelCounts]] = {}
        for n, ref in refs.items():
            try:
                nodes[n] = ray.get(ref, timeout=60)
            except RayActorError:
                self._lost(n)
        self._replaced()
        total: dict[str, ModelCounts] = {}
        for per in nodes.values():
            for m, c in per.items():
                total[m] = total[m] + c if m in total else ModelCounts() + c
        with self._lock:
            return ClusterStats(nodes, total, self._counts["retried"], self._counts["crashed"])

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._actors)} nodes"
        return f"<apportion.ray.Cluster {state} models={self.models}>"
