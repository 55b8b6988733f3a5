"""Dynamic batching: the quota (:class:`Batching`) and the stack/split wrapper.

With ``batching=Batching(...)`` on ``Runtime.add_model``, a worker gathers queued requests
(highest priority first) into one model call:

- it dispatches once the batch holds ``max_size`` requests, or ``max_delay_ms`` after it took
  the batch's first request, or, with ``preferred_sizes``, as soon as the batch has a preferred
  size and no further request is queued, or as soon as nothing more is queued if waiting would
  not pay: while another instance of the model idles (the next request is that one's), or
  when, by how soon the next request came at this batch size before (a decaying histogram of
  those gaps), no wait is worth more than it costs: the worker time one more request saves,
  times the chance it comes within the wait, against the wait times the n requests in hand. It
  waits for the length worth most, often microseconds, and closed-loop clients whose requests
  are all in the batch are served at once;
- it never puts a request into a batch that, by the worker's own measure of calls of that size
  (a moving average of what it observed), would finish after the request's deadline or after
  the deadline of a request already in it; such a request opens the next batch, or expires
  (``on_timeout="delay"``: is delayed) if even a call of one would finish too late;
- the model is called once with a list of inputs and must return one result per input, in
  order. When every input is a numpy array, or every input is a torch tensor, the runtime stacks
  them along a new dim 0, calls the model with the stacked batch and splits its result along
  dim 0 (see :func:`stacking`); otherwise the model receives the list itself.

A failing call fails every request of its batch with the model's exception (the same exception
object for each; for a batch of more than one, a note on it says so). A result of the wrong
length fails each request with an ApportionError that names the model and both sizes.

A batch of one can be the model called with the request's input as it is (no batch dim, no
stacking), so that a lone request costs what a call without batching does: with
``Batching(..., single_unbatched=True)`` for a model that serves one input as well as a batch,
and by default (``single_unbatched=None``) for a torch model that provably does, a
``torch.nn.Sequential`` of layers that treat each row alone (see :func:`serves_rows_alone`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._private.checks import real
from .errors import ApportionError, QuotaError

__all__ = ["Batching", "serves_rows_alone", "stacking"]

_MAX_BATCH = 1 << 16
_BATCH_NOTE = "raised by one call of model "
_MAX_DELAY_MS = 1e9  # the engine waits at most this long (11.6 days) for a partial batch


@dataclass(frozen=True, slots=True)
class Batching:
    """How a model's requests are batched (see the module documentation).

    ``max_size``: most requests per call (>= 1). ``max_delay_ms``: how long a partial batch
    may wait for more requests, from its first request (0 to 1e9; 0 batches only what is
    already queued). ``preferred_sizes``: sizes at which a batch is dispatched without waiting once
    nothing more is queued (each in [1, max_size]); stored sorted and without duplicates.
    ``single_unbatched``: True says the model also serves one request's input as it is, with no
    batch dim, and returns that request's result (a torch ``Linear`` stack, most numpy code): a
    batch of one is then called that way, so a lone request costs what a call without batching
    does (a vector product, not a one-row matrix product; no stacking). False: every call gets
    a batch. None (the default): a batch of one is called unbatched only where the runtime can
    tell that the result is the same, a torch module of layers that treat each row alone
    (:func:`serves_rows_alone`) given a dense CPU tensor of at least one dim; every other call
    gets a batch.
    """

    max_size: int
    max_delay_ms: float
    preferred_sizes: Sequence[int] | None = None
    single_unbatched: bool | None = None

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise QuotaError(problem[1], field=f"batching.{problem[0]}")  # dotted, as a spec's and GPU's
        object.__setattr__(self, "max_size", int(self.max_size))
        object.__setattr__(self, "max_delay_ms", float(self.max_delay_ms))
        if self.preferred_sizes is not None:
            object.__setattr__(self, "preferred_sizes",
                               tuple(sorted({int(s) for s in self.preferred_sizes})))

    def _validated(self, model: str) -> Batching:
        """Raises QuotaError naming the model and field if this quota is invalid."""
        problem = _problem(self)
        if problem is not None:
            raise QuotaError(problem[1], model=model, field=f"batching.{problem[0]}")
        return self

    def _native(self) -> tuple[int, float, list[int]]:
        return (self.max_size, self.max_delay_ms, list(self.preferred_sizes or ()))


def _is_int(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


def _problem(b: Batching) -> tuple[str, str] | None:
    """The field of ``b`` that is wrong and what is wrong with it, or None."""
    if not _is_int(b.max_size) or not 1 <= int(b.max_size) <= _MAX_BATCH:
        return "max_size", f"must be an integer in [1, {_MAX_BATCH}], got {b.max_size!r}"
    d = b.max_delay_ms
    df = real(d)
    if df is None or not (math.isfinite(df) and 0 <= df <= _MAX_DELAY_MS):
        return "max_delay_ms", f"must be a number of milliseconds in [0, {_MAX_DELAY_MS:.0e}], got {d!r}"
    if b.single_unbatched is not None and not isinstance(b.single_unbatched, bool):
        return "single_unbatched", f"must be True, False or None, got {b.single_unbatched!r}"
    if b.preferred_sizes is not None:
        sizes = b.preferred_sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            return "preferred_sizes", f"must be a sequence of integers or None, got {sizes!r}"
        bad = [s for s in sizes if not _is_int(s) or not 1 <= int(s) <= int(b.max_size)]
        if bad or not sizes:
            return ("preferred_sizes", f"must be non-empty integers in [1, max_size={b.max_size}], "
                    f"got {tuple(sizes)!r}")
    return None


def _array_kind(xs: list[Any]) -> str | None:
    """"numpy" if every input is a numpy array, "torch" if every one is a tensor, else None."""
    if not xs:
        return None
    torch = sys.modules.get("torch")  # imported only if the caller already uses it
    if torch is not None and isinstance(xs[0], torch.Tensor):
        kind, cls = "torch", torch.Tensor
    else:
        np = sys.modules.get("numpy")
        if np is None or not isinstance(xs[0], np.ndarray):
            return None
        kind, cls = "numpy", np.ndarray
    for x in xs:
        if not isinstance(x, cls):
            return None
    return kind


def _stack_key(x: Any, kind: str) -> tuple[Any, ...]:
    """What inputs must share to be stacked into one array: type, shape and dtype, and for a
    tensor its device and layout (a CPU and a GPU tensor in one stack fail both requests)."""
    if kind == "torch":
        return (type(x), x.shape, x.dtype, x.device, x.layout)
    return (type(x), x.shape, x.dtype)


def _stackable(x: Any, kind: str) -> bool:
    """Whether several inputs like ``x`` stack into one array of their kind: a plain or masked
    numpy array; a strided (dense) tensor."""
    if kind == "torch":
        import torch

        return bool(x.layout == torch.strided)
    import numpy as np

    return type(x) is np.ndarray or isinstance(x, np.ma.MaskedArray)


def serves_rows_alone(fn: Any) -> bool:
    """Whether ``fn`` is a torch instance (the torch adapter's) whose module treats each row of
    its input alone (:func:`apportion.adapters.torch.rows_alone`): a batch of one is then the
    same called unbatched."""
    mod = sys.modules.get("apportion.adapters.torch")  # loaded if any instance is a torch one
    return mod is not None and isinstance(fn, mod.TorchModel) and fn.rows_alone


def _a_row(x: Any) -> bool:
    """A plain dense CPU tensor of at least one dim: what a module of :func:`serves_rows_alone`
    serves unbatched as it serves it in a batch (on a GPU a row's product may round otherwise
    than the batch's, by the device's matmul precision settings)."""
    torch = sys.modules.get("torch")
    return (torch is not None and type(x) is torch.Tensor and x.ndim > 0 and x.layout is torch.strided
            and x.is_cpu)


def users_single(chosen: Batching | None, users: Batching | None) -> Batching | None:
    """The batching a planner chose, with the user's word on whether a batch of one may be
    served unbatched (``single_unbatched``: a fact about the model, not a quota to plan)."""
    if chosen is None or users is None or users.single_unbatched is None:
        return chosen
    return dataclasses.replace(chosen, single_unbatched=users.single_unbatched)


def stacking(model: str, fn: Callable[[Any], Any],
             single_unbatched: bool | None = None) -> Callable[[list[Any]], Sequence[Any]]:
    """Wraps a model for batched serving: a list of arrays (or of tensors) is stacked along a
    new dim 0, ``fn`` is called once, and its result is split along dim 0, one row per request
    (a list or tuple it returns is taken as one result per request, in order); arrays of
    different shapes, dtypes or types (tensors: devices, layouts) in one batch are served as
    one call per kind, masked arrays stacked with their masks, array types or tensor layouts
    that do not stack (an ndarray subclass, a sparse tensor) one call per request;
    a list of anything else is passed to ``fn`` as it is, and its result returned as it is.
    A batch of one is a view of the caller's array (no copy): ``fn`` must not change its input
    in place. With ``single_unbatched`` True (see :class:`Batching`), a batch of one is ``fn``
    called with the request's input as it is, its result the request's; with None, so is a
    batch of one dense CPU tensor of at least one dim where :func:`serves_rows_alone` holds for
    ``fn``.
    """
    rows = single_unbatched is None and serves_rows_alone(fn)

    def serve(xs: list[Any]) -> Sequence[Any]:
        try:
            if len(xs) == 1 and (single_unbatched or (rows and _a_row(xs[0]))):
                return (fn(xs[0]),)
            kind = _array_kind(xs)
            if kind is None:
                return fn(xs)
            if len(xs) == 1:  # nothing to stack: a view of it
                return one_batch(xs, kind)
            key = _stack_key(xs[0], kind)
            for x in xs:
                if _stack_key(x, kind) != key:
                    return by_kind(xs, kind)
            return one_batch(xs, kind)
        except Exception as e:
            if not isinstance(e, ApportionError) and (len(xs) > 1 or hasattr(e, "__notes__")):
                # Every request of the batch fails with this one exception: say so where it
                # is read (a request that was fine gets a batch-mate's error). This call's
                # note only: a model may raise one exception object again and again.
                notes = [n for n in getattr(e, "__notes__", ()) if not str(n).startswith(_BATCH_NOTE)]
                if len(xs) > 1:
                    notes.append(f"{_BATCH_NOTE}{model!r} serving a batch of {len(xs)} requests, each of which "
                                 "fails with it")
                e.__notes__ = notes
            raise

    def by_kind(xs: list[Any], kind: str) -> list[Any]:
        # Arrays of different shapes, dtypes, types (a masked array among plain ones) or, for
        # tensors, devices and layouts cannot be stacked into one: each kind is a batch of its
        # own, in order of first arrival, and the results go back in request order.
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(_stack_key(x, kind), []).append(i)
        out: list[Any] = [None] * len(xs)
        for members in groups.values():
            for i, y in zip(members, one_batch([xs[i] for i in members], kind), strict=True):
                out[i] = y
        return out

    def one_batch(xs: list[Any], kind: str) -> Sequence[Any]:
        if len(xs) == 1:
            # A batch of one (a lone client, a quiet moment): a view with a new dim 0, no copy.
            y = fn(xs[0][None])
        elif not _stackable(xs[0], kind):
            # An array type that stacking would turn into another (a numpy.matrix) or a tensor
            # layout torch.stack does not take (sparse): one call each, as a batch of one.
            return [one_batch([x], kind)[0] for x in xs]
        elif kind == "numpy":
            import numpy as np

            # A masked array's stack keeps the masks (np.stack dropped them, silently).
            y = fn(np.ma.stack(xs) if isinstance(xs[0], np.ma.MaskedArray) else np.stack(xs))
        else:
            import torch

            y = fn(torch.stack(xs))
        if isinstance(y, (list, tuple)):  # one result per input, already split
            if len(y) != len(xs):
                raise ApportionError(
                    f"model {model!r}: a batch of {len(xs)} stacked inputs returned a "
                    f"{type(y).__name__} of {len(y)} results; return one per input, or an array "
                    f"with one row per input along dim 0")
            return list(y)
        rows = getattr(y, "shape", (None,))[0] if getattr(y, "ndim", 0) else None
        if rows != len(xs):
            raise ApportionError(
                f"model {model!r}: a batch of {len(xs)} stacked inputs returned "
                f"{type(y).__name__} with shape {tuple(getattr(y, 'shape', ()))}; a batching "
                f"model must return one row per input along dim 0"
            )
        if len(xs) == 1:
            return (y[0],)
        return y.unbind(0) if kind == "torch" else list(y)

    serve.__wrapped__ = fn  # type: ignore[attr-defined]
    return serve


def wrap_factory(model: str, make_instance: Callable[[int], Any],
                 single_unbatched: bool | None = None) -> Callable[[int], Any]:
    """``make_instance`` whose instances are served through :func:`stacking` (runs in each
    instance's worker thread, like ``make_instance`` itself)."""

    def make(index: int) -> Any:
        return stacking(model, make_instance(index), single_unbatched)

    return make
