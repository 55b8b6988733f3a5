"""The machine as apportion sees it: CPUs, physical cores, SMT siblings, packages, NUMA nodes,
L3 domains, hybrid core kinds and the CPUs this process may use.

``topology()`` reads Linux sysfs under a root path ("/" for this machine; tests point it at
the fake trees in tests/fixtures/topology). Only CPUs that are online *and* in the process's
allowed set (``sched_getaffinity``, which already reflects the cgroup cpuset) are ``usable``;
placement never hands out any other CPU. For a root other than "/", the allowed set is the
intersection of ``proc/self/status`` ``Cpus_allowed_list`` and cgroup v2
``sys/fs/cgroup/cpuset.cpus.effective`` under that root, whichever exist (every CPU when neither).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _core

__all__ = [
    "Core",
    "CoreKind",
    "Cpu",
    "L3Domain",
    "NumaNode",
    "Package",
    "Topology",
    "format_cpulist",
    "parse_cpulist",
    "topology",
]

CoreKind = Literal["performance", "efficiency", "unknown"]


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-3,8"`` -> ``(0, 1, 2, 3, 8)``. Raises ValueError naming the bad token."""
    return tuple(_core.parse_cpulist(text))


def format_cpulist(cpus: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"`` (the kernel's cpulist format)."""
    return str(_core.format_cpulist(list(cpus)))


@dataclass(frozen=True, slots=True)
class Cpu:
    """One logical CPU (hardware thread). Offline CPUs have ``core``, ``package`` and ``l3`` -1."""

    id: int
    core: int
    package: int
    node: int
    l3: int
    kind: CoreKind
    online: bool
    allowed: bool

    @property
    def usable(self) -> bool:
        return self.online and self.allowed


@dataclass(frozen=True, slots=True)
class Core:
    """One physical core: ``cpus`` are its online SMT siblings, ``usable`` those this process may use."""

    index: int
    package: int
    die: int
    core_id: int
    node: int
    l3: int
    kind: CoreKind
    cpus: tuple[int, ...]
    usable: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Package:
    id: int
    cpus: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NumaNode:
    id: int
    memory_bytes: int
    """MemTotal of the node; 0 when the tree does not say."""
    cpus: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class L3Domain:
    """CPUs sharing one L3 cache. Without cache information: one domain per package (``id`` -1)."""

    index: int
    id: int
    size_bytes: int
    cpus: tuple[int, ...]


def _kind(kind: _core.CoreKind) -> CoreKind:
    return kind.name  # type: ignore[return-value]  # the members are the Literal's words


def _lists(x: Any) -> Any:
    """Tuples as lists, recursively (plain JSON shapes)."""
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n else "memory unknown"


def _mib(n: int) -> str:
    return f"{n // (1 << 20)} MiB" if n >= 1 << 20 else (f"{n // 1024} KiB" if n else "size unknown")


@dataclass(frozen=True)
class Topology:
    """A snapshot of the machine. Immutable; safe to share between threads."""

    root: str
    cpus: tuple[Cpu, ...]
    cores: tuple[Core, ...]
    packages: tuple[Package, ...]
    nodes: tuple[NumaNode, ...]
    l3_domains: tuple[L3Domain, ...]
    online: tuple[int, ...]
    offline: tuple[int, ...]
    allowed: tuple[int, ...]
    usable: tuple[int, ...]
    hybrid: bool
    _native: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def _from_native(cls, native: _core.Topology) -> Topology:
        return cls(
            root=native.root,
            cpus=tuple(Cpu(c.id, c.core, c.package, c.node, c.l3, _kind(c.kind), c.online, c.allowed)
                       for c in native.cpus),
            cores=tuple(
                Core(c.index, c.package, c.die, c.core_id, c.node, c.l3, _kind(c.kind), tuple(c.cpus),
                     tuple(c.usable))
                for c in native.cores
            ),
            packages=tuple(Package(p.id, tuple(p.cpus)) for p in native.packages),
            nodes=tuple(NumaNode(n.id, n.memory_bytes, tuple(n.cpus)) for n in native.nodes),
            l3_domains=tuple(L3Domain(x.index, x.id, x.size_bytes, tuple(x.cpus)) for x in native.l3_domains),
            online=tuple(native.online),
            offline=tuple(native.offline),
            allowed=tuple(native.allowed),
            usable=tuple(native.usable),
            hybrid=native.hybrid,
            _native=native,
        )

    def cpu(self, cpu_id: int) -> Cpu:
        """The CPU with this id; KeyError when it is not present."""
        for c in self.cpus:
            if c.id == cpu_id:
                return c
        raise KeyError(f"CPU {cpu_id} is not present on this machine")

    @property
    def usable_cores(self) -> tuple[Core, ...]:
        """Physical cores with at least one usable CPU."""
        return tuple(c for c in self.cores if c.usable)

    @property
    def threads_per_core(self) -> int:
        """Most usable SMT siblings on one core (1 without SMT)."""
        return max((len(c.usable) for c in self.cores), default=0)

    def restricted_to(self, cpus: Iterable[int] | str) -> Topology:
        """A copy that may use only ``cpus`` (ids or a cpulist string) of what is allowed now.
        Raises ValueError when that leaves no usable CPU (none named, or each one offline or
        not allowed to this process), naming which."""
        ids = parse_cpulist(cpus) if isinstance(cpus, str) else tuple(cpus)
        out = Topology._from_native(self._native.restricted_to(list(ids)))
        if not out.usable:
            if not ids:
                raise ValueError("names no CPU")
            offline = sorted(set(ids) & set(self.offline))
            barred = sorted(set(ids) - set(self.offline) - set(self.allowed))
            why = "; ".join(part for part in (
                f"offline: {format_cpulist(offline)}" if offline else "",
                f"not allowed to this process: {format_cpulist(barred)}" if barred else "") if part)
            named = f"CPUs {format_cpulist(sorted(set(ids)))} leave" if len(set(ids)) > 1 else f"CPU {ids[0]} leaves"
            raise ValueError(f"{named} no usable CPU ({why or 'none is usable'}); this process may use "
                             f"{format_cpulist(self.usable) or 'none'}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable structure (what ``apportion topology --json`` prints)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_native"}
        for key in ("cpus", "cores", "packages", "nodes", "l3_domains"):
            d[key] = [dataclasses.asdict(x) for x in d[key]]
        d["threads_per_core"] = self.threads_per_core
        return _lists(d)

    def __str__(self) -> str:
        usable_cores = self.usable_cores
        lines = [
            f"topology of {self.root}: {len(self.usable)} usable CPUs ({format_cpulist(self.usable) or 'none'})"
            f" of {len(self.cpus)} present",
            f"  {len(self.packages)} package(s), {len(self.nodes)} NUMA node(s), {len(self.l3_domains)} L3"
            f" domain(s), {len(usable_cores)} usable physical cores, up to {self.threads_per_core}"
            f" thread(s) per core",
        ]
        if self.offline:
            lines.append(f"  offline: {format_cpulist(self.offline)}")
        not_allowed = sorted(set(self.online) - set(self.allowed))
        if not_allowed:
            lines.append(f"  not allowed to this process: {format_cpulist(not_allowed)}")
        if self.hybrid:
            for kind in ("performance", "efficiency"):
                ids = [c for core in usable_cores if core.kind == kind for c in core.usable]
                lines.append(f"  {kind} cores: {sum(1 for c in usable_cores if c.kind == kind)}"
                             f" (CPUs {format_cpulist(ids) or 'none'})")
        usable = set(self.usable)
        for node in self.nodes:
            node_usable = [c for c in node.cpus if c in usable]
            lines.append(f"  node {node.id}: {_gib(node.memory_bytes)}, usable CPUs "
                         f"{format_cpulist(node_usable) or 'none'}")
            in_node = set(node_usable)
            for dom in self.l3_domains:
                dom_usable = [c for c in dom.cpus if c in in_node]
                if not dom_usable:
                    continue
                ncores = sum(1 for core in usable_cores if core.l3 == dom.index and core.node == node.id)
                lines.append(f"    L3 {dom.index} ({_mib(dom.size_bytes)}): {ncores} cores, CPUs "
                             f"{format_cpulist(dom_usable)}")
        return "\n".join(lines)


def topology(root: str = "/", *, cpus: Iterable[int] | str | None = None) -> Topology:
    """Read the machine under ``root``; ``cpus`` narrows the usable set (as ``Runtime(cpus=...)``).

    Raises RuntimeError naming the file when the tree is malformed.
    """
    topo = Topology._from_native(_core.read_topology(root))
    return topo if cpus is None else topo.restricted_to(cpus)
