"""Process isolation: an instance whose model runs in a child process of its own.

The instance is still an ordinary engine worker thread (pinned, with its queue, priorities,
deadlines, batching and stats); the callable that thread serves is a :class:`ProcessInstance`,
a proxy that forwards each call to its child through a shared-memory channel and waits for the
answer. So requests wait in the parent's queue, never in the child: when a child dies, only
the call in flight is affected, and queued requests go to its replacement.

Faults: a child that dies during a call (a signal, ``os._exit``, the OOM killer) or runs past
``watchdog_s`` (then it is killed) fails that call with :class:`~apportion.WorkerCrashed`; the
next call starts a new child after an exponential back-off. A request the dead child never
took from the channel is sent again to the new child instead of failing.
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import itertools
import json
import os
import pkgutil
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .. import _core
from ..errors import PinningWarning, QuotaError, SharedMemoryWarning, WorkerCrashed
from ..spec import is_import_path
from . import payload as proto
from .payload import dumps, loads
from .shmspace import free_bytes, no_room_error, no_space_error, space_note

if TYPE_CHECKING:
    from ..spec import ModelSpec

__all__ = ["ProcessInstance", "RemoteTraceback", "factory_path", "SHM_PREFIX"]

SHM_PREFIX = "apportion-"
"""Every segment is /dev/shm/apportion-<pid>-<n>-i<instance>."""

RING_BYTES = 64 << 20
"""Capacity of each direction's ring: the largest request or result, pickle plus buffers. The
segment is sparse: each sender reserves (posix_fallocate) the pages its messages reach before
writing them, so resident memory follows the largest message actually sent, and a message
/dev/shm cannot hold fails alone with OSError (ENOSPC) instead of a SIGBUS."""

START_TIMEOUT_S = 300.0
"""How long a child may take by default to import and build its model before its start is
declared failed (``start_timeout_s`` on add_model)."""

class _Spawner:
    """Starts every worker process from one thread that lives as long as this process.

    A child asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and Linux sends it when
    the *thread* that forked it exits: started from a model's worker thread, every child was
    killed the moment its worker left, before close() or remove_model() could ask it to exit
    (its atexit handlers, finalizers and buffered output lost, with drain=True too). Each
    spawn takes the asking thread's CPU mask for the moment of the fork, so a child is still
    born on its instance's CPUs; what else a fork inherits from this thread (its nice, its NUMA
    policy) the child sets for itself from its spec, as its worker has them. Start it
    (:meth:`start`) from a thread whose nice is the runtime's own (where models are added), not
    from a worker whose nice a pool reservation raised: a child may raise its nice, not lower it."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also in a fork's child: the thread is not there, and its lock may have been held.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._jobs: list[tuple[Callable[[], subprocess.Popen[bytes]], set[int] | None, Any]] = []
        self._thread: threading.Thread | None = None

    def popen(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        """``start()`` run on the spawner thread, under the calling thread's CPU mask."""
        from concurrent.futures import Future

        try:
            mask: set[int] | None = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            mask = None
        done: Future[subprocess.Popen[bytes]] = Future()
        self.start()
        with self._cond:
            self._jobs.append((start, mask, done))
            self._cond.notify()
        try:
            return done.result()
        except BaseException:
            # Interrupted (Ctrl-C in a direct call) while the child started: nobody would
            # ever reap it.
            done.add_done_callback(_kill_unclaimed)
            raise

    def start(self) -> None:
        """Starts the spawner thread unless it runs (see the class documentation)."""
        with self._cond:
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._run, name="apportion-spawner", daemon=True)
            thread.start()  # a thread that cannot start leaves none recorded: the next spawn tries again
            self._thread = thread

    def _run(self) -> None:
        # Its own name: it inherits its creator's, and a worker's ("ap:<model>:<i>") would count
        # it as that model's thread (CPU time, confinement).
        try:
            with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as fh:
                fh.write(b"ap-spawner")
        except OSError:
            pass
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                start, mask, done = self._jobs.pop(0)
            if not done.set_running_or_notify_cancel():
                continue
            try:
                if mask:
                    os.sched_setaffinity(0, mask)  # this thread's mask only (Linux: 0 is the caller)
                done.set_result(start())
            except BaseException as e:  # noqa: BLE001 - the asking thread raises it
                done.set_exception(e)


