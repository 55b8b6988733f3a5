"""Adapters: how a model object is served inside its pinned worker thread.

The adapter is chosen from the model's type when the instance is built (inside its worker):

- a ``torch.nn.Module`` runs under ``torch.inference_mode()`` with the instance's intra-op
  thread count set in that worker thread (see :mod:`apportion.adapters.torch`);
- an ONNX model is served by a session created inside the worker
  (:func:`apportion.adapters.onnxruntime.onnx_model`);
- any other callable is served untouched.

torch and onnxruntime are optional and imported lazily: a plain callable never imports them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .threads import ThreadInfo, check_confinement, model_threads, worker_name

__all__ = ["ThreadInfo", "adapt", "check_confinement", "model_threads", "worker_name"]


def adapt(model: Any, ctx: Any) -> Callable[[Any], Any]:
    """Wraps ``model`` for serving by the instance described by ``ctx`` (an InstanceContext).

    Runs in the instance's worker thread, after it was pinned.
    """
    torch = sys.modules.get("torch")  # a torch module exists only if torch was imported
    if torch is not None and isinstance(model, torch.nn.Module):
        from .torch import TorchModel

        return TorchModel(model, ctx)
    if not callable(model):
        raise TypeError(f"model {ctx.model!r}: {type(model).__name__} is not callable")
    return model
