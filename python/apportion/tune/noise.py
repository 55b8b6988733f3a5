"""How far a tune run's measurements can be trusted: what other processes took from the
machine while it measured, how much repeated estimates of the same thing moved, and the
confidence the two give the plan. Pure: :func:`parse_proc_stat` reads text, the rest
numbers; :mod:`.measure` takes the snapshots."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .._private.cputime import parse_proc_stat
from .cost import Sample

__all__ = ["CONFIDENCES", "Confidence", "HostSnapshot", "Noise", "combine_repeats", "parse_proc_stat",
           "profile_spread"]

Confidence = Literal["high", "medium", "low"]
CONFIDENCES: tuple[str, ...] = ("high", "medium", "low")

FOREIGN_NOTICED = 0.15
"""CPUs of other processes' work (mean over the search) from which the report names the noise."""
FOREIGN_LOW = 0.5
"""... and from which the plan's confidence is low: half a CPU is a large part of a small host."""
STEAL_NOTICED = 0.05
"""CPUs of steal time (mean over the search) from which the report names it apart."""
SPREAD_NOTICED = 0.10
"""Spread between repeats of one estimate from which it is called noisy."""
SPREAD_LOW = 0.25


@dataclass(frozen=True)
class HostSnapshot:
    """Cumulative CPU time at one moment: ``busy_s`` of every CPU this process may use (all
    processes' user, system, irq and steal time), ``own_s`` of this process (every thread;
    a model's process-isolated instances are child processes and count as other work),
    ``steal_s`` of those CPUs (the hypervisor ran another machine while this one wanted
    them: part of ``busy_s``, and of what :meth:`foreign_cpus` counts)."""

    wall_s: float
    busy_s: float
    own_s: float
    cpus: int
    steal_s: float = 0.0

    def steal_cpus(self, earlier: HostSnapshot) -> float:
        """Mean number of CPUs the hypervisor took between ``earlier`` and this snapshot."""
        wall = self.wall_s - earlier.wall_s
        if wall <= 0:
            return 0.0
        return min(float(self.cpus), max(0.0, (self.steal_s - earlier.steal_s) / wall))

    def foreign_cpus(self, earlier: HostSnapshot) -> float:
        """Mean number of CPUs that other processes kept busy between ``earlier`` and this
        snapshot (never below 0: the two clocks tick at different rates)."""
        wall = self.wall_s - earlier.wall_s
        if wall <= 0:
            return 0.0
        other = (self.busy_s - earlier.busy_s) - (self.own_s - earlier.own_s)
        return min(float(self.cpus), max(0.0, other / wall))


def _key(s: Sample) -> tuple[int, int]:
    return (s.threads, s.batch)


def profile_spread(samples: Iterable[Sample]) -> dict[tuple[int, int], float]:
    """For each profiled shape (threads, batch) measured more than once: how far the repeats'
    call times spread, (max - min) / median."""
    groups: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        groups.setdefault(_key(s), []).append(s.call_ms)
    return {k: (max(v) - min(v)) / statistics.median(v) for k, v in groups.items()
            if len(v) > 1 and statistics.median(v) > 0}


