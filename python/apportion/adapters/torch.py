"""torch adapter: per-instance intra-op threads, inference mode, thread confinement.

torch's thread count is process-global as a *setting* but per calling thread once that thread
has initialised its OpenMP state: ``torch.get_num_threads()`` first (initialise), then
``torch.set_num_threads(n)``; from then on parallel regions started by this worker use n
threads while another worker uses its own count. Threads the worker creates inherit its CPU
mask, so it is pinned before its first torch call (the runtime pins before the factory runs).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import PinningWarning
from .threads import check_confinement

__all__ = ["TorchModel", "set_worker_threads"]


def set_worker_threads(threads: int) -> int:
    """Sets this worker thread's intra-op thread count (initialise-then-set); returns it."""
    torch.get_num_threads()  # initialises this thread's OpenMP state: the set below then sticks
    torch.set_num_threads(threads)
    return torch.get_num_threads()


class TorchModel:
    """Serves a ``torch.nn.Module`` in eval mode under ``torch.inference_mode()``.

    The first call checks that every thread the instance created (its OpenMP pool) stayed inside
    the instance's CPUs and warns with :class:`~apportion.PinningWarning` if not (threads of the
    instance a live move replaces, which share its name, are not checked).
    """

    def __init__(self, module: torch.nn.Module, ctx: Any, replaced: Iterable[int] = ()) -> None:
        """``replaced``: ids of threads of the same name that are not this instance's (those of
        the instance a live move replaces: see :func:`apportion.adapters.replaced_threads`)."""
        self.module = module.eval()
        self.model = ctx.model
        self.instance = ctx.instance
        self.cpus = ctx.cpus
        self._replaced = frozenset(replaced)
        self.threads = set_worker_threads(ctx.threads) if ctx.threads else torch.get_num_threads()
        self._checked = False

    def __call__(self, x: Any) -> Any:
        with torch.inference_mode():
            y = self.module(x)
        if not self._checked:
            self._checked = True
            if self.cpus:
                # This instance's threads against its own CPUs: each instance checks itself.
                for problem in check_confinement(self.model, self.cpus, self.instance, self._replaced):
                    warnings.warn(problem, PinningWarning, stacklevel=2)
        return y
