"""Adapters: how a model object is served inside its pinned worker thread.

The adapter is chosen from the model's type when the instance is built (inside its worker):

- whatever the factory returns, when torch is loaded the worker thread's intra-op thread count
  is set to the instance's planned ``threads`` before the factory runs and again after it
  returns (:func:`build_instance`), so a function wrapping a torch model runs its calls on
  that many threads;
- a ``torch.nn.Module`` also runs under ``torch.inference_mode()`` (see
  :mod:`apportion.adapters.torch`);
- an ONNX model is served by a session created inside the worker
  (:func:`apportion.adapters.onnxruntime.onnx_model`);
- any other callable is served untouched.

torch and onnxruntime are optional and imported lazily: a plain callable never imports them.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .._private.checks import ASYNC_MODEL, is_async_callable
from .threads import ThreadInfo, check_confinement, model_threads, worker_name

__all__ = ["ThreadInfo", "adapt", "build_instance", "check_confinement", "model_threads", "replaced_threads",
           "set_torch_threads", "worker_name"]


def set_torch_threads(threads: int | None) -> int | None:
    """When torch is loaded (and ``threads`` is given): sets the calling thread's intra-op
    thread count to ``threads`` (initialise, then set: see :mod:`apportion.adapters.torch`)
    and returns what torch reads back; None otherwise. Never imports torch."""
    torch = sys.modules.get("torch")
    # A torch still being imported by another thread has no set_num_threads yet: skip it; the
    # call after the factory returns applies the count.
    if torch is None or not threads or not hasattr(torch, "set_num_threads"):
        return None
    from .torch import set_worker_threads

    return set_worker_threads(threads)


def build_instance(ctx: Any, factory: Callable[[Any], Any] | None = None, model: Any = None) -> Callable[[Any], Any]:
    """Builds what one instance serves, in its (pinned) worker thread: ``factory(ctx)``, or the
    ready ``model``, adapted by :func:`adapt`. When torch is loaded, this thread's intra-op
    thread count is set to ``ctx.threads`` (the planned count) before the factory runs and
    again after it returns, so the model's calls use that count whatever the factory returned
    (a module, a function around one, a pipeline) or set meanwhile."""
    replaced = replaced_threads(ctx)  # before the factory: threads it starts are this instance's
    set_torch_threads(ctx.threads)
    obj = model if factory is None else factory(ctx)
    if inspect.iscoroutine(obj):
        obj.close()  # never awaited: no "was never awaited" warning on top of this error
        raise TypeError(f"model {ctx.model!r}: the factory is an async function; give a plain one (called once "
                        "per instance, in its worker thread)")
    if not callable(obj):
        raise TypeError(f"model {ctx.model!r}: factory returned {type(obj).__name__}, which is not callable")
    if is_async_callable(obj):
        raise TypeError(f"model {ctx.model!r}: the {'model' if factory is None else 'factory'} gives an async "
                        f"function: {ASYNC_MODEL}")
    set_torch_threads(ctx.threads)
    return adapt(obj, ctx, replaced)


def replaced_threads(ctx: Any) -> frozenset[int]:
    """Called in a new instance's worker before anything is built there: the ids of the other
    threads that already bear its worker's name (see :func:`model_threads`). A live move keeps
    instance numbers, so these are the instance it replaces, still serving on its old CPUs while
    this one warms up; its confinement check leaves them out. Empty for an instance without
    CPUs to check, and while torch is not loaded (the check is the torch adapter's: an instance
    it replaces served torch, so torch was loaded then)."""
    if not getattr(ctx, "cpus", None) or "torch" not in sys.modules:
        return frozenset()
    me = threading.get_native_id()
    return frozenset(t.tid for t in model_threads(ctx.model, ctx.instance) if t.tid != me)


def adapt(model: Any, ctx: Any, replaced: Iterable[int] = ()) -> Callable[[Any], Any]:
    """Wraps ``model`` for serving by the instance described by ``ctx`` (an InstanceContext).
    ``replaced``: threads of the instance's name that are not its own (:func:`replaced_threads`).

    Runs in the instance's worker thread, after it was pinned.
    """
    torch = sys.modules.get("torch")  # a torch module exists only if torch was imported
    if torch is not None and isinstance(model, torch.nn.Module):
        from .torch import TorchModel

        return TorchModel(model, ctx, replaced)
    if not callable(model):
        raise TypeError(f"model {ctx.model!r}: {type(model).__name__} is not callable")
    return model
