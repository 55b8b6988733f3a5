"""The tuner: find cores, isolation, instances, threads and batching for every model at once.

Brute force is out of reach (cores x instances x threads x batching x isolation per model,
multiplied over models), so the tuner works in four cheap steps:

1. **profile** each model alone on a few shapes (one instance; 1 thread, k threads, and a
   batch of ``max_batch`` where batching is available) with short closed-loop runs;
2. **fit** a cost model per model: one call of ``b`` requests on ``t`` threads takes
   ``(alpha + beta * b) * (serial + (1 - serial) / t)`` ms (a fixed and a per-request part,
   and an Amdahl curve over threads);
3. **allocate** cores by marginal gain: each step gives the next slice of cores to the model
   whose objective gains most per core, choosing for it the cheapest shape (threads, batch)
   whose predicted p99 meets its SLO; a model is never given more than its demand needs
   (leftover cores become headroom);
4. **validate** the best few layouts of that allocation (everything on a shared pool; whole
   cores of their own for models that earned them; without batching) under the real mixed
   load with :mod:`apportion.load`, then **refine** the winner by small moves (one more
   instance, a larger or smaller batch, a queue bound) while the time budget lasts, and a
   layout that missed an SLO while it served clearly more by tighter queue bounds.

The package follows those steps: :mod:`.cost` (the cost model), :mod:`.allocation` (step 3)
and :mod:`.search` (layouts, moves, ranking) are pure functions that tests feed synthetic
curves; :mod:`.measure` runs models under load; :mod:`.noise` says how far the measurements can be
trusted (other processes' CPU use, spread between repeats); :mod:`.report` renders what a run found;
:mod:`.tuner` holds :func:`tune`, which strings them together. ``tune`` also takes
``profiles=`` (skip step 1), ``measure=`` (replace step 4's load runs) and ``clock=``, so the
whole search runs without timing. The progress display (:mod:`.progress`) and the plots
(:mod:`.plot`, matplotlib) are imported only when a run asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .allocation import OBJECTIVES, Allocation, Objective, allocate
from .cost import RHO, CostModel, Need, Sample, Shape
from .measure import Settings, host_snapshot, measure_config, profile_model, profile_repeated
from .noise import HostSnapshot, Noise
from .report import TuneResult
from .search import (Candidate, Choice, Measured, apply, isolated_layout, queue_bound, shared_layout,
                     with_admission, with_priorities)
from .tuner import tune

__all__ = [
    "OBJECTIVES",
    "RHO",
    "Allocation",
    "Candidate",
    "Choice",
    "CostModel",
    "HostSnapshot",
    "Measured",
    "Need",
    "Noise",
    "Objective",
    "Sample",
    "Settings",
    "Shape",
    "TuneResult",
    "allocate",
    "apply",
    "host_snapshot",
    "isolated_layout",
    "measure_config",
    "profile_model",
    "profile_repeated",
    "queue_bound",
    "shared_layout",
    "tune",
    "with_admission",
    "with_priorities",
]

_OPTIONAL = {"plot_bars": "plot", "Progress": "progress"}

if TYPE_CHECKING:  # what __getattr__ gives, as type checkers see it (no import at run time)
    from .plot import plot_bars as plot_bars
    from .progress import Progress as Progress


def __getattr__(name: str) -> Any:
    # The optional modules load on first use of their names, never with the package.
    module = _OPTIONAL.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
