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
import stat
import tempfile
import threading
import weakref
from collections.abc import Iterable

__all__ = ["CpuClaims", "claims_dir"]


def claims_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


_live: weakref.WeakSet[CpuClaims] = weakref.WeakSet()


def _forget_in_child() -> None:
    # A forked child holds copies of the parent's locked descriptors: the lock would outlive
    # the parent's release for as long as the child lives. Closing the copies (never unlocking:
    # that would drop the parent's lock too) leaves each lock to the parent alone.
    for claims in list(_live):
        _close_all(claims._held)
        claims._lock = threading.Lock()  # a fork while another thread held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _close_all(held: dict[int, int]) -> None:
    for fd in held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    held.clear()


class CpuClaims:
    """The CPUs one runtime claims (see the module documentation). Thread-safe. Collected,
    it lets go of its claims; closed (:meth:`close`), it claims nothing more."""

    def __init__(self, directory: str | None = None) -> None:
        self._dir = directory
        self._held: dict[int, int] = {}  # cpu -> the locked file's descriptor
        self._lock = threading.Lock()
        self._closed = False
        self._told: set[int] = set()  # CPUs claim() returned as taken and still taken since
        weakref.finalize(self, _close_all, self._held)
        _live.add(self)

    @property
    def held(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._held)

    def claim(self, cpus: Iterable[int]) -> dict[int, int | None]:
        """Holds exactly ``cpus`` from now on: claims those not held yet and lets go of the
        others. Returns the CPUs another holder has claimed, each with its holder's pid (None
        where it cannot be read), once: a CPU still taken at the next call is not returned
        again (one free in between, and taken again, is)."""
        wanted = set(cpus)
        taken: dict[int, int | None] = {}
        with self._lock:
            if self._closed:
                wanted = set()
            for cpu in [c for c in self._held if c not in wanted]:
                os.close(self._held.pop(cpu))
            directory = self._dir or claims_dir()
            for cpu in sorted(wanted - set(self._held)):
                fd = _open_claim(os.path.join(directory, f"apportion-cpu-{cpu}.claim"))
                if fd is None:
                    continue  # no room or no right to claim: nothing to say about others either
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    taken[cpu] = _holder(fd)
                    os.close(fd)
                    continue
                _write_pid(fd)
                self._held[cpu] = fd
            new = {cpu: pid for cpu, pid in taken.items() if cpu not in self._told}
            self._told = set(taken)
        return new

    def release(self) -> None:
        """Lets go of every claim (idempotent)."""
        with self._lock:
            _close_all(self._held)
            self._told.clear()

    def close(self) -> None:
        """Lets go of every claim and claims nothing from now on (a closed runtime's move that
        raced with its close must not claim again)."""
        with self._lock:
            self._closed = True
            _close_all(self._held)


def _open_claim(path: str) -> int | None:
    """The claim file at ``path``, made here (readable and writable by every user: another
    user's service may claim the CPU after this one) or opened as it is; never through a
    symbolic link, and only a plain file with one name (the directory is writable by every
    user: a link planted there must not make this process truncate or open up another file).
    None where it cannot be had."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        made = os.open(path, flags | os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        pass  # opened below
    except OSError:
        return None
    else:
        try:
            os.fchmod(made, 0o666)  # past the umask
        except OSError:
            pass
        return made
    for mode in (os.O_RDWR, os.O_RDONLY):  # flock needs no write access; the pid does
        try:
            fd = os.open(path, flags | mode)
            break
        except OSError:
            fd = None
    if fd is None:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        return None
    return fd


def _write_pid(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass  # opened read-only: the holder reads as unknown


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
