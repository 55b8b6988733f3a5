"""Exceptions raised by apportion. Every one derives from :class:`ApportionError`.

A model's own exception is never wrapped: it reaches the caller unchanged, with its traceback.
"""

from __future__ import annotations

__all__ = [
    "ApportionError",
    "QuotaError",
    "PlacementError",
    "QueueFull",
    "DeadlineExceeded",
    "RuntimeClosed",
    "ModelNotFound",
    "WorkerCrashed",
    "PinningWarning",
]


class ApportionError(Exception):
    """Base class of every error apportion raises itself."""


class QuotaError(ApportionError, ValueError):
    """A quota is invalid. The message names the model, the field and what would be valid."""


class PlacementError(ApportionError):
    """Valid quotas that do not fit the machine. The message says what is available."""


class QueueFull(ApportionError):
    """Admission refused: the model already holds ``max_queue`` queued requests."""


class DeadlineExceeded(ApportionError, TimeoutError):
    """The request's deadline passed before it started; it was never run."""


class RuntimeClosed(ApportionError):
    """The runtime (or the model) is closed and accepts no new requests."""


class ModelNotFound(ApportionError, KeyError):
    """No model of that name is registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WorkerCrashed(ApportionError):
    """The worker serving the request died (process isolation); names model, instance and cause."""


class PinningWarning(RuntimeWarning):
    """The OS refused part of a placement (a CPU mask, a NUMA policy), or a model's threads
    left their CPUs. The model still serves; its isolation is weaker than planned."""
