"""Quotas (the CPU side) and plans: which cores, threads and NUMA memory each model gets.

``Quota`` validates every field when it is built, before any C++ call; each error is a
:class:`~apportion.errors.QuotaError` that names the model and the field and says what is valid.
``plan(models, topology)`` places the quotas with the native planner (pure and deterministic):
a request this machine can never satisfy (an unknown NUMA node, a CPU that is offline, more
cores than exist) is a ``QuotaError``; valid requests that do not fit together are a
:class:`~apportion.errors.PlacementError` that says what is left. Both carry ``.model`` and
``.field``.

Semantics (see csrc/apportion/placement.hpp for the exact rules):

- ``cores`` counts *physical* cores, or names logical CPUs explicitly ("0-3,8").
- ``smt=True`` lets the model also run on its cores' SMT siblings; with ``smt=False`` an
  exclusive model's siblings stay idle so no other model shares its cores.
- exclusive models take whole free cores inside one L3 domain when they fit, else one NUMA node,
  else the fewest domains; shared models run on what no exclusive model holds (the shared pool).
- ``instances`` split the model's cores into contiguous, near-equal runs; ``threads`` (default:
  one per CPU of the instance) may not exceed an instance's CPUs without ``oversubscribe=True``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeGuard

from . import _core, _table
from .errors import PlacementError, QuotaError
from .topology import Topology, format_cpulist, left_out_for, parse_cpulist
from .topology import topology as read_topology

__all__ = ["InstancePlan", "ModelPlan", "Plan", "Quota", "plan"]

Isolation = Literal["exclusive", "shared"]
MemoryPolicy = Literal["bind", "prefer", "none"]

_ISOLATIONS = tuple(_core.Isolation.__members__)
_MEMORY_POLICIES = tuple(_core.MemoryPolicy.__members__)


def _quota_error(model: str, field_name: str, message: str) -> QuotaError:
    return QuotaError(message, model=model, field=field_name)


_MAX_COUNT = 1 << 16
"""Bound of CPU counts, CPU ids, threads and NUMA node ids: past any machine's, within every
native integer."""


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, but cores=True is a mistake, not a count of one. Any integral
    # type (numpy's) is taken, as the spec's other counts are, and stored as an int.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Quota:
    """The CPU side of one model's quota.

    ``cores``: a count of physical cores, an explicit CPU list (``"0-3,8"`` or a sequence of ids),
    or None (shared models only: the whole shared pool). ``numa``: a node id or ``"auto"``.
    """

    name: str
    cores: int | str | Sequence[int] | None = None
    instances: int = 1
    threads: int | None = None
    isolation: Isolation = "shared"
    numa: int | Literal["auto"] = "auto"
    smt: bool = False
    memory_policy: MemoryPolicy = "bind"
    oversubscribe: bool = False
    cpus: tuple[int, ...] | None = field(init=False, default=None)
    """The explicit CPU list parsed from ``cores``, or None when ``cores`` is a count."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _quota_error(str(self.name), "name", "give a non-empty string")
        check_encodable_name(self.name)
        name = self.name
        cores = self.cores
        if cores is None:
            if self.isolation == "exclusive":
                raise _quota_error(name, "cores", 'isolation="exclusive" needs cores: a count >= 1 or a CPU '
                                   'list like "0-3,8"')
        elif isinstance(cores, str):
            try:
                ids = parse_cpulist(cores)
            except ValueError as e:
                raise _quota_error(name, "cores", f'{cores!r} is not a CPU list ({e}); give a count >= 1 or '
                                   'a list like "0-3,8"') from None
            if not ids:
                raise _quota_error(name, "cores", 'the CPU list is empty; give a count >= 1 or a list like "0-3,8"')
            object.__setattr__(self, "cpus", ids)
        elif _is_int(cores):
            if not 1 <= cores <= _MAX_COUNT:
                raise _quota_error(name, "cores", f"got {cores}; give a count in [1, {_MAX_COUNT}] of "
                                   'physical cores (or a CPU list like "0-3,8")')
            cores = int(cores)
            object.__setattr__(self, "cores", cores)
        elif isinstance(cores, Sequence) and not isinstance(cores, (bytes, bytearray)):
            if not cores or not all(_is_int(c) and 0 <= c < _MAX_COUNT for c in cores):
                raise _quota_error(name, "cores", f"got {list(cores)!r}; a CPU list needs CPU ids in "
                                   f"[0, {_MAX_COUNT})")
            object.__setattr__(self, "cpus", tuple(sorted({int(c) for c in cores})))
        else:
            raise _quota_error(name, "cores", f"got {cores!r} ({type(cores).__name__}); give an integer "
                               'count >= 1 or a CPU list like "0-3,8"')

        if not _is_int(self.instances) or self.instances < 1:
            raise _quota_error(name, "instances", f"got {self.instances!r}; give an integer >= 1")
        if self.threads is not None and (not _is_int(self.threads) or not 1 <= self.threads <= _MAX_COUNT):
            raise _quota_error(name, "threads", f"got {self.threads!r}; give an integer in [1, {_MAX_COUNT}] "
                               "or None (one per CPU of the instance)")
        if self.isolation not in _ISOLATIONS:
            raise _quota_error(name, "isolation", f'got {self.isolation!r}; give "exclusive" or "shared"')
        if self.numa != "auto" and (not _is_int(self.numa) or not 0 <= self.numa < _MAX_COUNT):
            raise _quota_error(name, "numa", f'got {self.numa!r}; give a node id in [0, {_MAX_COUNT}) or "auto"')
        for fld in ("instances", "threads", "numa"):  # numpy's integers as ints
            v = getattr(self, fld)
            if _is_int(v) and type(v) is not int:
                object.__setattr__(self, fld, int(v))
        for flag in ("smt", "oversubscribe"):
            if not isinstance(getattr(self, flag), bool):
                raise _quota_error(name, flag, f"got {getattr(self, flag)!r}; give True or False")
        if self.memory_policy not in _MEMORY_POLICIES:
            raise _quota_error(name, "memory_policy", f'got {self.memory_policy!r}; give "bind", "prefer" or "none"')

        # What can be known without the machine: with smt=False an instance has at most
        # ceil(cores / instances) CPUs, one per core. The planner checks the exact count.
        if self.threads is not None and not self.oversubscribe:
            if self.cpus is not None:
                per_instance = math.ceil(len(self.cpus) / self.instances)
                if self.threads > per_instance:
                    raise _quota_error(name, "threads", f"threads={self.threads} per instance but the CPU list "
                                       f"gives each of {self.instances} instance(s) at most {per_instance} CPU(s); "
                                       "use fewer threads, more CPUs, or oversubscribe=True")
            elif _is_int(cores) and not self.smt:
                per_instance = math.ceil(cores / self.instances)
                if self.threads > per_instance:
                    raise _quota_error(name, "threads", f"threads={self.threads} per instance but cores={cores} "
                                       f"over {self.instances} instance(s) gives at most {per_instance} core(s) "
                                       "each; use threads <= cores per instance, smt=True (sibling threads) "
                                       "or oversubscribe=True")

    def _native(self, oversubscribe: bool = False) -> Any:
        """The planner's quota; ``oversubscribe`` (or this quota's own) lets its instances
        outnumber its CPUs."""
        return _core.Quota(
            name=self.name,
            cores=self.cores if _is_int(self.cores) else 0,
            cpus=list(self.cpus or ()),
            instances=self.instances,
            threads=self.threads or 0,
            isolation=self.isolation,
            numa=-1 if self.numa == "auto" else self.numa,
            smt=self.smt,
            memory_policy=self.memory_policy,
            oversubscribe=self.oversubscribe or oversubscribe,
        )


