"""Tensors of the Open Inference Protocol (KServe v2) and what a model receives.

A model declares a :class:`Signature`: its inputs and outputs as :class:`TensorSpec` (name,
v2 datatype, shape with -1 for a variable dimension) and whether it takes numpy arrays or torch
tensors. The server checks each request against it and converts:

- v2 JSON tensors (``{"name", "datatype", "shape", "data"}``, data flat or nested, row-major)
  become new arrays;
- binary tensor data (the HTTP extension's bytes after the JSON header, gRPC's
  ``raw_input_contents``) becomes an array over the request's own bytes (``np.frombuffer``, no
  copy) when its start is aligned for the datatype, else a copy; torch tensors share the array's
  memory (``torch.from_numpy``). Arrays over an immutable buffer (gRPC) are read-only: a numpy
  model that writes into its input must copy it first; a torch model gets a copy of such bytes
  (torch tensors are always writable).

A model with one input receives that array or tensor; with several, a dict by input name. It
returns one array or tensor for a single declared output, or a dict by output name or a tuple
in declared order. BYTES tensors are numpy object arrays of ``bytes`` for numpy and torch
models alike (torch has no string tensors).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import numpy as np

from ..errors import QuotaError

__all__ = ["DATATYPES", "Signature", "TensorError", "TensorSpec"]

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
"""v2 datatype name -> the numpy dtype a model sees (little-endian on the wire)."""

_BY_DTYPE = {dt: name for name, dt in DATATYPES.items() if name != "BYTES"}
_LEN = struct.Struct("<I")
_MAX_BYTES = int(np.iinfo(np.intp).max)
"""numpy makes no array whose non-zero dims and item size multiply beyond this, even one with a
zero dim and so no elements."""


class TensorError(ValueError):
    """A request's tensor does not match the model's signature (the client's fault: HTTP 400,
    gRPC INVALID_ARGUMENT). The message names the model, the tensor and what was expected."""


class OutputError(TypeError):
    """A model returned something its declared outputs do not describe (HTTP 500, gRPC
    INTERNAL). The message names the model, the output and what was declared."""


@dataclass(frozen=True, init=False)
class TensorSpec:
    """One declared tensor: ``name``, v2 ``datatype`` (BOOL, UINT8..UINT64, INT8..INT64, FP16,
    FP32, FP64, BYTES) and ``shape`` (a sequence of dims, stored as a tuple; -1 for a variable
    dim, () for a scalar)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __init__(self, name: str, datatype: str, shape: Sequence[int]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "datatype", datatype)
        object.__setattr__(self, "shape", shape)
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise QuotaError(f"TensorSpec: field 'name' must be a non-empty string, got {self.name!r}")
        if self.datatype not in DATATYPES:
            raise QuotaError(f"tensor {self.name!r}, field 'datatype': expected one of "
                             f"{', '.join(DATATYPES)}, got {self.datatype!r}")
        if isinstance(self.shape, (str, bytes)) or not isinstance(self.shape, Sequence):
            raise QuotaError(f"tensor {self.name!r}, field 'shape': expected a sequence of dims "
                             f"(-1 for a variable dim), got {self.shape!r}")
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < -1:
                raise QuotaError(f"tensor {self.name!r}, field 'shape': dims must be ints >= 0 "
                                 f"or -1 (variable), got {list(self.shape)!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]

    def matches(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want == -1 or want == got for want, got in zip(self.shape, shape))

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _specs(field: str, specs: Any) -> tuple[TensorSpec, ...]:
    if isinstance(specs, TensorSpec):
        specs = (specs,)
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence) or not specs:
        raise QuotaError(f"Signature: field {field!r} must be a non-empty sequence of TensorSpec, got {specs!r}")
    out = tuple(specs)
    for s in out:
        if not isinstance(s, TensorSpec):
            raise QuotaError(f"Signature: field {field!r} must hold TensorSpec, got {s!r}")
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise QuotaError(f"Signature: field {field!r} names {dup} more than once")
    return out


