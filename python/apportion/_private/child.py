"""The worker process of a process-isolated instance: ``python -m apportion._private.child``,
its launch spec (JSON) on stdin.

Started by :class:`apportion._private.process.ProcessInstance` from the instance's pinned
worker thread (so it is born with that thread's CPU mask and memory policy). It applies the
placement again explicitly, imports the factory by its "module:function" path, builds the
model with the same ``adapt`` path as a thread instance, reports ready, then serves one request
at a time from the shared-memory channel until told to exit or its parent goes away.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any

from apportion._private.payload import (DIRECT_CALL, ERROR, EXIT, OK, READY, START_FAILED, WARNING, dumps, loads,
                                        portable_error)

# How long the idle loop parks before checking that its parent is still there (a backstop for
# PR_SET_PDEATHSIG, which fires when the parent's *thread* exits, and only on Linux).
_PARENT_CHECK_S = 1.0


_warned: list[tuple[str, str]] = []
_warned_chars = 0
_warnings_dropped = 0

MAX_WARNINGS = 1000
"""Warnings kept for the parent between two messages; the rest are counted, and the parent is
told how many (330,000 distinct ones, 85 MB, did not fit the ring, and the call failed with an
error that blamed its result)."""

MAX_WARNING_CHARS = 1 << 20
"""... and characters of their texts (a message must fit the ring and /dev/shm beside it)."""


def _keep_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` here: a warning this process's filters let through goes to the
    parent with the next message, which warns with it (its filters and handlers, not this
    process's stderr). At most MAX_WARNINGS between two messages."""
    global _warnings_dropped, _warned_chars
    text = f"{message}"
    if len(text) > 10_000:
        text = text[:10_000] + f"... ({len(text)} characters)"
    text = f"{text} ({filename}:{lineno})"
    if len(_warned) >= MAX_WARNINGS or _warned_chars + len(text) > MAX_WARNING_CHARS:
        _warnings_dropped += 1
        return
    _warned_chars += len(text)
    _warned.append((f"{category.__module__}:{category.__qualname__}", text))


def _send(channel: Any, parts: Any, parent: int) -> bool:
    """Sends ``parts`` (after the warnings raised since the last message), waiting for room as
    long as the parent that reads them is alive; False when it went away first."""
    global _warnings_dropped, _warned_chars
    if _warned:
        warned = _warned[:]
        _warned.clear()
        _warned_chars = 0
        if _warnings_dropped:
            warned.append(("builtins:RuntimeWarning", f"{_warnings_dropped} more warnings of the worker process were "
                           f"dropped (at most {MAX_WARNINGS}, of {MAX_WARNING_CHARS} characters in all, go to "
                           "the parent between two of its messages)"))
            _warnings_dropped = 0
        if not _send(channel, dumps((WARNING, warned)), parent):
            return False
    while not channel.send(parts, 0.0, _PARENT_CHECK_S):
        if os.getppid() != parent:
            return False
    return True