@dataclass(frozen=True)
class InstancePlan:
    """Where one instance's worker runs: it pins itself to ``cpus`` and binds memory to
    ``memory_nodes`` (per the model's ``memory_policy``) before the factory runs."""

    index: int
    cpus: tuple[int, ...]
    threads: int
    memory_nodes: tuple[int, ...]


@dataclass(frozen=True)
class ModelPlan:
    name: str
    isolation: Isolation
    memory_policy: MemoryPolicy
    cpus: tuple[int, ...]
    reserved: tuple[int, ...]
    """SMT siblings held idle for an exclusive model with ``smt=False``."""
    cores: int
    locality: Literal["l3", "node", "machine"]
    order: int
    """Position in the planner's placement order."""
    instances: tuple[InstancePlan, ...]


@dataclass(frozen=True)
class Plan:
    """Who got which CPUs, threads and memory nodes. Printable; ``to_dict()`` for JSON."""

    models: tuple[ModelPlan, ...]
    shared_pool: tuple[int, ...]
    usable: tuple[int, ...]
    topology: Topology = field(repr=False, compare=False)
    gpu: Any = field(default=None, compare=False)
    """The GPU side (an apportion.gpu.GpuPlan) when models have GPU quotas."""

    def __getitem__(self, name: str) -> ModelPlan:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.topology.root,
            "models": [asdict(m) for m in self.models],
            "shared_pool": list(self.shared_pool),
            "usable": list(self.usable),
        }

    def __str__(self) -> str:
        quota = self.topology.cpu_quota
        limited = f" (cgroup CPU quota {quota.cpus:g})" if quota is not None and quota.narrowed_from else ""
        header = (f"plan on {self.topology.root}: {len(self.usable)} usable CPUs{limited}, shared pool "
                  f"{format_cpulist(self.shared_pool) or 'empty'} ({len(self.shared_pool)} CPUs)")
        columns = ("model", "isolation", "cores", "cpus", "locality", "instances (cpus x threads)", "memory")
        rows = []
        for m in self.models:
            cpus = format_cpulist(m.cpus) + (f" (+{format_cpulist(m.reserved)} idle)" if m.reserved else "")
            inst = "  ".join(f"#{i.index} {format_cpulist(i.cpus)} x{i.threads}" for i in m.instances)
            nodes = sorted({n for i in m.instances for n in i.memory_nodes})
            memory = "none" if m.memory_policy == "none" else f"{m.memory_policy} node {','.join(map(str, nodes))}"
            rows.append((m.name, m.isolation, str(m.cores), cpus, m.locality, inst, memory))
        lines = [header] + ["  " + line for line in _table.text(columns, rows, left=len(columns))]
        if self.gpu is not None:
            lines.append(str(self.gpu))
        return "\n".join(lines)


