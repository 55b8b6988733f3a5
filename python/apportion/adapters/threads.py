"""Which threads a model runs on, read from /proc: the runtime's confinement check."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..topology import format_cpulist, parse_cpulist

__all__ = ["ThreadInfo", "check_confinement", "model_threads"]


@dataclass(frozen=True, slots=True)
class ThreadInfo:
    tid: int
    name: str
    cpus: tuple[int, ...]


def _threads() -> list[ThreadInfo]:
    out = []
    base = "/proc/self/task"
    for tid in sorted(os.listdir(base), key=int):
        try:
            with open(f"{base}/{tid}/status") as fh:
                status = fh.read()
        except FileNotFoundError:  # exited while we looked
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out.append(ThreadInfo(int(tid), fields["Name"].strip(),
                              parse_cpulist(fields["Cpus_allowed_list"].strip())))
    return out


def model_threads(model: str) -> list[ThreadInfo]:
    """Every thread of this process that belongs to ``model``: its workers and every thread they
    created (Linux copies a thread's name to the threads it creates, and workers are named
    ``ap:<model>:<instance>``, the model truncated to fit 15 bytes)."""
    prefix = f"ap:{model}"
    out = []
    for t in _threads():
        if not t.name.startswith("ap:"):
            continue
        head = t.name.rsplit(":", 1)[0]
        if prefix.startswith(head) if len(t.name) == 15 else head == prefix:
            out.append(t)
    return out


def check_confinement(model: str, cpus: Iterable[int]) -> list[str]:
    """Problems found: each thread of ``model`` allowed on a CPU outside ``cpus``."""
    allowed = set(cpus)
    return [
        f"thread {t.tid} ({t.name}) of model {model!r} may run on CPUs "
        f"{format_cpulist(set(t.cpus) - allowed)} outside its set {format_cpulist(allowed)}"
        for t in model_threads(model)
        if not set(t.cpus) <= allowed
    ]
