"""The machine as apportion sees it: CPUs, physical cores, SMT siblings, packages, NUMA nodes,
L3 domains, hybrid core kinds and the CPUs this process may use.

``topology()`` reads Linux sysfs under a root path ("/" for this machine; tests point it at
the fake trees in tests/fixtures/topology). Only CPUs that are online *and* in the process's
allowed set (``sched_getaffinity``, which already reflects the cgroup cpuset) are ``usable``;
placement never hands out any other CPU. For a root other than "/", the allowed set is the
intersection of ``proc/self/status`` ``Cpus_allowed_list`` and cgroup v2
``sys/fs/cgroup/cpuset.cpus.effective`` under that root, whichever exist (every CPU when neither).

A CPU *quota* (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``: what a
container's CPU limit sets, e.g. Kubernetes ``limits.cpu``) lets the process run on every
allowed CPU but only for so much CPU time per period; beyond it the kernel stops every thread
of the group until the period ends (tens of milliseconds). ``topology()`` reads the tightest
quota on the process's cgroup path (``proc/self/cgroup`` under the root) and, unless ``cpus``
names CPUs, narrows the usable set to ``ceil(quota)`` CPUs (one per physical core first, then
SMT siblings, lower NUMA nodes first) so that pinned workers cannot overrun it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import _core

__all__ = [
    "Core",
    "CoreKind",
    "Cpu",
    "CpuQuota",
    "L3Domain",
    "NumaNode",
    "Package",
    "Topology",
    "format_cpulist",
    "parse_cpulist",
    "read_cpu_quota",
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


@dataclass(frozen=True, slots=True)
class CpuQuota:
    """The tightest cgroup CPU quota on this process's cgroup path.

    ``cpus``: CPU time per period, in CPUs (quota / period; 1.5 = one and a half CPUs busy at
    most). ``source``: the file that set it. ``narrowed_from``: the usable CPUs before
    ``topology()`` narrowed them to ``ceil(cpus)``; empty when it did not (``cpus`` named, or
    the quota covers every usable CPU)."""

    cpus: float
    source: str
    narrowed_from: tuple[int, ...] = ()


def left_out_for(quota: CpuQuota) -> str:
    """Why a CPU is not usable though online and allowed: the cgroup's CPU quota narrowed the
    usable set (see :meth:`Topology.within_quota`), and how to use it anyway."""
    return (f"left out for the cgroup CPU quota of {quota.cpus:g} (name CPUs in the full topology, "
            "topology(cpus=...), to use them anyway)")


def _read_limit(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise RuntimeError(f"cannot read {path}: {e}") from e


def _bad(path: Path, text: str, expected: str) -> RuntimeError:
    return RuntimeError(f"{path}: expected {expected}, got {text!r}")


def _v2_quota(d: Path) -> tuple[float, str] | None:
    path = d / "cpu.max"
    text = _read_limit(path)
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or not parts[1].isdigit() or not (parts[0] == "max" or parts[0].isdigit()):
        raise _bad(path, text, "'max PERIOD' or 'QUOTA PERIOD' (microseconds)")
    if parts[0] == "max" or int(parts[1]) == 0:
        return None
    return int(parts[0]) / int(parts[1]), str(path)


def _v1_quota(d: Path) -> tuple[float, str] | None:
    qpath, ppath = d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"
    quota = _read_limit(qpath)
    if quota is None:
        return None
    if not quota.lstrip("-").isdigit():
        raise _bad(qpath, quota, "an integer (microseconds, -1 for none)")
    if int(quota) < 0:
        return None
    period = _read_limit(ppath)
    if period is None or not period.isdigit() or int(period) == 0:
        raise _bad(ppath, period or "", "a period in microseconds > 0 beside a quota")
    return int(quota) / int(period), str(qpath)


def read_cpu_quota(root: str = "/") -> CpuQuota | None:
    """The tightest CPU quota on this process's cgroup path under ``root`` (the group and each
    of its ancestors, cgroup v2 and v1), or None when there is none or the tree does not say.
    Raises RuntimeError naming the file when one is malformed."""
    base = Path(root)
    listing = base / "proc/self/cgroup"
    text = _read_limit(listing)
    if text is None:
        return None
    best: tuple[float, str] | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise _bad(listing, line, "'ID:CONTROLLERS:PATH' lines")
        controllers, group = parts[1], parts[2]
        if controllers == "":
            mounts, read = [base / "sys/fs/cgroup"], _v2_quota
        elif "cpu" in controllers.split(","):
            mounts = [base / "sys/fs/cgroup" / controllers, base / "sys/fs/cgroup/cpu,cpuacct",
                      base / "sys/fs/cgroup/cpu"]
            read = _v1_quota
        else:
            continue
        mount = next((m for m in mounts if m.is_dir()), None)
        if mount is None:
            continue
        rel = [p for p in group.split("/") if p]
        if ".." in rel:  # outside this cgroup namespace: only its root is visible
            rel = []
        for depth in range(len(rel), -1, -1):
            found = read(mount.joinpath(*rel[:depth]))
            if found is not None and (best is None or found[0] < best[0]):
                best = found
    return None if best is None else CpuQuota(best[0], best[1])


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
    cpu_quota: CpuQuota | None = None
    """The cgroup CPU quota, when one limits this process (see ``topology()``)."""
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
        out = dataclasses.replace(Topology._from_native(self._native.restricted_to(list(ids))),
                                  cpu_quota=self.cpu_quota)
        if not out.usable:
            if not ids:
                raise ValueError("names no CPU")
            offline = sorted(set(ids) & set(self.offline))
            quota = self.cpu_quota
            left_out = sorted(set(ids) & set(quota.narrowed_from) - set(self.usable)) if quota else []
            barred = sorted(set(ids) - set(self.offline) - set(self.allowed) - set(left_out))
            why = "; ".join(part for part in (
                f"offline: {format_cpulist(offline)}" if offline else "",
                f"{left_out_for(quota)}: {format_cpulist(left_out)}" if quota and left_out else "",
                f"not allowed to this process: {format_cpulist(barred)}" if barred else "") if part)
            named = f"CPUs {format_cpulist(sorted(set(ids)))} leave" if len(set(ids)) > 1 else f"CPU {ids[0]} leaves"
            raise ValueError(f"{named} no usable CPU ({why or 'none is usable'}); this process may use "
                             f"{format_cpulist(self.usable) or 'none'}")
        return out

    def within_quota(self, quota: CpuQuota | None) -> Topology:
        """This topology with ``cpu_quota`` set and, when the quota is below the usable CPUs,
        the usable set narrowed to ``ceil(quota)`` of them: one per physical core first (an
        SMT sibling last), lower NUMA nodes and cores first."""
        if quota is None:
            return self if self.cpu_quota is None else dataclasses.replace(self, cpu_quota=None)
        keep = max(1, math.ceil(quota.cpus - 1e-9))
        if keep >= len(self.usable):
            return dataclasses.replace(self, cpu_quota=dataclasses.replace(quota, narrowed_from=()))
        order = sorted(((rank, core.node, core.index, cpu) for core in self.cores
                        for rank, cpu in enumerate(core.usable)))
        chosen = sorted(cpu for *_, cpu in order[:keep])
        return dataclasses.replace(self.restricted_to(chosen),
                                   cpu_quota=dataclasses.replace(quota, narrowed_from=self.usable))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable structure (what ``apportion topology --json`` prints)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_native"}
        for key in ("cpus", "cores", "packages", "nodes", "l3_domains"):
            d[key] = [dataclasses.asdict(x) for x in d[key]]
        if self.cpu_quota is not None:
            d["cpu_quota"] = dataclasses.asdict(self.cpu_quota)
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
        quota = self.cpu_quota
        if quota is not None:
            n = len(self.usable)
            what = (f"usable narrowed from {format_cpulist(quota.narrowed_from)} to {n} CPU{'' if n == 1 else 's'}"
                    if quota.narrowed_from else
                    "CPUs named, not narrowed: workers busy on more CPUs than the quota are throttled"
                    if len(self.usable) > quota.cpus + 1e-9 else "the usable CPUs fit in it")
            lines.append(f"  cgroup CPU quota: {quota.cpus:g} CPUs ({quota.source}); {what}")
        if self.offline:
            lines.append(f"  offline: {format_cpulist(self.offline)}")
        # CPUs left out for the quota are said on its line.
        not_allowed = sorted(set(self.online) - set(self.allowed) - set(quota.narrowed_from if quota else ()))
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

    Without ``cpus``, a cgroup CPU quota below the usable CPUs narrows them to ``ceil(quota)``
    (see the module's text and ``Topology.within_quota``); named ``cpus`` are taken as named.
    Raises RuntimeError naming the file when the tree is malformed.
    """
    topo = Topology._from_native(_core.read_topology(root))
    quota = read_cpu_quota(root)
    if cpus is None:
        return topo.within_quota(quota)
    return dataclasses.replace(topo, cpu_quota=quota).restricted_to(cpus)