def check_encodable_name(name: str) -> None:
    """Raises QuotaError (field ``name``) for a model name with a lone surrogate: no bytes
    name it, and the engine's names are UTF-8."""
    try:
        name.encode()
    except UnicodeEncodeError:
        raise QuotaError(f"give a name of Unicode characters, got {name!r} (a lone surrogate cannot be "
                         "encoded)", field="name") from None


def _floating(q: Quota) -> bool:
    # A shared model without a core count floats on the whole shared pool: each instance may run
    # on any pool CPU and the OS balances them, so more instances than pool CPUs is no
    # oversubscription of anything the model asked for. (Said to the planner, not by a copy of
    # the quota: a copy per model per plan was most of an add_model among hundreds of models.)
    return q.isolation == "shared" and q.cores is None


def _quota(fields_: Mapping[str, Any]) -> Quota:
    """A Quota from a mapping of its fields; a key it lacks is a QuotaError naming the model and
    the key (not Quota's TypeError)."""
    allowed = [f.name for f in fields(Quota) if f.init]
    name = fields_.get("name")
    for key in fields_:
        if key not in allowed:
            raise QuotaError(f"unknown key {key!r}; allowed: {', '.join(allowed)}",
                             model=name if isinstance(name, str) else None, field=str(key))
    if "name" not in fields_:
        raise QuotaError(f"a model's fields need its name (got keys {sorted(map(str, fields_))}); give a "
                         "mapping of name -> fields, or include name", field="name")
    return Quota(**dict(fields_))