def combine_repeats(samples: Sequence[Sample]) -> list[Sample]:
    """One sample per shape: the repeat with the median call time (an outlier repeat, e.g. a
    window when another process took the CPU, moves the median least)."""
    groups: dict[tuple[int, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault(_key(s), []).append(s)
    return [sorted(g, key=lambda s: s.call_ms)[(len(g) - 1) // 2] for g in groups.values()]


@dataclass(frozen=True)
class Noise:
    """What a tune run saw of the machine: ``foreign_cpus`` (mean CPUs other processes kept
    busy over the whole search; None where /proc/stat is not readable), ``foreign_peak`` (the
    most over any one measurement run), ``cpus`` (CPUs the runtime may use), ``spreads``
    (per model and profiled shape, how far repeated estimates moved), ``unstable`` (runs
    whose windows never agreed within the load tolerance), ``steal_cpus`` (of
    ``foreign_cpus``, the mean the hypervisor took: another machine on the same host)."""

    cpus: int
    foreign_cpus: float | None = None
    foreign_peak: float | None = None
    spreads: Mapping[str, Mapping[tuple[int, int], float]] | None = None
    unstable: tuple[str, ...] = ()
    steal_cpus: float | None = None

    def worst_spread(self) -> tuple[str, tuple[int, int], float] | None:
        worst = None
        for model, per in (self.spreads or {}).items():
            for shape, v in per.items():
                if worst is None or v > worst[2]:
                    worst = (model, shape, v)
        return worst

    def confidence(self, winner_stable: bool = True) -> Confidence:
        """``high``: the machine was quiet, repeats agreed and the winner's validation was
        stable; ``low``: other processes took half a CPU or more, a repeated estimate moved by
        more than 25%, or the winner's validation never settled; ``medium`` between."""
        foreign = max(self.foreign_cpus or 0.0, 0.0)
        worst = self.worst_spread()
        spread = worst[2] if worst else 0.0
        if foreign >= FOREIGN_LOW or spread > SPREAD_LOW or not winner_stable:
            return "low"
        if foreign >= FOREIGN_NOTICED or spread > SPREAD_NOTICED or self.unstable:
            return "medium"
        return "high"

    def capacity(self) -> float:
        """The fraction of the CPUs a plan can count on beside the other processes' work: the
        OS shares the CPUs between runnable threads, so ``cpus`` busy threads of a saturated
        plan beside ``foreign_cpus`` of theirs get about cpus / (cpus + foreign_cpus) of them
        (what the others took while the tuner's own load was light overstates what they keep
        under contention)."""
        foreign = self.foreign_cpus
        if not foreign or self.cpus <= 0:
            return 1.0
        return self.cpus / (self.cpus + foreign)

    def noisy(self) -> bool:
        worst = self.worst_spread()
        return ((self.foreign_cpus or 0.0) >= FOREIGN_NOTICED or (worst is not None and worst[2] > SPREAD_NOTICED)
                or bool(self.unstable))

    def describe(self) -> str:
        """The noise in words ("" on a quiet machine)."""
        parts = []
        if self.foreign_cpus is not None and self.foreign_cpus >= FOREIGN_NOTICED:
            peak = (f", up to {self.foreign_peak:.1f} during one run"
                    if self.foreign_peak is not None and self.foreign_peak > self.foreign_cpus + 0.05 else "")
            steal = self.steal_cpus or 0.0
            by = (f" ({steal:.1f} of them taken by the hypervisor for other machines: steal time)"
                  if steal >= STEAL_NOTICED else "")
            parts.append(f"other processes kept {self.foreign_cpus:.1f} of {self.cpus} CPUs busy on average "
                         f"while the tuner measured{peak}{by}")
        worst = self.worst_spread()
        if worst is not None and worst[2] > SPREAD_NOTICED:
            model, (t, b), v = worst
            shape = f"t={t}" + (f" b<={b}" if b > 1 else "")
            parts.append(f"repeated profiles moved by up to {v:.0%} ({model} {shape})")
        unsettled = ""
        if self.unstable:
            shown = ", ".join(f"'{u}'" for u in self.unstable[:3])
            more = f" and {len(self.unstable) - 3} more" if len(self.unstable) > 3 else ""
            unsettled = f"{len(self.unstable)} measurement run(s) never settled ({shown}{more})"
        if parts:
            return "Noisy machine: " + "; ".join([*parts, *([unsettled] if unsettled else [])]) + "."
        if unsettled:
            # No other process took a noticeable share and repeated profiles agreed: the windows
            # moved with the plans' own load (a plan at or past its capacity queues, refuses and
            # expires more from one window to the next), which says nothing of the machine.
            return (f"Unsettled measurements on a quiet machine: {unsettled}; no other process took a noticeable "
                    "share of the CPUs and repeated profiles agreed, so the windows moved with the plans' own "
                    "load (as near or past a plan's capacity).")
        return ""
