"""CPU time per model, from /proc: a model's worker threads and every thread they created (a
framework's intra-op pool inherits its creator's thread name, so the name ties it to the model).

Kept monotonic: a thread that exits keeps the time it was last seen with (what it used after
the last reading is lost). A thread is known by its id and its start time, so an id the
kernel hands to a new thread between two readings is a new thread (the old one's time is kept,
the new one is not taken for it). Linux only; elsewhere every model reads 0.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Mapping

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

THREAD_TIMES = os.path.isdir("/proc/self/task")
"""Whether per-thread CPU time can be read here: where it cannot, every model reads 0, which
says nothing about how busy it was."""


def _thread_times() -> dict[int, tuple[bytes, float, int]]:
    """{tid: (comm, user+system seconds, start time in clock ticks after boot)} of this
    process's threads."""
    out: dict[int, tuple[bytes, float, int]] = {}
    try:
        names = os.listdir("/proc/self/task")
    except OSError:
        return out
    for t in names:
        try:
            with open(f"/proc/self/task/{t}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue  # exited meanwhile
        open_paren, close_paren = raw.find(b"("), raw.rfind(b")")
        fields = raw[close_paren + 2:].split()
        # After the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        # utime stime (fields 14 and 15 of proc(5)) ... starttime (field 22).
        out[int(t)] = (raw[open_paren + 1:close_paren], (int(fields[11]) + int(fields[12])) * _TICK_S,
                       int(fields[19]))
    return out


class CpuTracker:
    """Accumulates per-model CPU seconds across readings (see the module documentation)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (tid, start time) -> (model, seconds when last read)
        self._seen: dict[tuple[int, int], tuple[str, float]] = {}
        self._gone: dict[str, float] = {}  # model -> seconds of its exited threads
        self._comms: dict[str, set[bytes]] = {}  # model -> its workers' thread names at the last reading
        # Threads of removed models that outlived them (a helper thread a factory started):
        # they carry the name a model added again under the same name gives its workers.
        self._retired: set[tuple[int, int]] = set()

    def note_names(self, model: str, tids: Collection[int]) -> None:
        """Learns the thread names of ``model``'s workers ``tids`` (before it is removed: see
        :meth:`forget`)."""
        names = set()
        for t in tids:
            try:
                with open(f"/proc/self/task/{t}/comm", "rb") as fh:
                    names.add(fh.read().rstrip(b"\n"))
            except OSError:
                continue  # exited meanwhile, or no /proc
        with self._lock:
            self._comms.setdefault(model, set()).update(names)

    def forget(self, model: str,
               threads: Mapping[int, tuple[bytes, float] | tuple[bytes, float, int]] | None = None) -> None:
        """Drops what is known of ``model`` (removed): a model added later under its name starts
        from zero, as its request counts do, and names removed for good cost nothing. Its
        threads still alive (``threads``, as for :meth:`read`; default: read from /proc) count
        for no model from now on: one added again under its name gives its workers the same
        names, and took a leftover thread's whole time for its own."""
        with self._lock:
            threads = _thread_times() if threads is None else threads
            comms = self._comms.pop(model, set())
            for tid, seen in threads.items():
                key = (tid, seen[2] if len(seen) > 2 else 0)
                prev = self._seen.get(key)
                if (prev is not None and prev[0] == model) or (prev is None and seen[0] in comms):
                    self._retired.add(key)
            self._gone.pop(model, None)
            self._seen = {key: seen for key, seen in self._seen.items() if seen[0] != model}

    def read(self, worker_tids: Mapping[str, list[int]],
             threads: Mapping[int, tuple[bytes, float] | tuple[bytes, float, int]] | None = None
             ) -> dict[str, float]:
        """CPU seconds of each model whose workers are ``worker_tids`` (model -> kernel tids).
        ``threads``: {tid: (name, seconds[, start time])} of the process (default: read from
        /proc; without a start time, a tid is taken to be the same thread in every reading).

        A worker counts for its model by its tid. Another thread counts for the model whose
        workers carry its name (it inherited it from the worker that created it); where
        workers of several models carry that name (their names agree in the 15 bytes Linux
        keeps), the thread counts for none of them rather than for the wrong one."""
        with self._lock:
            # Read under the lock: two readers (two scrapes at once) apply their readings in
            # the order they took them. An older reading applied after a newer one brought an
            # exited thread back, and the next reading counted its time a second time.
            threads = _thread_times() if threads is None else threads
            worker_of: dict[int, str] = {}
            comm_of: dict[bytes, str | None] = {}  # None: the name of several models' workers
            for model, tids in worker_tids.items():
                for t in tids:
                    if t in threads:
                        worker_of[t] = model
                        comm = threads[t][0]
                        comm_of[comm] = model if comm_of.get(comm, model) == model else None
                        self._comms.setdefault(model, set()).add(comm)
            now: dict[tuple[int, int], tuple[str, float]] = {}
            alive: set[tuple[int, int]] = set()
            for tid, seen in threads.items():
                comm, secs = seen[0], seen[1]
                key = (tid, seen[2] if len(seen) > 2 else 0)
                alive.add(key)
                if key in self._retired and tid not in worker_of:
                    continue  # a removed model's thread that outlived it
                whose = worker_of.get(tid) or comm_of.get(comm)
                if whose is None:
                    prev = self._seen.get(key)
                    if prev is None:
                        continue
                    whose = prev[0]  # renamed since (a framework naming its threads): still the model's
                now[key] = (whose, secs)
            for key, (model, secs) in self._seen.items():
                if key not in now:  # exited (its id perhaps reused since: another thread)
                    self._gone[model] = self._gone.get(model, 0.0) + secs
            self._seen = now
            self._retired &= alive  # exited: their ids may come back as other threads
            out = {m: self._gone.get(m, 0.0) for m in worker_tids}
            for model, secs in now.values():
                if model in out:
                    out[model] += secs
            return out