@dataclass(frozen=True, init=False)
class Signature:
    """A model's declared ``inputs`` and ``outputs`` (a sequence of TensorSpecs, or one
    TensorSpec, each stored as a tuple) and ``tensor``: "numpy" (the model receives numpy
    arrays) or "torch" (CPU torch tensors)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tensor: str = "numpy"

    def __init__(self, inputs: Sequence[TensorSpec] | TensorSpec, outputs: Sequence[TensorSpec] | TensorSpec,
                 tensor: str = "numpy") -> None:
        object.__setattr__(self, "inputs", _specs("inputs", inputs))
        object.__setattr__(self, "outputs", _specs("outputs", outputs))
        object.__setattr__(self, "tensor", tensor)
        if self.tensor not in ("numpy", "torch"):
            raise QuotaError(f"Signature: field 'tensor' must be 'numpy' or 'torch', got {self.tensor!r}")
        if self.tensor == "torch" and find_spec("torch") is None:
            # Refused here, not in every request after the server said it was ready.
            raise QuotaError("Signature: field 'tensor' is 'torch', but torch is not installed "
                             "(pip install 'apportion[torch]', or tensor='numpy')")

    def input(self, model: str, name: str) -> TensorSpec:
        return _find(model, "input", self.inputs, name)

    def output(self, model: str, name: str) -> TensorSpec:
        return _find(model, "output", self.outputs, name)

    # -- request -> model ---------------------------------------------------------------------
    def to_model(self, model: str, arrays: Mapping[str, np.ndarray]) -> Any:
        """The model's argument from checked input arrays: the array (one input) or a dict by
        name, as numpy arrays or torch tensors. Raises TensorError for a missing input."""
        missing = [s for s in self.inputs if s.name not in arrays]
        if missing:
            s = missing[0]
            raise TensorError(f"model {model!r}: missing input {s.name!r} (expected "
                              f"{s.datatype} with shape {list(s.shape)})")
        if self.tensor == "torch":
            arrays = {n: _to_torch(a) for n, a in arrays.items()}
        if len(self.inputs) == 1:
            return arrays[self.inputs[0].name]
        return {s.name: arrays[s.name] for s in self.inputs}

    # -- model -> response --------------------------------------------------------------------
    def from_model(self, model: str, result: Any) -> dict[str, np.ndarray]:
        """The declared outputs as numpy arrays, checked against their specs. Raises OutputError
        when the result does not fit them."""
        outs = self.outputs
        if isinstance(result, Mapping):
            got = set(result)
            want = {s.name for s in outs}
            if got != want:
                raise OutputError(f"model {model!r} returned outputs {sorted(map(str, got))}, "
                                  f"declared {sorted(want)}")
            values = [result[s.name] for s in outs]
        elif len(outs) > 1 or isinstance(result, tuple):
            if not isinstance(result, (tuple, list)) or len(result) != len(outs):
                raise OutputError(f"model {model!r} declares {len(outs)} outputs "
                                  f"{[s.name for s in outs]}: return a dict by name or a tuple "
                                  f"in that order, got {type(result).__name__}")
            values = list(result)
        else:
            values = [result]
        return {s.name: _check_output(model, s, v) for s, v in zip(outs, values)}


def _find(model: str, kind: str, specs: tuple[TensorSpec, ...], name: str) -> TensorSpec:
    for s in specs:
        if s.name == name:
            return s
    raise TensorError(f"model {model!r} has no {kind} {name!r}; its {kind}s: {[s.name for s in specs]}")


def _to_torch(a: np.ndarray) -> Any:
    if a.dtype == object:
        return a
    import torch

    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def _check_output(model: str, spec: TensorSpec, value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        try:
            value = value.numpy()  # a CPU tensor outside autograd: a view, half the cost of the chain
        except (RuntimeError, TypeError):
            value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if spec.datatype == "BYTES":
        if arr.dtype.kind not in "OSU":
            raise OutputError(f"model {model!r}, output {spec.name!r}: declared BYTES, got dtype {arr.dtype}")
        if arr.dtype.kind == "O":
            for v in arr.reshape(-1):
                if not isinstance(v, (bytes, bytearray, memoryview, str)):
                    raise OutputError(f"model {model!r}, output {spec.name!r}: declared BYTES, got an "
                                      f"element of type {type(v).__name__} (give bytes or str)")
    elif arr.dtype != spec.dtype:
        raise OutputError(f"model {model!r}, output {spec.name!r}: declared {spec.datatype} "
                          f"({spec.dtype}), got dtype {arr.dtype}")
    if not spec.matches(arr.shape):
        raise OutputError(f"model {model!r}, output {spec.name!r}: declared shape "
                          f"{list(spec.shape)}, got {list(arr.shape)}")
    return arr


# -- wire formats ------------------------------------------------------------------------------
def check_header(model: str, spec: TensorSpec, datatype: Any, shape: Any) -> tuple[int, ...]:
    """Checks a request tensor's datatype and shape against its spec; returns the shape."""
    if (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence)
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
        raise TensorError(f"model {model!r}, input {spec.name!r}: 'shape' must be a list of "
                          f"dims >= 0, got {shape!r}")
    if datatype != spec.datatype:
        raise TensorError(f"model {model!r}, input {spec.name!r}: expected datatype "
                          f"{spec.datatype}, got {datatype!r}")
    if not spec.matches(shape):
        raise TensorError(f"model {model!r}, input {spec.name!r}: expected shape "
                          f"{list(spec.shape)} (-1: any), got {list(shape)}")
    span = spec.dtype.itemsize
    for d in shape:
        span *= d or 1
    if span > _MAX_BYTES:
        raise TensorError(f"model {model!r}, input {spec.name!r}: shape {list(shape)} is too large "
                          f"for any {spec.datatype} array (its non-zero dims span {span} bytes)")
    return tuple(shape)


