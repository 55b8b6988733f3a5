"""Exceptions raised by apportion. Every one derives from :class:`ApportionError`; an invalid
setting or argument (of a model, a request, the runtime, the controller, the tuner or the
server) raises :class:`QuotaError`, also a ValueError, naming the model and the field where
there is one.

A model's own exception is never wrapped: it reaches the caller unchanged, with its traceback.
"""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "ApportionError",
    "QuotaError",
    "PlacementError",
    "QueueFull",
    "DeadlineExceeded",
    "RuntimeClosed",
    "RequestCancelled",
    "ModelNotFound",
    "WorkerCrashed",
    "PinningWarning",
    "SharedMemoryWarning",
]


class ApportionError(Exception):
    """Base class of every error apportion raises itself. Every one pickles with its
    attributes (it crosses process boundaries: a worker process's error, a process pool's
    task), whatever its constructor takes."""

    def __reduce__(self) -> tuple[object, ...]:
        # The default calls cls(*self.args): wrong for constructors that take other arguments
        # than the message they pass on (ConfigError(path, key, message)), whose copies then
        # failed to unpickle, which broke a process pool.
        return (_rebuild, (type(self), self.args, self.__dict__))


class QuotaError(ApportionError, ValueError):
    """A model's setting, or a request's argument, is invalid. ``model`` and ``field`` name it (``field`` may be dotted,
    like ``"batching.max_size"``; either is None where it does not apply), ``reason`` says what
    is wrong and what would be valid; ``str()`` is ``"model 'm', field 'f': reason"``."""

    def __init__(self, reason: str, *, model: str | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.model = model
        self.field = field
        if model is not None and field is not None:
            text = f"model {model!r}, field {field!r}: {reason}"
        elif model is not None:
            text = f"model {model!r}: {reason}"
        elif field is not None:
            text = f"field {field!r}: {reason}"
        else:
            text = reason
        super().__init__(text)


def _rebuild(cls: type[ApportionError], args: tuple[object, ...], state: dict[str, object]) -> ApportionError:
    try:
        err = cls.__new__(cls)
    except TypeError:
        # The __new__ found first in the MRO is not the one the type uses (MemoryError's for
        # an (ApportionError, MemoryError) class, whose instances BaseException makes).
        err = Exception.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class PlacementError(ApportionError):
    """Valid quotas that do not fit the machine. The message says what is available; ``model``
    and ``field`` name the model and setting where one is to blame (None otherwise), ``kind``
    is ``"capacity"`` (``"quota"`` on the QuotaError the native planner raises)."""

    def __init__(self, message: str = "", *, model: str | None = None, field: str | None = None,
                 kind: str = "capacity") -> None:
        super().__init__(message)
        self.model = model
        self.field = field
        self.kind = kind


class QueueFull(ApportionError):
    """Admission refused: the model already holds ``max_queue`` queued requests, or (with
    ``admission="deadline"``) the request would wait past its deadline behind those queued."""


class DeadlineExceeded(ApportionError, TimeoutError):
    """The request's deadline passed before it started; it was never run."""


class RuntimeClosed(ApportionError):
    """The runtime (or the model) is closed and accepts no new requests."""


class RequestCancelled(ApportionError, concurrent.futures.CancelledError):
    """A request cancelled before it ran, by ``Future.cancel()`` or by the runtime
    (``remove_model`` or ``close`` without draining, a model that failed to start): what
    ``await rt.infer(...)`` and ``await fut`` raise then. asyncio.CancelledError is the awaiting
    task's own cancellation only (a TaskGroup or a web framework takes it for that);
    ``fut.result()`` raises concurrent.futures.CancelledError, of which this is a subclass."""


class ModelNotFound(ApportionError, KeyError):
    """No model of that name is registered (or served, or loaded). ``model`` is the name
    asked for (None where the error is not about one name)."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WorkerCrashed(ApportionError):
    """The worker serving the request died (process isolation), or no node serves it any more
    (a Ray cluster); the message names model, instance and cause. ``model`` names the model,
    ``instance`` the instance and ``exitcode`` the worker process's exit status (negative: the
    signal that ended it), each None where not known."""

    def __init__(self, message: str = "", *, model: str | None = None, instance: int | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.instance = instance
        self.exitcode = exitcode


class PinningWarning(RuntimeWarning):
    """The OS refused part of a placement (a CPU mask, a NUMA policy), or a model's threads
    left their CPUs. The model still serves; its isolation is weaker than planned."""


class SharedMemoryWarning(RuntimeWarning):
    """``/dev/shm`` is too small for a process model's largest messages (``isolation="process"``):
    the model serves, but a request or result that does not fit fails with ``OSError``
    (``ENOSPC``). The message says how much is free, how much is needed and what to do."""


def raised_on_import(e: BaseException) -> str:
    """What a module's own code raised while it was imported, for an error message: ``Type:
    message``, or ``SystemExit(code)`` for a module that calls ``sys.exit()`` or parses its own
    command line when imported (caught: it would end the process with no word of the model)."""
    return f"SystemExit({e.code!r})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