def _error_reply(model: str, kind: int, exc: BaseException) -> tuple[int, BaseException, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc = portable_error(model, exc, "the exception could not be sent from the worker process as it is; "
                                     "its traceback follows")
    return kind, exc, tb


def _name_thread(model: str, instance: int) -> None:
    """Names this (serving) thread as an engine worker names itself, ``ap:<model>:<instance>``:
    threads the model creates inherit the name, so the instance's confinement check finds
    them here as in a worker thread."""
    from apportion.adapters.threads import worker_name

    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as fh:
            fh.write(worker_name(model, instance).encode("utf-8", "surrogateescape"))
    except OSError:  # not Linux, or /proc not mounted: the check then finds no threads
        pass


def _place(spec: dict[str, Any]) -> list[str]:
    from apportion import _core

    _name_thread(spec["model"], spec["instance"])
    notes = []
    if spec["cpus"]:
        ok, why = _core.pin_current_thread(spec["cpus"])
        if not ok:
            notes.append(f"CPU mask {spec['cpus']}: {why}")
    # Set whatever the policy: the process that forked this one (the parent's spawner thread)
    # may have had another's.
    policy = spec["memory_policy"] if spec["memory_nodes"] else "none"
    ok, why = _core.set_memory_policy(policy, spec["memory_nodes"] if policy != "none" else [])
    if not ok and policy != "none":
        notes.append(f"memory policy {spec['memory_policy']} {spec['memory_nodes']}: {why}")
    # Its worker's nice (a pool reservation raises the lower classes'), not the spawner's.
    want = spec.get("nice")
    if want is not None:
        try:
            have = os.getpriority(os.PRIO_PROCESS, 0)
            if want != have:
                os.setpriority(os.PRIO_PROCESS, 0, want)
        except OSError as e:  # lowering it needs a privilege
            notes.append(f"nice {want}: {e.strerror or e}")
    return notes


def _build(launch: dict[str, Any]) -> Any:
    import pkgutil

    from apportion.adapters import build_instance
    from apportion.context import InstanceContext
    from apportion.errors import QuotaError, raised_on_import
    from apportion.spec import ModelSpec

    spec = ModelSpec.from_table(launch["model"], launch["spec"])
    assert isinstance(spec.factory, str)
    try:
        factory = pkgutil.resolve_name(spec.factory)
    except AttributeError as e:
        raise QuotaError(f"{spec.factory!r} cannot be imported: {e}", model=spec.name, field="factory") from None
    except SystemExit as e:
        # Raised again in the parent, it ended the whole process with no word of the model
        # (a module that calls sys.exit() or parses its own command line when imported).
        raise QuotaError(f"{spec.factory!r} cannot be imported: importing it raised {raised_on_import(e)}",
                         model=spec.name, field="factory") from None
    ctx = InstanceContext(
        model=spec.name, instance=launch["instance"], instances=spec.instances,
        threads=launch["threads"], cpus=tuple(launch["cpus"]) if launch["cpus"] else None,
        memory_nodes=tuple(launch["memory_nodes"]), isolation="process", gpu=None,
        own_cpus=spec.quota.isolation == "exclusive",  # placed with cores of its own
    )
    return build_instance(ctx, factory)


def main() -> int:
    spec = json.loads(sys.stdin.buffer.read())  # the parent writes it and closes the pipe
    # The parent's import path, entry by entry: PYTHONPATH splits an entry at ":" (a directory
    # named "a:b" became "a" and "b"), and the factory the parent found was not found here.
    sys.path[:0] = [p for p in spec.get("path", ()) if p not in sys.path]
    import warnings

    warnings.showwarning = _keep_warning
    from apportion import _core

    # The parent may already be gone (it died between starting us and this line): then the
    # death signal would never come.
    _core.set_parent_death_signal(signal.SIGKILL)
    # Both sides have the segment mapped now: its name goes at once, so a parent that dies
    # while this child builds its model leaves nothing behind in /dev/shm.
    channel = _core.ShmChannel.open(spec["channel"])
    channel.unlink()
    if os.getppid() != spec["parent"]:
        return 0
    notes = _place(spec)
    # After a call through the worker thread the child parks at once: the next request is a
    # caller and a worker wake-up away, and spinning would take a core from them (measured: 2x
    # slower round trips on 2 cores). After a direct call (the caller waits on the reply
    # itself, no worker thread in between) it spins for up to direct_spin_us: a caller that
    # calls again within that time finds it awake (measured: half the round trip).
    direct_spin_us = float(spec["direct_spin_us"])
    spin_us = 0.0
    try:
        fn = _build(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send(channel, dumps(_error_reply(spec["model"], START_FAILED, e)), spec["parent"])
        return 1
    if not _send(channel, dumps((READY, os.getpid(), notes)), spec["parent"]):
        return 0
    # The planned intra-op thread count is set when torch is loaded (build_instance); a child
    # whose factory did not import torch sets it once something does (a request's tensors, or
    # the model's first call).
    from apportion.adapters import set_torch_threads

    torch_unset = bool(spec["threads"]) and "torch" not in sys.modules

    while True:
        parts = channel.receive(spin_us, _PARENT_CHECK_S)
        if parts is None:
            if os.getppid() != spec["parent"]:
                return 0
            continue
        try:
            kind, payload = loads(parts)
        except Exception as e:  # noqa: BLE001 - e.g. a class this process cannot import
            if not _send(channel, dumps(_error_reply(spec["model"], ERROR, e)), spec["parent"]):
                return 0
            continue
        if kind == EXIT:
            return 0
        spin_us = direct_spin_us if kind == DIRECT_CALL else 0.0
        if torch_unset and "torch" in sys.modules:  # imported by this request's tensors
            torch_unset = set_torch_threads(spec["threads"]) is None
        try:
            reply: Any = (OK, fn(payload))
        except BaseException as e:  # noqa: BLE001 - the caller gets the model's own exception
            reply = _error_reply(spec["model"], ERROR, e)
        if torch_unset and "torch" in sys.modules:  # imported by the model's first call
            torch_unset = set_torch_threads(spec["threads"]) is None
        try:
            out = dumps(reply)
        except Exception as e:  # noqa: BLE001 - an unpicklable result fails that request only
            out = dumps(_error_reply(spec["model"], ERROR, TypeError(
                f"model {spec['model']!r}: the result could not be sent back from the worker "
                f"process: {type(e).__name__}: {e}")))
        try:
            sent = _send(channel, out, spec["parent"])
        except ValueError as e:  # larger than the ring
            sent = _send(channel, dumps(_error_reply(spec["model"], ERROR, ValueError(
                f"model {spec['model']!r}: the result could not be sent back from the worker process: {e}"))),
                spec["parent"])
        except OSError as e:  # /dev/shm cannot hold it: that result fails, this process serves on
            if e.errno != errno.ENOSPC:
                raise
            from apportion._private.shmspace import no_space_error

            nbytes = sum(memoryview(p).nbytes for p in out)
            err = no_space_error(spec["model"], spec["instance"], "result", nbytes, channel.free_bytes)
            sent = _send(channel, dumps(_error_reply(spec["model"], ERROR, err)), spec["parent"])
        if not sent:
            return 0


if __name__ == "__main__":
    sys.exit(main())