def _thread_nice() -> int | None:
    """The calling thread's nice (Linux keeps one per thread: a pool reservation raises the
    workers' of lower classes), or None where it cannot be read."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return None


def _kill_unclaimed(done: Any) -> None:
    if done.exception() is None:
        proc = done.result()
        proc.kill()
        proc.wait()
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kills what is left of an ended child's process group (it leads one): processes the model
    started (a subprocess, a fork) outlived the child, reparented to init, for good. One that
    left the group (setsid) is out of reach. The group's id cannot have been reused while any
    of it is alive."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty


_SPAWNER = _Spawner()
start_spawner = _SPAWNER.start
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SPAWNER._reset)

_POLL_S = 0.02  # between liveness checks while waiting for a reply
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0
# Called as hook(delay_s, failed_at) once a restart waited out its back-off, before it starts
# the new child (None: nothing). The back-off is otherwise invisible from outside: tests set it.
_on_restart: Callable[[float, float], None] | None = None
_EXIT_GRACE_S = 2.0

_names = itertools.count()
_NAME_TOKEN = secrets.token_hex(4)
"""In every channel's name beside the pid: two processes with one pid (in two PID namespaces
that share /dev/shm, such as two containers of a pod, each pid 1) or a segment left by a
process whose pid came back must not collide (shm_open refuses a name that exists)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (set as its ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def factory_path(model: str, factory: object) -> str:
    """The "module:function" a child imports, from a string or a top-level function. Raises
    QuotaError naming the model and the field when the child could not import it."""
    if isinstance(factory, str):
        module = factory.partition(":")[0]
        if not is_import_path(factory):
            raise QuotaError(f"{factory!r} is not a \"module:function\" path (isolation=\"process\" imports the "
                             "factory in the worker process)", model=model, field="factory")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            found = None
            why = f" ({e})"
        else:
            why = ""
        if found is None:
            raise QuotaError(f"module {module!r} of {factory!r} is not importable{why}; the worker process "
                             "imports it with this process's sys.path", model=model, field="factory")
        return factory
    if callable(factory):
        defined_in = getattr(factory, "__module__", None)
        qualname = getattr(factory, "__qualname__", "")
        if (inspect.isfunction(factory) and defined_in and defined_in != "__main__" and "<" not in qualname):
            obj: Any = sys.modules.get(defined_in)
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if obj is factory:
                return factory_path(model, f"{defined_in}:{qualname}")
        raise QuotaError(
            "isolation=\"process\" needs a factory the worker process can import: a \"module:function\" string "
            f"or a module-level function (not a lambda, closure, bound method or a function of __main__); got "
            f"{factory!r}", model=model, field="factory")
    raise QuotaError(f"give a \"module:function\" string, got {factory!r}", model=model, field="factory")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


NOT_TAKEN: Any = object()
"""What :meth:`ProcessInstance.call_directly` returns when the caller must submit instead."""


def _naming(e: Exception, message: str) -> Exception:
    """An exception of ``e``'s type (TypeError where that type takes no message) saying
    ``message``, to raise from ``e``."""
    try:
        return type(e)(message)
    except Exception:  # noqa: BLE001 - a type whose constructor wants more than a message
        return TypeError(message)


class _Unsent(Exception):
    """The child died before taking the request from the channel: it may be sent again."""


SPAWN_NOTE = "(starting the worker process"
"""How the note on an error of starting a child (not of its factory) begins."""


class ProcessInstance:
    """The callable an engine worker serves for a process-isolated instance. Called by that
    worker thread and, for a synchronous call that finds it idle, by the calling thread itself
    (:meth:`call_directly`); one call at a time. :meth:`start` starts the first child; closed
    once the worker has exited."""

    def __init__(self, spec: ModelSpec, *, instance: int, threads: int | None, cpus: Sequence[int] | None,
                 memory_nodes: Sequence[int], memory_policy: str, spin_us: float) -> None:
        """``spec``: the model's, with ``factory`` as the "module:function" path the child
        imports. The instance's placement (``cpus``, ``memory_nodes``, ``memory_policy``,
        ``threads``) is applied again by the child; ``spin_us``: how long this side and, after a
        direct call, the child spin before they park."""
        # What the child is started with (JSON on its command line): the model's spec as its
        # table, and this instance's placement.
        self._launch: dict[str, Any] = {
            "model": spec.name, "spec": spec.to_table(), "instance": instance, "threads": threads,
            "cpus": list(cpus) if cpus else None, "memory_nodes": list(memory_nodes),
            "memory_policy": memory_policy, "direct_spin_us": spin_us}
        self._model = spec.name
        self._instances = spec.instances + spec.burst_instances
        self._index = instance
        self._watchdog_s = spec.watchdog_s
        self._spin_us = spin_us
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: Any = None
        self._failures = 0
        self._failed_at = 0.0
        self._closed = False
        self._start_timeout_s = spec.start_timeout_s if spec.start_timeout_s is not None else START_TIMEOUT_S
        self._aborting = False  # set from another thread by abort(); read between waits
        self._warned: list[tuple[str, str]] = []  # the child's warnings not shown yet (see _show_warnings)
        self._abort_start = False  # set by abort_start(): a child still building gives up
        self._woken = threading.Event()  # set by abort(): a restart's backoff ends at once
        self._lock = threading.Lock()  # close() from another thread vs. a restart
        # One call at a time on the channel: the worker's, or a direct caller's. The worker
        # announces that it waits for the lock (it holds a request already), and a direct
        # caller then leaves the instance to it.
        self._call_lock = threading.Lock()
        self._worker_waiting = False
        self._direct_ok = True  # cleared by end_direct_calls()
        # The threads inside call_directly() (the one in the call, and any about to find the
        # instance busy): end_direct_calls() waits for the others, and tells a signal handler
        # whose own thread is among them that it cannot (see after_direct_call).
        self._direct_threads: set[int] = set()
        self._direct_ended = threading.Event()  # set by a direct call that ends after end_direct_calls()
        self._after_direct: dict[int, list[Callable[[], None]]] = {}  # per thread, see after_direct_call()
        self.restarts = 0
        """Children started after the first (introspection and tests)."""

    def start(self) -> None:
        """Starts the first child and waits until it built its model (at most
        ``start_timeout_s``; :meth:`abort` or :meth:`abort_start` end the wait at once). The
        model's first instance warns (SharedMemoryWarning) when /dev/shm cannot hold the
        largest messages of all its instances in both directions."""
        if self._index == 0:
            note = space_note(self._model, self._instances, RING_BYTES, free_bytes())
            if note is not None:
                warnings.warn(note, SharedMemoryWarning, stacklevel=2)
        self._start()

    # -- the child ------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The current child's pid; None between a crash and the restart."""
        return self._proc.pid if self._proc is not None else None

    def _spawn_note(self, e: BaseException) -> None:
        e.add_note(f"{SPAWN_NOTE} of model {self._model!r}, instance {self._index}: in this process, before the "
                   "child ran; its factory did not run)")

    def _start(self) -> None:
        name = f"/{SHM_PREFIX}{os.getpid()}-{_NAME_TOKEN}-{next(_names)}-i{self._index}"
        try:
            channel = _core.ShmChannel.create(name, RING_BYTES)
        except OSError as e:
            if e.errno != errno.ENOSPC and "No space left" not in str(e):
                self._spawn_note(e)
                raise
            err = no_room_error(self._model, self._index, str(e), free_bytes())
            self._spawn_note(err)
            raise err from None
        # The child imports the factory with this process's path (entries added at run time,
        # e.g. by a test runner, included): in PYTHONPATH for its interpreter to find apportion,
        # and in the spec entry by entry (see child.main).
        entries = [p for p in sys.path if isinstance(p, str) and p]
        spec = dict(self._launch, channel=name, parent=os.getpid(), path=entries, nice=_thread_nice())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(entries)
        try:
            # subprocess execs at once (no fork of this threaded process keeps running), and is
            # started under the pinned worker thread's CPU mask (see _Spawner, which forks it):
            # the child is born with it.
            # A process group of its own: Ctrl-C in a terminal, a service manager's stop and
            # `kill -- -PGID` signal the whole group, and a child that died of it failed the
            # call it was serving while this process drained. The child goes with its parent
            # (PR_SET_PDEATHSIG and its parent check) or when told to.
            # The spec goes on the child's stdin, not its command line: one argument may not
            # exceed 128 KiB (E2BIG), which a long model name reached. Then stdin is at its end,
            # as /dev/null would be.
            proc = _SPAWNER.popen(lambda: subprocess.Popen([sys.executable, "-m", "apportion._private.child"],
                                                           env=env, stdin=subprocess.PIPE, close_fds=True,
                                                           process_group=0))
        except BaseException as e:
            channel.close()
            if isinstance(e, OSError):  # no fd, process or memory left for the child
                self._spawn_note(e)
            raise
        try:
            assert proc.stdin is not None
            with proc.stdin:
                proc.stdin.write(json.dumps(spec).encode())
        except BrokenPipeError:
            pass  # the child died before reading it: the wait below reports how
        try:
            reply = self._wait_reply(channel, proc, self._start_timeout_s, starting=True)
        except BaseException:
            channel.close()
            self._reap(proc, kill=True)
            raise
        finally:
            # Both sides have it mapped now (or it failed): no name is left to leak, even if
            # this process is killed later.
            if not channel.closed:
                channel.unlink()
        kind = reply[0]
        if kind != proto.READY:
            channel.close()
            self._reap(proc, kill=False)
            _, exc, tb = reply
            exc.__cause__ = RemoteTraceback(tb)
            warned, self._warned = self._warned, []
            for path, text in warned:
                exc.add_note(f"(the worker process warned before it failed: {path}: {text})")
            raise exc
        self._proc, self._channel = proc, channel
        self._show_warnings()
        for note in reply[2]:
            warnings.warn(f"model {self._model!r} instance {self._index} (worker process): {note}",
                          PinningWarning, stacklevel=2)

    def _show_warnings(self) -> None:
        """Warns here with what the model warned with in the child (its category where this
        process can import it), each naming the model and instance. Called with the channel in
        step: a warning turned into an error (``-W error``) fails the call as it would in a
        thread instance, and the next call reads its own reply."""
        warned, self._warned = self._warned, []
        for path, text in warned:
            try:
                category = pkgutil.resolve_name(path)
            except Exception:  # noqa: BLE001 - a class only the child has: the text says which
                category = None
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category, text = UserWarning, f"{path}: {text}"
            warnings.warn(f"model {self._model!r} instance {self._index} (worker process): {text}", category,
                          stacklevel=3)

    def _send(self, channel: Any, proc: subprocess.Popen[bytes], parts: Any) -> None:
        """Sends a request; while it waits for room (the child has not taken the previous
        message), watches the child as :meth:`_wait_reply` does. A child that died or was
        stopped meanwhile is discarded: _Unsent (it never took the request) or WorkerCrashed."""
        deadline = None if self._watchdog_s is None else time.monotonic() + self._watchdog_s
        while not channel.send(parts, 0.0, _POLL_S):
            if self._aborting:
                self._discard_child(crashed=False)
                raise self._crashed(proc.pid, "was killed with SIGKILL before it took the request: the model "
                                              "was closed with drain=False", -signal.SIGKILL)
            if proc.poll() is not None:
                self._discard_child()
                raise _Unsent()
            if deadline is not None and time.monotonic() >= deadline:
                self._discard_child()
                raise self._crashed(proc.pid, f"did not take the request within {self._watchdog_s:g} s "
                                              "(watchdog_s); killed with SIGKILL", -signal.SIGKILL)

    def _wait_reply(self, channel: Any, proc: subprocess.Popen[bytes], limit_s: float | None,
                    starting: bool = False) -> Any:
        deadline = None if limit_s is None else time.monotonic() + limit_s
        spin = self._spin_us
        while True:
            wait = _POLL_S if deadline is None else min(_POLL_S, max(deadline - time.monotonic(), 0.0))
            try:
                parts = channel.receive(spin, wait)
            except ValueError as e:  # the child wrote over its reply ring: nothing more from it is read
                if "no sender writes" not in str(e):  # (a channel closed meanwhile says so)
                    raise
                self._reap(proc, kill=True)
                raise self._crashed(proc.pid, f"wrote a malformed reply ({e}; native code in the model writing "
                                              "out of bounds?); killed with SIGKILL", -signal.SIGKILL) from None
            if parts is not None:
                msg = loads(parts)
                if msg[0] != proto.WARNING:
                    return msg
                self._warned.extend(msg[1])  # shown once the reply after them is read
                continue
            spin = 0.0  # the reply is not imminent: just park between checks
            if self._aborting or (starting and self._abort_start):  # first: the child may be dead of it
                self._reap(proc, kill=True)
                during = "while it built the model" if starting else "during the call"
                why = ("the interpreter is exiting" if not self._aborting
                       else "the model was closed with drain=False")
                raise self._crashed(proc.pid, f"was killed with SIGKILL {during}: {why}", -signal.SIGKILL)
            code = proc.poll()
            if code is not None:
                raise self._crashed(proc.pid, _describe_exit(code), code)
            if deadline is not None and time.monotonic() >= deadline:
                self._reap(proc, kill=True)
                what = "did not start" if starting else "did not answer"
                field = " (start_timeout_s)" if starting else " (watchdog_s)"
                raise self._crashed(proc.pid, f"{what} within {limit_s:g} s{field}; killed with SIGKILL",
                                    -signal.SIGKILL)

    def _crashed(self, pid: int | None, cause: str, code: int | None) -> WorkerCrashed:
        who = f"worker process {pid}" if pid is not None else "worker process"
        return WorkerCrashed(f"model {self._model!r} instance {self._index}: {who} {cause}", model=self._model,
                             instance=self._index, exitcode=code)

    def _reap(self, proc: subprocess.Popen[bytes], kill: bool) -> None:
        if kill and proc.poll() is None:
            proc.kill()
        try:
            proc.wait(_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _kill_group(proc)

    def _discard_child(self, crashed: bool = True) -> None:
        """Kills the child and forgets it; the next request starts a new one (``crashed``: after
        a backoff that grows with the failures in a row)."""
        proc, channel = self._proc, self._channel
        self._proc = self._channel = None
        if channel is not None:
            channel.close()
        if proc is not None:
            self._reap(proc, kill=True)
        if crashed:
            self._failures += 1
            self._failed_at = time.monotonic()

    def _restart(self) -> None:
        delay = min(_BACKOFF_FIRST_S * 2 ** (self._failures - 1), _BACKOFF_MAX_S)
        left = self._failed_at + delay - time.monotonic()
        if left > 0:
            self._woken.wait(left)  # abort() (close or remove without drain) ends it at once
        hook = _on_restart
        if hook is not None:
            hook(delay, self._failed_at)
        with self._lock:
            if self._closed or self._aborting:
                raise self._crashed(None, "was not restarted: the model is closing", None)
            try:
                self._start()
            except WorkerCrashed:
                self._failures += 1
                self._failed_at = time.monotonic()
                raise
            except BaseException as e:
                self._failures += 1
                self._failed_at = time.monotonic()
                raise self._crashed(None, f"could not be restarted: {type(e).__name__}: {e}", None) from e
            self.restarts += 1

    # -- serving --------------------------------------------------------------------------------
    def __call__(self, x: Any) -> Any:
        """Serves one request for the worker thread: restarts a dead child first (after its
        back-off), and sends a request a dead child never took to its replacement."""
        parts = self._dumps((proto.CALL, x))
        self._worker_waiting = True
        with self._call_lock:
            self._worker_waiting = False
            for _attempt in range(3):
                if self._proc is None:
                    self._restart()
                try:
                    return self._round_trip(parts)
                except _Unsent:
                    continue  # the next child serves it
            raise self._crashed(None, "died before taking the request, three times in a row", None)

    def call_directly(self, x: Any, begin: Callable[[], int], end: Callable[[bool, int], None]) -> Any:
        """Serves one request in the calling thread when this instance is idle: the caller
        talks to the child itself, with no worker thread in between. Returns NOT_TAKEN (having
        sent nothing) when the instance is busy, wanted by its worker, has no live child, or
        ``begin()`` refuses (returns 0: the model is closed or has requests queued); the caller
        then submits instead. Otherwise ``end(ok, start)`` is called once, before the result is
        returned or the error raised."""
        if self._worker_waiting or self._proc is None:
            return NOT_TAKEN
        me = threading.get_ident()
        # Listed before the lock is taken and _direct_ok read (end_direct_calls() clears that
        # first, then reads the list): either this call finds direct calls refused, or
        # end_direct_calls() finds this call, also from a signal handler that interrupted it.
        self._direct_threads.add(me)
        try:
            if not self._call_lock.acquire(blocking=False):
                return NOT_TAKEN
            try:
                if self._worker_waiting or self._proc is None or not self._direct_ok or self._aborting:
                    return NOT_TAKEN
                start = begin()
                if not start:
                    return NOT_TAKEN
                try:
                    out = self._round_trip(self._dumps((proto.DIRECT_CALL, x)))
                except _Unsent:
                    return NOT_TAKEN  # never reached the child: the worker restarts it and serves it
                except BaseException:
                    end(False, start)
                    raise
                end(True, start)
                return out
            finally:
                self._call_lock.release()
        finally:
            self._direct_threads.discard(me)
            if not self._direct_ok:  # direct calls are ending: someone may wait for this one
                self._direct_ended.set()
                errors = []
                for fn in self._after_direct.pop(me, ()):  # each runs, whatever another raised
                    try:
                        fn()
                    except BaseException as e:  # noqa: BLE001 - the first is raised below
                        errors.append(e)
                if errors:
                    raise errors[0]

    def _dumps(self, message: Any) -> Any:
        """A request's parts for the channel; a request that does not pickle fails naming the
        model."""
        try:
            return dumps(message)
        except Exception as e:
            raise _naming(e, f"model {self._model!r}: the request could not be sent to the worker process "
                             f"(requests to isolation='process' models are pickled): {type(e).__name__}: {e}") from e

    def _round_trip(self, parts: Any) -> Any:
        """One request through the live child, under the call lock. Raises _Unsent when the
        child died without taking it (the child is discarded either way)."""
        channel, proc = self._channel, self._proc
        assert channel is not None and proc is not None
        # No liveness check before sending (waitpid costs microseconds per call here): a child
        # that died while idle never takes the request, which is then sent to its replacement.
        try:
            self._send(channel, proc, parts)
        except ValueError as e:
            raise ValueError(f"model {self._model!r}: the request does not fit the channel to the worker "
                             f"process: {e}") from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            nbytes = sum(memoryview(p).nbytes for p in parts)
            raise no_space_error(self._model, self._index, "request", nbytes, channel.free_bytes) from None
        try:
            kind, *rest = self._wait_reply(channel, proc, self._watchdog_s)
        except WorkerCrashed:
            unread = channel.sent_unread
            self._discard_child()
            if unread:
                raise _Unsent() from None
            raise
        except Exception as e:  # the reply was read and failed to unpickle: the channel is in step
            raise _naming(e, f"model {self._model!r}: a reply of the worker process (its result or error) "
                             f"pickled there but does not unpickle here: {type(e).__name__}: {e}") from e
        except BaseException:
            # Interrupted (Ctrl-C in a direct call) with the request sent and its reply not yet
            # read: the next request would read this one's reply. The child goes; the next
            # request starts a new one.
            self._discard_child(crashed=False)
            raise
        self._failures = 0
        if self._warned:
            self._show_warnings()
        if kind == proto.OK:
            return rest[0]
        exc, tb = rest
        exc.__cause__ = RemoteTraceback(tb)
        raise exc

    # -- shutdown -------------------------------------------------------------------------------
    def end_direct_calls(self, wait: bool) -> bool:
        """Refuses direct calls from now on; ``wait``: also waits for the call in flight, if
        any (not for the worker's calls). Call it before the model's workers stop when
        draining: the child is closed once the workers have stopped, so no direct call may
        still be talking to it then. Returns False, without waiting, when the calling thread is
        itself in a direct call to this instance (a signal handler that interrupted it): that
        call cannot end before the handler returns, and the worker may wait for its lock, so
        whatever stops the model must wait until it returned (:meth:`after_direct_call`)."""
        self._direct_ok = False
        me = threading.get_ident()
        if me in self._direct_threads:
            return False
        while wait and self._direct_threads - {me}:
            self._direct_ended.wait(_POLL_S)
            self._direct_ended.clear()  # the loop looks again: a call that ends meanwhile is not missed
        return True

    def after_direct_call(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the calling thread once the direct call it is in (interrupted by a
        signal handler: :meth:`end_direct_calls` returned False) returned or raised; an
        exception of ``fn`` is raised from that call."""
        self._after_direct.setdefault(threading.get_ident(), []).append(fn)

    def abort(self) -> None:
        """Makes a call in flight give up within one liveness poll: its child is killed and the
        call fails with WorkerCrashed; no restart follows. Safe from any thread; for close with
        drain=False, where a hung child would otherwise hold the worker (and close) forever."""
        self._aborting = True
        self._woken.set()

    def abort_start(self) -> None:
        """Makes a start in progress give up within one liveness poll (its child is killed and
        the start fails with WorkerCrashed); a child that already serves is left alone. Safe
        from any thread; for interpreter exit."""
        self._abort_start = True

    def close(self) -> None:
        """Asks the child to exit, then terminates it if it does not; frees the segment.
        Idempotent. Call it once the worker thread exited; waits for a direct call in flight
        (abort() first makes it give up)."""
        with self._call_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            proc, channel = self._proc, self._channel
            self._proc = self._channel = None
        if proc is None:
            return
        try:
            if proc.poll() is None and channel is not None:
                channel.send(dumps((proto.EXIT, None)), 0.0, 0.0)
            proc.wait(_EXIT_GRACE_S)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            proc.terminate()
            self._reap(proc, kill=False)  # SIGKILL if SIGTERM is not enough either
        finally:
            if proc.poll() is not None:
                _kill_group(proc)
            if channel is not None:
                channel.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at collection or interpreter exit
            pass
