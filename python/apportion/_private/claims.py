"""Advisory claims on the CPUs a runtime gives its exclusive models, seen across processes.

Each runtime plans on every CPU its process may use and knows nothing of other processes: two
services (two gunicorn workers, two replicas, two runtimes in one process) that each give a
model "whole cores of its own" pick the same cores. A claim is an exclusive ``flock`` on one
file per CPU in a directory every process on the host sees (``/dev/shm``, else the temporary
directory); the kernel drops it when its holder exits, however it exits. A CPU another holder
claims is reported, not refused: the plan stands, the caller warns.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Iterable

__all__ = ["CpuClaims", "claims_dir"]


def claims_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class CpuClaims:
    """The CPUs one runtime claims (see the module documentation). Thread-safe."""

    def __init__(self, directory: str | None = None) -> None:
        self._dir = directory
        self._held: dict[int, int] = {}  # cpu -> the locked file's descriptor
        self._lock = threading.Lock()

    @property
    def held(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._held)

    def claim(self, cpus: Iterable[int]) -> dict[int, int | None]:
        """Holds exactly ``cpus`` from now on: claims those not held yet and lets go of the
        others. Returns the CPUs another holder has claimed, each with its holder's pid (None
        where it cannot be read)."""
        wanted = set(cpus)
        taken: dict[int, int | None] = {}
        with self._lock:
            for cpu in [c for c in self._held if c not in wanted]:
                os.close(self._held.pop(cpu))
            directory = self._dir or claims_dir()
            for cpu in sorted(wanted - set(self._held)):
                path = os.path.join(directory, f"apportion-cpu-{cpu}.claim")
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                except OSError:
                    continue  # no room or no right to claim: nothing to say about others either
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    taken[cpu] = _holder(fd)
                    os.close(fd)
                    continue
                try:
                    os.fchmod(fd, 0o666)  # another user's service may claim it after this one
                except OSError:
                    pass
                _write_pid(fd)
                self._held[cpu] = fd
        return taken

    def release(self) -> None:
        """Lets go of every claim (idempotent)."""
        with self._lock:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()


def _write_pid(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
