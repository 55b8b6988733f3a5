"""The cluster plan: which nodes serve each model's replicas, and how many cores each gets.

A pure function of numbers (no Ray, no machine): :func:`plan` takes a config's models and a
list of described :class:`Node` s and returns a :class:`ClusterPlan`; :func:`replace_lost`
re-places the replicas of a node that left onto the survivors. Both are deterministic (the same
input gives the same plan) and cheap (1,000 models on 100 nodes plan in well under a second;
bench/python/bench_ray.py times it).

What a replica needs:

- with a cost model for the model (``costs=``, :class:`apportion.tune.CostModel`), a demand
  (``load.rate`` or ``load.share`` of ``[workload] rate``) and an SLO (``slo.latency_ms``), the
  fewest cores on which the tuner's cost model serves the replica's part of the demand within the
  SLO (at the tuner's planned utilisation, :data:`apportion.tune.RHO`), with the cheapest shape
  (threads per instance, batch) that meets it;
- otherwise what the spec asks for: ``cores`` (a count; a CPU list names CPUs of one host, so
  on a cluster only its length counts), else ``instances x threads`` (one per instance when
  ``threads`` is unset).

Where replicas go: a model's replicas go to distinct nodes (a node that leaves takes one
replica, not all); larger replicas are placed first, each on the node that it fills best (the
least free cores that still fit), so models that fit together share a node and whole nodes stay
free for large models. A model with a GPU quota goes only to nodes that have a GPU of that index,
one pinned to a NUMA node (``numa=n``) only to nodes with that NUMA node, and a model given
``labels=`` only to nodes whose labels include them. A replica that fits nowhere is
a :class:`ClusterPlacementError` naming the model, what it needs and the shortfall.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import PlacementError, QuotaError
from ..spec import ModelSpec
from ..topology import parse_cpulist
from ..tune.cost import RHO, CostModel, Need, Shape

__all__ = ["ClusterPlacementError", "ClusterPlan", "Node", "NodePlan", "Replan", "Replica", "plan",
           "replace_lost"]

_THREAD_CHOICES = (1, 2, 4, 8, 16, 32, 64)


class ClusterPlacementError(PlacementError):
    """A model whose replicas do not fit the cluster. ``model`` names it, ``needed`` is the
    cores one replica needs, ``available`` the most free cores on any node it could still use,
    ``shortfall`` the difference (0 when the reason is not cores: a GPU, a label, too few
    nodes for its replicas); the message says all of it."""

    def __init__(self, message: str, *, model: str, needed: int, available: int) -> None:
        super().__init__(f"model {model!r}: {message}")
        self.model = model
        self.needed = needed
        self.available = available
        self.shortfall = max(0, needed - available)


@dataclass(frozen=True)
class Node:
    """One cluster node as the planner sees it.

    ``name``: its id (the Ray node id for a running cluster). ``cpus``: the cores apportion
    divides on it (counted like a model's ``cores``). ``cpu_set``: the CPUs its runtime uses,
    as a list like ``"0-7"`` (None: every CPU the node's process may use). ``gpus``: GPU count.
    ``numa_nodes``: its NUMA node count (a model pinned to NUMA node ``n`` with ``numa=n`` goes
    only to nodes that have it; within a node, the node's runtime places NUMA as on one host).
    ``labels``: what ``labels=`` of :func:`plan` matches."""

    name: str
    cpus: int
    cpu_set: str | None = None
    gpus: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    numa_nodes: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise QuotaError(f"Node: name must be a non-empty string, got {self.name!r}", field="name")
        for fld, least in (("cpus", 0), ("gpus", 0), ("numa_nodes", 1)):
            v = getattr(self, fld)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise QuotaError(f"node {self.name!r}: {fld} must be an integer >= {least}, got {v!r}", field=fld)
        if self.cpu_set is not None:
            try:
                cpus = parse_cpulist(self.cpu_set)
            except (TypeError, ValueError) as e:
                raise QuotaError(f"node {self.name!r}: cpu_set {self.cpu_set!r} is not a CPU list like "
                                 f"\"0-7\": {e}", field="cpu_set") from None
            if len(cpus) < self.cpus:
                raise QuotaError(f"node {self.name!r}: cpu_set {self.cpu_set!r} has {len(cpus)} CPUs, "
                                 f"fewer than cpus={self.cpus}", field="cpu_set")
        object.__setattr__(self, "labels", dict(self.labels))


@dataclass(frozen=True)
class Replica:
    """One replica of a model on one node: its ``cores``, the spec that node's runtime serves
    (the config's spec with the planned ``cores``, ``instances``, ``threads`` and batching) and
    the node ``labels`` the model requires (a replacement node must have them too)."""

    model: str
    node: str
    cores: int
    spec: ModelSpec
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodePlan:
    """What one node serves: its replicas, in placement order."""

    node: Node
    replicas: tuple[Replica, ...] = ()

    @property
    def used(self) -> int:
        return sum(r.cores for r in self.replicas)

    @property
    def free(self) -> int:
        return self.node.cpus - self.used

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(r.model for r in self.replicas)

    def specs(self) -> list[ModelSpec]:
        return [r.spec for r in self.replicas]


@dataclass(frozen=True)
class ClusterPlan:
    """The replicas of every model on every node (``nodes`` in the order given, used or not)."""

    nodes: tuple[NodePlan, ...]

    @property
    def used(self) -> tuple[NodePlan, ...]:
        """The nodes that serve at least one replica."""
        return tuple(n for n in self.nodes if n.replicas)

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.node.name == name:
                return n
        raise KeyError(f"no node {name!r} in this plan; nodes: {[n.node.name for n in self.nodes]}")

    def nodes_of(self, model: str) -> tuple[str, ...]:
        """The nodes holding a replica of ``model``, in node order."""
        return tuple(n.node.name for n in self.nodes if model in n.models)

    @property
    def models(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for n in self.nodes:
            for r in n.replicas:
                seen.setdefault(r.model)
        return tuple(seen)

    def __str__(self) -> str:
        lines = []
        for n in self.nodes:
            parts = ", ".join(f"{r.model}({r.cores})" for r in n.replicas) or "-"
            lines.append(f"{n.node.name}: {n.used}/{n.node.cpus} cores: {parts}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Replan:
    """The outcome of :func:`replace_lost`: the new ``plan`` (without the lost node),
    ``moved`` (model -> the node that took its lost replica) and ``lost_capacity`` (model ->
    what it lost: the replicas it keeps out of how many it had, and why none could move)."""

    plan: ClusterPlan
    moved: dict[str, str]
    lost_capacity: dict[str, str]


@dataclass(frozen=True)
class _Want:
    spec: ModelSpec
    cores: int
    replicas: int
    gpu: int | None
    labels: Mapping[str, str]


def plan(config: Any, nodes: Sequence[Node], *, replicas: int | Mapping[str, int] = 1,
         costs: Mapping[str, CostModel] | None = None,
         labels: Mapping[str, Mapping[str, str]] | None = None) -> ClusterPlan:
    """Places every model of ``config`` (an :class:`apportion.Config`, or a sequence of
    :class:`apportion.ModelSpec`) on ``nodes`` (see the module documentation).

    ``replicas``: replicas per model (one count for all, or by model name; default 1); a model
    whose demand needs more cores than one node has gets as many more replicas as it takes, up
    to one per node. ``costs``: cost models by model name. ``labels``: node labels a model's
    replicas require, by model name. Raises :class:`ClusterPlacementError` (naming the model)
    when a replica fits no node, QuotaError for a bad argument."""
    nodes = list(nodes)
    if not nodes:
        raise PlacementError("plan: no nodes to place on")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise QuotaError(f"plan: node names must be distinct, got {names}", field="nodes")
    specs, demand, slo = _models(config)
    costs = dict(costs or {})
    labels = dict(labels or {})
    for key, what in ((costs, "costs"), (labels, "labels")):
        for m in key:
            if m not in specs:
                raise QuotaError(f"plan: {what} names {m!r}, which is not a model of the config "
                                 f"(models: {list(specs)})", model=m, field=what)
    counts = _replica_counts(replicas, specs)
    largest = max(n.cpus for n in nodes)
    wants = [_want(specs[m], counts[m], costs.get(m), demand.get(m), slo.get(m), largest, len(nodes),
                   labels.get(m, {})) for m in specs]
    # Larger replicas first, then by name: deterministic, and large ones still find room.
    wants.sort(key=lambda w: (-w.cores, w.spec.name))
    placed: list[list[Replica]] = [[] for _ in nodes]
    free = [n.cpus for n in nodes]
    for w in wants:
        holders: set[int] = set()
        for k in range(w.replicas):
            i = _best_node(w, nodes, free, holders)
            if i is None:
                raise _no_room(w, k, nodes, free, holders)
            holders.add(i)
            free[i] -= w.cores
            placed[i].append(Replica(w.spec.name, nodes[i].name, w.cores, w.spec, dict(w.labels)))
    return ClusterPlan(tuple(NodePlan(n, tuple(p)) for n, p in zip(nodes, placed)))


def replace_lost(current: ClusterPlan, lost: str) -> Replan:
    """The plan once node ``lost`` has left: the survivors keep their replicas, and each replica
    the lost node held moves to the survivor it fits best (free cores, GPU, labels, not already
    holding the model), larger replicas first. One that fits nowhere is reported in
    ``lost_capacity``, not raised: the cluster keeps serving what it can."""
    gone = current.node(lost)
    survivors = [n for n in current.nodes if n.node.name != lost]
    nodes = [n.node for n in survivors]
    placed = [list(n.replicas) for n in survivors]
    free = [n.free for n in survivors]
    moved: dict[str, str] = {}
    lost_capacity: dict[str, str] = {}
    for r in sorted(gone.replicas, key=lambda r: (-r.cores, r.model)):
        holders = {i for i, p in enumerate(placed) if any(x.model == r.model for x in p)}
        w = _Want(r.spec, r.cores, 1, _gpu_index(r.spec), r.labels)
        i = _best_node(w, nodes, free, holders)
        if i is None:
            had = len(holders) + 1
            lost_capacity[r.model] = (f"{len(holders)} of {had} replicas left; "
                                      f"{_why_not(w, nodes, free, holders)}")
            continue
        free[i] -= r.cores
        placed[i].append(replace(r, node=nodes[i].name))
        moved[r.model] = nodes[i].name
    new = ClusterPlan(tuple(NodePlan(n, tuple(p)) for n, p in zip(nodes, placed)))
    return Replan(new, moved, lost_capacity)


# -- what a model needs ------------------------------------------------------------------------

def _models(config: Any) -> tuple[dict[str, ModelSpec], dict[str, float | None], dict[str, float]]:
    from ..config import Config

    if isinstance(config, Config):
        specs = {name: m.spec for name, m in config.models.items()}
        slo = {name: float(m.slo["latency_ms"]) for name, m in config.models.items() if m.slo}
        return specs, config.demand(), slo
    if isinstance(config, Iterable) and not isinstance(config, (str, bytes, Mapping)):
        specs = {}
        for s in config:
            if not isinstance(s, ModelSpec):
                raise QuotaError(f"plan: give an apportion.Config or ModelSpecs, got a {type(s).__name__} "
                                 f"in the sequence", field="config")
            if s.name in specs:
                raise QuotaError("plan: two specs have this name", model=s.name, field="name")
            specs[s.name] = s
        if specs:
            return specs, {}, {}
    raise QuotaError(f"plan: give an apportion.Config or a non-empty sequence of ModelSpec, got {config!r}",
                     field="config")


def _replica_counts(replicas: int | Mapping[str, int], specs: Mapping[str, ModelSpec]) -> dict[str, int]:
    def check(model: str | None, v: object) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise QuotaError(f"give an integer >= 1, got {v!r}", model=model, field="replicas")
        return v

    if isinstance(replicas, Mapping):
        for m in replicas:
            if m not in specs:
                raise QuotaError(f"plan: replicas names {m!r}, which is not a model of the config "
                                 f"(models: {list(specs)})", model=m, field="replicas")
        return {m: check(m, replicas.get(m, 1)) for m in specs}
    n = check(None, replicas)
    return {m: n for m in specs}


def _spec_cores(spec: ModelSpec) -> int:
    c = spec.cores
    if isinstance(c, int):
        return c
    if isinstance(c, str):
        return len(parse_cpulist(c))
    if isinstance(c, tuple):
        return len(c)
    return spec.instances * (spec.threads or 1)


def _gpu_index(spec: ModelSpec) -> int | None:
    if spec.gpu is None:
        return None
    d = spec.gpu.device
    return int(d.removeprefix("cuda:")) if isinstance(d, str) else int(d)


def _want(spec: ModelSpec, replicas: int, cost: CostModel | None, demand: float | None, slo_ms: float | None,
          largest: int, n_nodes: int, labels: Mapping[str, str]) -> _Want:
    gpu = _gpu_index(spec)
    if cost is None or demand is None:
        cores = _spec_cores(spec)
        if isinstance(spec.cores, (str, tuple)):
            # A CPU list names CPUs of one host; each node's runtime takes a count of its own.
            spec = replace(spec, cores=cores)
        return _Want(spec, cores, replicas, gpu, labels)
    threads = (spec.threads,) if spec.threads else tuple(t for t in _THREAD_CHOICES if t <= max(1, largest))
    batches = (1, spec.batching.max_size) if spec.batching is not None and spec.batching.max_size > 1 else (1,)
    r = replicas
    while True:
        need = Need(spec.name, cost, demand=demand / r, slo_ms=slo_ms, threads=threads, batches=batches)
        found = _fewest_cores(need, largest)
        if found is not None:
            cores, shape = found
            return _Want(_shaped(spec, cores, shape), cores, r, gpu, labels)
        if r >= n_nodes:
            break
        r += 1
    best = need.shapes(largest)
    if not best:
        raise ClusterPlacementError(
            f"no shape meets its SLO of {slo_ms:g} ms (the cost model predicts a p99 of "
            f"{need.p99_ms(Shape(max(threads), 1)):.3g} ms at best); relax slo.latency_ms",
            model=spec.name, needed=0, available=largest)
    per = best[0]
    core_ms = cost.core_ms(per.threads, per.batch)
    needed = math.ceil(demand / r * core_ms / (1000.0 * RHO) - 1e-9)
    raise ClusterPlacementError(
        f"serving {demand:g} requests/s within {slo_ms:g} ms needs {needed} cores per replica even over "
        f"{r} replicas (one per node), but the largest node has {largest} (short by {needed - largest} "
        f"per replica)", model=spec.name, needed=needed, available=largest)


def _fewest_cores(need: Need, largest: int) -> tuple[int, Shape] | None:
    assert need.demand is not None
    for c in range(1, largest + 1):
        served, shape = need.served(c)
        if shape is not None and served >= need.demand * (1 - 1e-9):
            return c, shape
    return None


def _shaped(spec: ModelSpec, cores: int, shape: Shape) -> ModelSpec:
    from ..batching import Batching, users_single

    instances = max(1, cores // shape.threads)
    batching = None
    if shape.batch > 1:
        batching = users_single(Batching(max_size=shape.batch, max_delay_ms=shape.delay_ms), spec.batching)
    isolation = spec.isolation
    return replace(spec, cores=cores if isolation != "shared" else None, instances=instances,
                   threads=shape.threads, batching=batching)


# -- where it goes -----------------------------------------------------------------------------

def _eligible(w: _Want, node: Node) -> bool:
    if w.gpu is not None and w.gpu >= node.gpus:
        return False
    if isinstance(w.spec.numa, int) and w.spec.numa >= node.numa_nodes:
        return False
    return all(node.labels.get(k) == v for k, v in w.labels.items())


def _best_node(w: _Want, nodes: Sequence[Node], free: Sequence[int], holders: set[int]) -> int | None:
    best, best_left = None, None
    for i, node in enumerate(nodes):
        left = free[i] - w.cores
        if left < 0 or i in holders or (best_left is not None and left >= best_left):
            continue
        if _eligible(w, node):
            best, best_left = i, left
            if left == 0:
                break
    return best


def _why_not(w: _Want, nodes: Sequence[Node], free: Sequence[int], holders: set[int]) -> str:
    eligible = [i for i, n in enumerate(nodes) if _eligible(w, n)]
    if not eligible:
        if not nodes:
            return "no node is left in the cluster"
        need = [f"GPU {w.gpu}"] if w.gpu is not None else []
        need += [f"NUMA node {w.spec.numa}"] if isinstance(w.spec.numa, int) else []
        need += [f"label {k}={v}" for k, v in w.labels.items()]
        return f"no node has {' and '.join(need)}" if need else "no node can hold it"
    open_ = [i for i in eligible if i not in holders]
    if not open_:
        return (f"every node it may use ({len(eligible)}) already holds one of its replicas; add nodes or "
                f"lower its replicas")
    most = max(free[i] for i in open_)
    return (f"a replica needs {w.cores} cores; the most free on a node without one of its replicas is "
            f"{most} (short by {w.cores - most})")


def _no_room(w: _Want, k: int, nodes: Sequence[Node], free: Sequence[int], holders: set[int]) -> ClusterPlacementError:
    open_ = [free[i] for i, n in enumerate(nodes) if _eligible(w, n) and i not in holders]
    available = max(open_) if open_ else 0
    reason = _why_not(w, nodes, free, holders)
    needed = w.cores if open_ else 0
    return ClusterPlacementError(f"replica {k + 1} of {w.replicas} does not fit: {reason}",
                                 model=w.spec.name, needed=needed, available=available if open_ else needed)
