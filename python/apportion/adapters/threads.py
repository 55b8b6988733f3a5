"""Which threads a model runs on, read from /proc: the runtime's confinement check."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..topology import format_cpulist, parse_cpulist

__all__ = ["ThreadInfo", "check_confinement", "model_threads", "worker_name"]


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
            # comm holds the raw name bytes; status escapes some of them.
            with open(f"{base}/{tid}/comm", "rb") as fh:
                name = fh.read().rstrip(b"\n").decode("utf-8", "surrogateescape")
            with open(f"{base}/{tid}/status", "rb") as fh:  # its Name line holds the raw bytes too
                status = fh.read().decode("utf-8", "surrogateescape")
        except (FileNotFoundError, ProcessLookupError):  # exited while we looked
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out.append(ThreadInfo(int(tid), name, parse_cpulist(fields["Cpus_allowed_list"].strip())))
    return out


def worker_name(model: str, instance: int) -> str:
    """The name a worker of ``model`` gives itself: ``ap:<model>:<instance>``, the model cut
    (by bytes, at a character's first byte) so the whole fits Linux's 15-byte limit, as the
    engine does."""
    suffix = f":{instance}".encode()
    room = max(0, 15 - 3 - len(suffix))
    encoded = model.encode()
    if len(encoded) > room:
        while room > 0 and encoded[room] & 0xC0 == 0x80:  # inside a UTF-8 sequence
            room -= 1
    raw = (b"ap:" + encoded[:room] + suffix)[:15]
    return raw.decode("utf-8", "surrogateescape")


def model_threads(model: str, instance: int | None = None) -> list[ThreadInfo]:
    """Every thread of this process that belongs to ``model`` (or, given ``instance``, to that
    instance alone): its workers and every thread they created (Linux copies a thread's name to
    the threads it creates, and workers are named ``ap:<model>:<instance>``; see
    :func:`worker_name`). Two models whose names agree in the part that fits the limit cannot
    be told apart."""
    out = []
    for t in _threads():
        head, sep, index = t.name.rpartition(":")
        if (head.startswith("ap:") and sep and index.isdigit() and (instance is None or int(index) == instance)
                and t.name == worker_name(model, int(index))):
            out.append(t)
    return out


def check_confinement(model: str, cpus: Iterable[int], instance: int | None = None,
                      exclude: Iterable[int] = ()) -> list[str]:
    """Problems found: each thread of ``model`` (of its ``instance`` alone, when given) allowed
    on a CPU outside ``cpus``, but for the thread ids in ``exclude``. An instance is checked
    against its own CPUs: another instance's threads run on that instance's. A live move keeps
    instance numbers, so while a new instance warms up, the one it replaces still serves under
    the same name, on its old CPUs: the new one excludes the threads that already had its name
    when it was built (see :func:`model_threads`)."""
    allowed, skip = set(cpus), set(exclude)
    return [
        f"thread {t.tid} ({t.name}) of model {model!r} may run on CPUs "
        f"{format_cpulist(set(t.cpus) - allowed)} outside its set {format_cpulist(allowed)}"
        for t in model_threads(model, instance)
        if t.tid not in skip and not set(t.cpus) <= allowed
    ]
