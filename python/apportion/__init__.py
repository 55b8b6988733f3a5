"""apportion: divide one machine's cores, threads, memory and GPUs between ML models."""

from __future__ import annotations

from . import _core
from ._core import Future
from .errors import (
    ApportionError,
    DeadlineExceeded,
    ModelNotFound,
    PlacementError,
    QueueFull,
    QuotaError,
    RuntimeClosed,
    WorkerCrashed,
)
from .runtime import InstanceContext, Runtime
from .stats import LatencyStats, ModelStats, RuntimeStats

built_with_cuda: bool = _core.built_with_cuda

__version__ = "0.1.0"

__all__ = [
    "ApportionError",
    "DeadlineExceeded",
    "Future",
    "InstanceContext",
    "LatencyStats",
    "ModelNotFound",
    "ModelStats",
    "PlacementError",
    "QueueFull",
    "QuotaError",
    "Runtime",
    "RuntimeClosed",
    "RuntimeStats",
    "WorkerCrashed",
    "built_with_cuda",
]