def _proc_stat_ticks(text: str, cpus: Collection[int]) -> tuple[int, int]:
    """(busy, steal) clock ticks of ``cpus`` summed from the text of ``/proc/stat``."""
    busy = steal = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
        except ValueError:
            continue
        if cpu not in cpus:
            continue
        v = [int(f) for f in fields[:8]] + [0] * max(0, 8 - len(fields))
        user, nice, system, _idle, _iowait, irq, softirq, st = v[:8]
        busy += user + nice + system + irq + softirq + st
        steal += st
    return busy, steal


def parse_proc_stat(text: str, cpus: Collection[int], ticks_per_s: float) -> float:
    """Busy seconds of ``cpus`` from the text of ``/proc/stat`` (``cpuN user nice system idle
    iowait irq softirq steal ...`` in clock ticks); idle and iowait are not busy, guest time is
    already part of user time, steal (time the hypervisor gave the CPU to another machine
    while this one wanted it) is busy. A CPU the file does not list counts 0."""
    return _proc_stat_ticks(text, cpus)[0] / ticks_per_s


def parse_proc_steal(text: str, cpus: Collection[int], ticks_per_s: float) -> float:
    """Steal seconds of ``cpus`` from the text of ``/proc/stat`` (see :func:`parse_proc_stat`)."""
    return _proc_stat_ticks(text, cpus)[1] / ticks_per_s


def cpus_busy_and_steal_s(cpus: Collection[int]) -> tuple[float, float] | None:
    """Busy and steal seconds of ``cpus`` since boot, read from ``/proc/stat`` (see
    :func:`parse_proc_stat`); None where it cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as fh:
            text = fh.read()
        ticks = float(os.sysconf("SC_CLK_TCK"))
    except (OSError, AttributeError, ValueError):
        return None
    busy, steal = _proc_stat_ticks(text, cpus)
    return busy / ticks, steal / ticks


def cpus_busy_s(cpus: Collection[int]) -> float | None:
    """Busy seconds of ``cpus`` since boot (see :func:`cpus_busy_and_steal_s`); None where
    /proc/stat cannot be read (not Linux)."""
    both = cpus_busy_and_steal_s(cpus)
    return None if both is None else both[0]
