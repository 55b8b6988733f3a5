"""apportion: divide one machine's cores, threads, memory and GPUs between ML models."""

from __future__ import annotations

from . import _core, load
from ._core import Future
from .batching import Batching
from .config import Config, ConfigError
from .controller import Controller
from .errors import (
    ApportionError,
    DeadlineExceeded,
    ModelNotFound,
    PinningWarning,
    PlacementError,
    QueueFull,
    QuotaError,
    RuntimeClosed,
    RequestCancelled,
    SharedMemoryWarning,
    WorkerCrashed,
)
from .futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait
from .gpu import GPU
from .placement import InstancePlan, ModelPlan, Plan, Quota, plan
from .runtime import InstanceContext, Runtime
from .spec import ModelSpec
from .stats import HistogramSnapshot, LatencyStats, ModelStats, RuntimeStats
from .topology import Topology, topology
from .tune import tune
from ._version import __version__ as __version__

built_with_cuda: bool = _core.built_with_cuda


__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "ApportionError",
    "Batching",
    "Config",
    "ConfigError",
    "Controller",
    "DeadlineExceeded",
    "Future",
    "GPU",
    "HistogramSnapshot",
    "InstanceContext",
    "InstancePlan",
    "LatencyStats",
    "ModelNotFound",
    "ModelPlan",
    "ModelStats",
    "PinningWarning",
    "Plan",
    "PlacementError",
    "QueueFull",
    "Quota",
    "QuotaError",
    "ModelSpec",
    "Runtime",
    "RuntimeClosed",
    "RequestCancelled",
    "RuntimeStats",
    "SharedMemoryWarning",
    "Topology",
    "WorkerCrashed",
    "as_completed",
    "built_with_cuda",
    "load",
    "plan",
    "topology",
    "tune",
    "wait",
]