def _all_leaves(data: Any, kind: type | tuple[type, ...]) -> bool:
    """Whether every leaf of nested lists ``data`` is an instance of ``kind`` (bools are not)."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, bool) or not isinstance(x, kind):
            return False
    return True


def _check_range(spec: TensorSpec, guess: np.ndarray, data: Any) -> None:
    """OverflowError when an integer of ``data`` is outside the datatype's range. numpy 1.x
    converts such a Python int with a DeprecationWarning (300 as UINT8 read 44, -1 as UINT64 its
    largest value); numpy 2 raises. Checked here whatever numpy does."""
    info = np.iinfo(spec.dtype)
    if guess.dtype.kind in "iu":  # exact: numpy held every value as an integer
        low, high = int(guess.min()), int(guess.max())
    elif guess.dtype.kind == "b":
        return
    else:  # ints beyond int64 (a float or object guess): from the leaves themselves
        leaves: list[int] = []
        stack = [data]
        while stack:
            x = stack.pop()
            if isinstance(x, list):
                stack.extend(x)
            else:
                leaves.append(int(x))
        low, high = min(leaves), max(leaves)
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise OverflowError(f"{bad} is outside the range of {spec.datatype} ({info.min} to {info.max})")


def from_json(model: str, spec: TensorSpec, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """An array from v2 JSON ``data`` (flat or nested, row-major)."""
    count = math.prod(shape)
    try:
        if spec.datatype == "BYTES":
            flat = np.asarray(data, dtype=object).reshape(-1)
            arr = np.empty(flat.size, dtype=object)
            for i, v in enumerate(flat):
                if isinstance(v, str):
                    v = v.encode()
                if not isinstance(v, bytes):
                    raise TypeError(f"element {i} is {type(v).__name__}, not a string")
                arr[i] = v
        elif spec.datatype == "BOOL":
            arr = np.asarray(data)
            if arr.size and arr.dtype != np.bool_:
                raise TypeError("elements must be true or false")
            arr = arr.astype(np.bool_).reshape(-1)
        else:
            arr = np.asarray(data)
            # Numbers only: true and false are BOOL's (they were taken as 1 and 0).
            allowed = "iu" if spec.dtype.kind in "iu" else "iuf"
            # Python ints numpy cannot hold as int64 (UINT64 values >= 2**63, or beyond any
            # int) make the guess float64 or object: valid data if every leaf is a number of
            # the kind the datatype takes; the conversion below refuses one out of range.
            if (arr.size and arr.dtype.kind not in allowed
                    and not (arr.dtype.kind in "fO" and _all_leaves(data, int if "f" not in allowed else (int, float)))):
                if arr.dtype.kind == "f" and "f" not in allowed:
                    _check_not_wide_ints(spec, arr)
                raise TypeError(f"elements must be {'integers' if spec.dtype.kind in 'iu' else 'numbers'}, "
                                f"got {arr.dtype}")
            if spec.dtype.kind in "iu" and arr.size:
                _check_range(spec, arr, data)
            with np.errstate(over="ignore"):  # a value past the type's range: refused below, not warned
                arr = np.asarray(data, dtype=spec.dtype).reshape(-1)
            if spec.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
                _check_float_range(spec, arr, data)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise TensorError(f"model {model!r}, input {spec.name!r}: 'data' is not {spec.datatype} "
                          f"data: {e}") from None
    if arr.size != count:
        raise TensorError(f"model {model!r}, input {spec.name!r}: shape {list(shape)} needs "
                          f"{count} elements, 'data' has {arr.size}")
    return arr.reshape(shape)


def _check_not_wide_ints(spec: TensorSpec, arr: np.ndarray) -> None:
    """Integer data that arrived as floats: the HTTP front's JSON reader (orjson) reads an
    integer beyond 64 bits, such as 2**64, as a float. Whole numbers past every 64-bit type are
    said to be out of the datatype's range, not "not integers"."""
    with np.errstate(invalid="ignore"):
        whole = np.isfinite(arr) & (arr == np.trunc(arr))
    wide = whole & ((arr >= 2.0**64) | (arr < -(2.0**63)))
    if whole.all() and wide.any():
        i = int(np.argmax(wide))
        raise ValueError(f"element {i} ({arr.reshape(-1)[i]:.0f}, an integer beyond 64 bits) is outside the range of "
                         f"{spec.datatype}")


