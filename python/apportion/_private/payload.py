"""How requests and results cross the process boundary (the wire format between an instance's
proxy and its worker process): pickle protocol 5, with large buffers
out of band.

A message is a list of parts: the pickle first, then every buffer of at least
``OUT_OF_BAND_BYTES`` (numpy arrays, bytes-like objects that support PickleBuffer, CPU torch
tensors) as a part of its own. The channel copies each part once into shared memory and once
out again, instead of pickling it into the stream (a copy into the pickle, then a copy per
pipe chunk, then the unpickling copy). Smaller buffers stay inline: for them one pickle is
cheaper than a part's framing (see bench/RESULTS.md, "Process isolation", for the measured
crossover).
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any

__all__ = ["OUT_OF_BAND_BYTES", "dumps", "loads", "portable_error"]

# Message kinds, the first item of every message. Parent -> child:
CALL = 0
EXIT = 1
DIRECT_CALL = 2  # a call from a caller waiting on the reply itself: the child then spins for the next
# Child -> parent:
OK = 0
ERROR = 1
READY = 2
START_FAILED = 3
WARNING = 4  # before a reply: the warnings the model raised meanwhile, [(category path, text)]

OUT_OF_BAND_BYTES = 64 * 1024
"""Buffers at least this large travel as separate shared-memory parts, not inside the pickle."""


def portable_error(model: str, exc: BaseException, note: str) -> BaseException:
    """``exc`` itself when it survives a pickle round trip, else a RuntimeError naming the
    model, the exception's type and its message. A class whose constructor takes other
    arguments than its args (common in libraries) pickles but does not unpickle, so it would
    fail the receiver's loads (or reach it as a serializer's own error) instead of the
    request. ``note``: the message's closing remark (why, and where the traceback is)."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=5))
    except Exception:  # noqa: BLE001 - any failure means it cannot cross as it is
        return RuntimeError(f"model {model!r} raised {type(exc).__module__}.{type(exc).__qualname__}: {exc} "
                            f"({note})")
    return exc


def _rebuild_tensor(data: Any, dtype: Any, shape: tuple[int, ...], strides: tuple[int, ...] | None = None) -> Any:
    import numpy as np
    import torch

    flat = torch.from_numpy(np.asarray(data, dtype=np.uint8)).view(dtype)
    return flat.reshape(shape) if strides is None else flat.as_strided(shape, strides)


class _Pickler(pickle.Pickler):
    # torch pickles a tensor's storage as bytes inside the stream; a byte view of the storage
    # as a numpy array goes out of band instead (any dtype, bfloat16 included).
    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if (
            torch is None
            or type(obj) is not torch.Tensor
            or obj.device.type != "cpu"
            or obj.requires_grad
            or obj.layout != torch.strided
            # A nested tensor is strided by its layout, yet its parts are tensors of their own
            # (reshape refuses it): torch's own pickling sends it.
            or obj.is_nested
            or obj.numel() * obj.element_size() < OUT_OF_BAND_BYTES
            # Their bytes are not their values (scale and zero point, a lazy conjugate or
            # negation): torch's own pickling keeps them.
            or obj.is_quantized
            or obj.is_conj()
            or obj.is_neg()
        ):
            return NotImplemented
        t = obj.detach()
        if t.is_contiguous():
            strides = None
            flat = t.reshape(-1)
        elif ((t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
              or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))):
            # One dense block in another order: sent as it lies, rebuilt with its strides.
            strides = tuple(t.stride())
            flat = t.as_strided((t.numel(),), (1,))
        else:  # a view with gaps or overlaps: torch's own pickling keeps its layout
            return NotImplemented
        return _rebuild_tensor, (flat.view(torch.uint8).numpy(), t.dtype, tuple(t.shape), strides)


def dumps(obj: Any) -> list[Any]:
    """``obj`` as message parts: [pickle, out-of-band buffer, ...]."""
    oob: list[Any] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: pickled inline
            return True
        if raw.nbytes >= OUT_OF_BAND_BYTES:
            oob.append(raw)
            return False
        return True

    if "torch" in sys.modules:
        f = io.BytesIO()
        _Pickler(f, protocol=5, buffer_callback=keep_large).dump(obj)
        head: Any = f.getbuffer()
    else:
        head = pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    return [head, *oob]


def loads(parts: list[Any]) -> Any:
    """The object from message parts (the buffers are owned copies: safe to keep)."""
    return pickle.loads(parts[0], buffers=parts[1:])
