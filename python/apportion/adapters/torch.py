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

__all__ = ["TorchModel", "rows_alone", "set_worker_threads"]

# Layers whose output for an input with any leading dims is, row by row, their output for each
# row alone: called on a row (F,) they return what the batch (1, F) returns in its row 0.
# Exact types only (a subclass may override forward).
_ROW_LAYERS = frozenset({
    torch.nn.Linear, torch.nn.Identity, torch.nn.Dropout, torch.nn.ReLU, torch.nn.ReLU6,
    torch.nn.LeakyReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Mish, torch.nn.ELU, torch.nn.SELU,
    torch.nn.CELU, torch.nn.Sigmoid, torch.nn.LogSigmoid, torch.nn.Tanh, torch.nn.Tanhshrink,
    torch.nn.Softplus, torch.nn.Softsign, torch.nn.Hardtanh, torch.nn.Hardsigmoid, torch.nn.Hardswish,
})


def set_worker_threads(threads: int) -> int:
    """Sets this worker thread's intra-op thread count (initialise-then-set); returns it."""
    torch.get_num_threads()  # initialises this thread's OpenMP state: the set below then sticks
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def rows_alone(module: torch.nn.Module) -> bool:
    """Whether ``module`` treats each row of its input alone, so that called on one request's
    tensor (at least one dim) it returns what row 0 of its result for that tensor as a batch of
    one would: one of the elementwise or ``Linear`` layers above, or a ``torch.nn.Sequential``
    (the class itself, nested ones too) of them, with no forward hook on any of them, no
    ``forward`` set on an instance, and no global forward hook. Read when the instance is
    built."""
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False

    def alone(m: torch.nn.Module) -> bool:
        if m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m):
            return False
        if type(m) is torch.nn.Sequential:
            return all(alone(c) for c in m.children())
        return type(m) in _ROW_LAYERS

    return alone(module)


class TorchModel:
    """Serves a ``torch.nn.Module`` in eval mode under ``torch.inference_mode()``.

    The first call checks that every thread the instance created (its OpenMP pool) stayed inside
    the instance's CPUs and warns with :class:`~apportion.PinningWarning` if not (threads of the
    instance a live move replaces, which share its name, are not checked). ``rows_alone``: see
    :func:`rows_alone` (a batching model's batch of one is then served unbatched by default).
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
        self.rows_alone = rows_alone(self.module)
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