def _check_float_range(spec: TensorSpec, arr: np.ndarray, data: Any) -> None:
    """Refuses a finite number that became infinite in ``spec``'s type (FP32 1e39, FP16
    70000): it was served as inf. NaN and Infinity given as such stay."""
    src = np.asarray(data, dtype=np.float64).reshape(-1)
    over = np.isinf(arr) & np.isfinite(src)
    if over.any():
        i = int(np.argmax(over))
        raise ValueError(f"element {i} ({src[i]:g}) is outside the range of {spec.datatype} "
                         f"(at most {float(np.finfo(spec.dtype).max):g} in magnitude)")


def from_bytes(model: str, spec: TensorSpec, shape: tuple[int, ...], buf: memoryview) -> np.ndarray:
    """An array over ``buf`` (raw little-endian tensor bytes; BYTES: 4-byte length + bytes per
    element). No copy when ``buf`` is aligned for the datatype."""
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        if count > len(buf) // _LEN.size:  # before allocating: a short header may declare any count
            raise TensorError(f"model {model!r}, input {spec.name!r}: shape {list(shape)} has {count} "
                              f"BYTES elements, but {len(buf)} bytes hold at most {len(buf) // _LEN.size} "
                              f"(each takes a {_LEN.size}-byte length)")
        arr = np.empty(count, dtype=object)
        pos, end = 0, len(buf)
        for i in range(count):
            if pos + 4 > end:
                raise TensorError(f"model {model!r}, input {spec.name!r}: BYTES data ends at "
                                  f"element {i} of {count} ({end} bytes)")
            (n,) = _LEN.unpack_from(buf, pos)
            if pos + 4 + n > end:
                raise TensorError(f"model {model!r}, input {spec.name!r}: BYTES element {i} "
                                  f"says {n} bytes, {end - pos - 4} left")
            arr[i] = bytes(buf[pos + 4: pos + 4 + n])
            pos += 4 + n
        if pos != end:
            raise TensorError(f"model {model!r}, input {spec.name!r}: {end - pos} bytes after "
                              f"the last of {count} BYTES elements")
        return arr.reshape(shape)
    dtype = spec.dtype.newbyteorder("<")
    if len(buf) != count * dtype.itemsize:
        raise TensorError(f"model {model!r}, input {spec.name!r}: shape {list(shape)} of "
                          f"{spec.datatype} needs {count * dtype.itemsize} bytes, got {len(buf)}")
    arr = np.frombuffer(buf, dtype=dtype)
    if spec.datatype == "BOOL" and arr.size and (byte := np.frombuffer(buf, dtype=np.uint8)).max() > 1:
        # A bool is the byte 0 or 1: another byte made a bool numpy compares and sums as itself.
        i = int(np.argmax(byte > 1))
        raise TensorError(f"model {model!r}, input {spec.name!r}: BOOL element {i} is the byte "
                          f"{buf[i]:#04x}; a BOOL is the byte 0 or 1")
    if not arr.flags.aligned:
        arr = arr.copy()
    return arr.reshape(shape)