def _coerce(models: Iterable[Quota | Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]) -> list[Quota]:
    if isinstance(models, Mapping):
        return [_quota({"name": name, **dict(kw)}) for name, kw in models.items()]
    return [m if isinstance(m, Quota) else _quota(m) for m in models]


def _why_unusable(topo: Topology, cpus: Sequence[int]) -> str:
    """Why each of ``cpus`` (none of them usable in ``topo``) is not: absent, offline, left out
    for the cgroup's CPU quota, or outside what the runtime (``cpus=``) or the process may use."""
    known = {c.id for c in topo.cpus}
    quota = topo.cpu_quota
    narrowed = set(quota.narrowed_from) if quota is not None else set()
    groups: dict[str, list[int]] = {}
    for c in cpus:
        if c not in known:
            why = "absent from this machine"
        elif c in topo.offline:
            why = "offline"
        elif quota is not None and c in narrowed:
            why = left_out_for(quota)
        else:
            why = "outside the CPUs this runtime (Runtime(cpus=...), [runtime] cpus) or this process may use"
        groups.setdefault(why, []).append(c)
    return "; ".join(f"{format_cpulist(sorted(v))}: {why}" for why, v in groups.items())


def plan(
    models: Iterable[Quota | Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    topology: Topology | None = None,
) -> Plan:
    """Place ``models`` (Quotas, dicts of Quota fields, or ``{name: {field: value}}``) on
    ``topology`` (default: this machine). The same input always gives the same plan, whatever
    the order of ``models``.

    Raises QuotaError or PlacementError naming the model and the field.
    """
    quotas = _coerce(models)
    seen: set[str] = set()
    for q in quotas:
        if q.name in seen:
            raise _quota_error(q.name, "name", "two models use this name; names must be unique")
        seen.add(q.name)
    topo = topology if topology is not None else read_topology()
    try:
        raw = _core.plan_placement(topo._native, [q._native(oversubscribe=_floating(q)) for q in quotas])
    except (QuotaError, PlacementError) as e:
        # The native planner calls an explicit CPU list "cpus"; in this API it is given as `cores`.
        if getattr(e, "field", None) == "cpus":
            text = str(e)
            named = next((x for x in quotas if x.name == getattr(e, "model", None)), None)
            generic = "(offline, absent or outside the allowed set)"
            if named is not None and named.cpus is not None and generic in text:
                bad = [c for c in named.cpus if c not in topo.usable]
                text = text.replace(generic, f"({_why_unusable(topo, bad)})", 1)
            renamed = type(e)(text.replace("field 'cpus'", "field 'cores'", 1))
            renamed.model, renamed.field = e.model, "cores"
            raise renamed from None
        raise
    floating = {q.name: q for q in quotas if _floating(q)}

    def instances(m: Mapping[str, Any]) -> tuple[InstancePlan, ...]:
        q = floating.get(m["name"])
        if q is None:
            return tuple(InstancePlan(i, tuple(x["cpus"]), x["threads"], tuple(x["memory_nodes"]))
                         for i, x in enumerate(m["instances"]))
        # Floating: every instance may run anywhere in the pool; framework threads split it.
        cpus = tuple(m["cpus"])
        threads = q.threads or max(1, len(cpus) // q.instances)
        nodes = tuple(sorted({n for x in m["instances"] for n in x["memory_nodes"]}))
        return tuple(InstancePlan(i, cpus, threads, nodes) for i in range(len(m["instances"])))

    return Plan(
        models=tuple(
            ModelPlan(
                name=m["name"],
                isolation=m["isolation"],
                memory_policy=m["memory_policy"],
                cpus=tuple(m["cpus"]),
                reserved=tuple(m["reserved"]),
                cores=m["cores"],
                locality=m["locality"],
                order=m["order"],
                instances=instances(m),
            )
            for m in raw["models"]
        ),
        shared_pool=tuple(raw["shared_pool"]),
        usable=tuple(raw["usable"]),
        topology=topo,
    )