def to_bytes(spec: TensorSpec, arr: np.ndarray) -> bytes:
    """The raw little-endian bytes of an output (BYTES: 4-byte length + bytes per element)."""
    if spec.datatype == "BYTES":
        # Appended to one buffer: a list of two parts per element held two Python objects per
        # element at once (12 million one-byte elements: gigabytes).
        out = bytearray()
        for v in arr.reshape(-1):
            b = v.encode() if isinstance(v, str) else bytes(v)
            out += _LEN.pack(len(b))
            out += b
        return bytes(out)
    return np.ascontiguousarray(arr, dtype=spec.dtype.newbyteorder("<")).tobytes()


OFF_LOOP_BYTES = 1 << 20
"""Requests and answers that cost at least this much to convert (see :func:`conversion_bytes`)
are converted on a worker thread, by both fronts: on the event loop a 15 MB request held every
other request and probe for seconds."""

PER_ELEMENT_BYTES = 64
"""What converting one element that is a Python object (BYTES; typed gRPC contents) costs, in
bytes of a numeric array: each is made or read one by one (120,000 BYTES elements, 1 MB by
their arrays' size, held the loop for 200 ms)."""


def conversion_bytes(arrays: Iterable[np.ndarray]) -> int:
    """What converting ``arrays`` to or from the wire costs, in bytes of a numeric array: their
    bytes, and PER_ELEMENT_BYTES for each element of an object array."""
    return sum(a.size * PER_ELEMENT_BYTES if a.dtype == object else a.nbytes for a in arrays)


def to_json(model: str, spec: TensorSpec, arr: np.ndarray) -> list[Any]:
    """An output's flat JSON data (BYTES as UTF-8 strings)."""
    if spec.datatype == "BYTES":
        out = []
        for v in arr.reshape(-1):
            if isinstance(v, str):
                out.append(v)
                continue
            try:
                out.append(bytes(v).decode())
            except UnicodeDecodeError:
                raise OutputError(f"model {model!r}, output {spec.name!r}: BYTES element is not "
                                  "UTF-8, which JSON cannot carry; ask for binary_data") from None
        return out
    return arr.reshape(-1).tolist()
