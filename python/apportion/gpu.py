"""GPU quotas, plans and partitions: per model streams with priorities, SM groups, memory budgets.

``GPU(...)`` is one model's GPU quota; it validates every field when it is built (a
:class:`~apportion.errors.QuotaError` naming the field) and again, naming the model, when a
runtime or :func:`plan_gpus` uses it. ``plan_gpus`` is pure and deterministic and runs on
*described* devices (``"h200"``, ``"a100"``, ...) as well as live ones, so plans are computed
and tested without a GPU. :class:`GpuPartition` realises a plan on the live driver: non-blocking
streams in the primary context with the planned priorities and, for SM groups, green contexts
(CUDA 12.4+) provisioned with the group's SMs. A green context guarantees its work those SMs;
the driver does not promise the work stays on them (it documents cases where kernels use more
SMs than provisioned, e.g. under MPS or after a module with dynamic parallelism is loaded on
9.x), nor that disjoint groups run concurrently. The benchmark (bench/gpu) records the SMs each
side really ran on.

Semantics (csrc/apportion/gpu/partition.hpp has the exact rules):

- ``priority``: ``"high"`` is the device's most urgent stream priority, ``"low"`` its least
  (CUDA's default, 0), ``"normal"`` the middle (-2 on a [0, -5] range). An int uses CUDA's
  convention (lower is more urgent) and is clamped into the range; the plan says so. Priorities
  are a scheduling hint: they never preempt running blocks and do not apply to copies.
- ``sm_share`` (of the device's SMs) or ``sm_count`` asks for an SM group. Groups are whole
  units of the device's granularity (8 SMs on Hopper, 4 on Ampere), rounded up; the plan reports
  the rounding and the SMs that stay in no group. Models without a group run on every SM,
  including those of other models' groups.
- Groups and ``memory`` budgets of different models may not add up to more than the device has
  unless the quota says ``allow_overlap=True``: a :class:`~apportion.errors.PlacementError`
  says what is left. Memory budgets are enforced by the framework adapters, not by the driver.
- Without green contexts (old driver), or when the driver's split yields fewer groups than
  planned, an SM group becomes priority-only streams on the whole GPU with a warning, or a
  ``PlacementError`` with ``strict=True``. Realised plans report the driver's SM counts, not
  the planned ones.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from . import _core
from ._private.checks import real
from .errors import PlacementError, QuotaError

__all__ = [
    "GPU",
    "GpuContext",
    "GpuPartition",
    "GpuPlan",
    "described_device",
    "described_device_names",
    "devices",
    "driver_status",
    "gpu_available",
    "gpu_unavailable_reason",
    "parse_memory",
    "plan_gpus",
    "spin_available",
]

_native: Any = _core.gpu
DeviceInfo = _native.DeviceInfo

PRIORITY_CLASSES = ("high", "normal", "low")
MAX_STREAMS = 64

_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but streams=True is a mistake, not a count of one.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _quota_error(model: str | None, field: str, message: str) -> QuotaError:
    sep = "" if message.startswith("=") else " "
    return QuotaError(f"{field}{sep}{message}", model=model, field=f"gpu.{field}")


def parse_memory(value: int | str, *, model: str | None = None, field: str = "memory") -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512MB"``, ``"1.5 GiB"``, ``"1024"``.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB) of 1000;
    case does not matter. Raises QuotaError for anything else or for a size below one byte.
    """
    if _is_int(value):
        n = int(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        m = _MEMORY_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or (unit and unit not in _UNITS):
            raise _quota_error(
                model,
                field,
                f"={value!r} is not a size; use bytes (int) or a number with a unit: "
                "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)",
            )
        # Exact decimal arithmetic: a float loses digits past 2**53 and overflows past ~1e308.
        n = math.floor(Decimal(m.group(1)) * _UNITS.get(unit, 1))
    else:
        raise _quota_error(
            model, field, f"={value!r} must be bytes (int) or a string such as '4GiB'"
        )
    if n < 1:
        raise _quota_error(model, field, f"={value!r} must be at least 1 byte; None means no budget")
    if n >= 1 << 64:
        raise _quota_error(model, field, f"={value!r} is beyond any device's memory (at most 2**64 - 1 bytes)")
    return n


_MAX_DEVICE = 65535
_INT32 = (-(1 << 31), (1 << 31) - 1)  # what the native quota holds for priority and sm_count


def _device_ordinal(model: str | None, value: object) -> int:
    n: int | None = None
    if _is_int(value) and int(value) >= 0:  # type: ignore[call-overload]
        n = int(value)  # type: ignore[call-overload]
    elif isinstance(value, str):
        m = re.fullmatch(r"cuda(?::([0-9]+))?", value.strip())
        if m:
            n = int(m.group(1) or 0)
    if n is None or n > _MAX_DEVICE:
        raise _quota_error(model, "device", f"={value!r} must be a device ordinal in 0..{_MAX_DEVICE} or 'cuda:N'")
    return n


@dataclasses.dataclass(frozen=True)
class GPU:
    """One model's GPU quota (``Runtime.add_model(..., gpu=GPU(...))``).

    ``device``: ordinal or ``"cuda:N"``. ``streams``: CUDA streams the model gets (its instances
    use them round robin). ``priority``: ``"high"``, ``"normal"``, ``"low"`` or a CUDA priority
    int. ``sm_share`` in (0, 1] or ``sm_count`` >= 1 (not both): an SM group. ``memory``: a
    budget, bytes or ``"4GiB"``/``"512MB"``; normalised to bytes. ``allow_overlap``: its SMs and
    memory may overlap other models'. ``strict``: fail instead of falling back to priority-only
    streams when the SM group cannot be built.
    """

    device: int | str = 0
    streams: int = 1
    priority: str | int = "normal"
    sm_share: float | None = None
    sm_count: int | None = None
    memory: int | str | None = None
    allow_overlap: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        self._check(None)

    def validate(self, model: str) -> GPU:
        """Checks every field again with errors naming ``model``; returns self."""
        if not isinstance(model, str) or not model:
            raise QuotaError(f"GPU quota needs a model name, got {model!r}")
        self._check(model)
        return self

    def _check(self, model: str | None) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        set_(self, "device", _device_ordinal(model, self.device))
        if not _is_int(self.streams) or not 1 <= int(self.streams) <= MAX_STREAMS:
            raise _quota_error(
                model, "streams", f"={self.streams!r} must be an integer in 1..{MAX_STREAMS}"
            )
        p = self.priority
        if isinstance(p, str):
            if p not in PRIORITY_CLASSES:
                raise _quota_error(
                    model, "priority", f"={p!r} must be 'high', 'normal', 'low' or an int"
                )
        elif not _is_int(p) or not _INT32[0] <= int(p) <= _INT32[1]:
            raise _quota_error(
                model, "priority", f"={p!r} must be 'high', 'normal', 'low' or a 32-bit int"
            )
        if self.sm_share is not None:
            s = self.sm_share
            sf = real(s)
            if sf is None or not 0.0 < sf <= 1.0:
                raise _quota_error(model, "sm_share", f"={s!r} must be a number in (0, 1]")
            if self.sm_count is not None:
                raise _quota_error(
                    model, "sm_share", "and gpu.sm_count are both set; give one of them"
                )
        if self.sm_count is not None and (not _is_int(self.sm_count) or not 1 <= int(self.sm_count) <= _INT32[1]):
            raise _quota_error(model, "sm_count", f"={self.sm_count!r} must be an integer in 1..{_INT32[1]}")
        if self.memory is not None:
            set_(self, "memory", parse_memory(self.memory, model=model))
        for flag in ("allow_overlap", "strict"):
            if not isinstance(getattr(self, flag), bool):
                raise _quota_error(model, flag, f"={getattr(self, flag)!r} must be True or False")

    @property
    def wants_sm_group(self) -> bool:
        return self.sm_share is not None or self.sm_count is not None

    def to_native(self, model: str) -> dict[str, Any]:
        """The dict ``_core.gpu.plan_gpus`` takes."""
        return {
            "model": model,
            "device": self.device,
            "streams": int(self.streams),
            "priority": self.priority if isinstance(self.priority, str) else int(self.priority),
            "sm_share": None if self.sm_share is None else float(self.sm_share),
            "sm_count": None if self.sm_count is None else int(self.sm_count),
            "memory": self.memory,
            "allow_overlap": self.allow_overlap,
            "strict": self.strict,
        }


# --- the driver -------------------------------------------------------------------------------


def driver_status() -> dict[str, Any]:
    """What loading libcuda.so.1 found: ``available``, ``reason``, ``driver_version``,
    ``device_count``, ``green_contexts``, ``green_ctx_stream_create``, ``missing_optional``.
    Loaded once per process; never raises."""
    return dict(_native.driver_status())


def gpu_available() -> bool:
    """True when the CUDA driver loaded, initialised and sees at least one device."""
    return bool(_native.driver_status()["available"])


def gpu_unavailable_reason() -> str | None:
    """Why the GPU layer is unavailable, or None when it is available."""
    st = _native.driver_status()
    return None if st["available"] else str(st["reason"])


def spin_available() -> bool:
    """True when this build has the CUDA spin kernel and the CUDA runtime sees a device."""
    return bool(_native.spin_available())


def described_device_names() -> list[str]:
    return list(_native.described_device_names())


def described_device(name: str, ordinal: int = 0) -> Any:
    """A preset device (``"h200"``, ``"h100"``, ``"a100"``, ``"v100-cuda12.2"``) as a DeviceInfo
    whose fields may be edited. Raises ValueError for an unknown name."""
    return _native.described_device(name, ordinal)


def devices() -> list[Any]:
    """The live devices (DeviceInfo); [] when the driver is unavailable."""
    return list(_native.describe_devices())


# --- plans ------------------------------------------------------------------------------------


class GpuPlan:
    """What each model gets on its GPU. ``str(plan)`` is a table; ``models`` maps name to the
    native ModelGpuPlan (stream count, ``priority``, ``sm_count``, ``sm_units``, ``memory``...);
    ``notes`` say where the plan differs from what was asked."""

    def __init__(self, native: Any) -> None:
        self.native = native
        self.models: dict[str, Any] = {m.model: m for m in native.models}
        self.devices: list[Any] = list(native.devices)
        self.notes: list[str] = list(native.notes)

    def _adopt_realised(self, realised: GpuPlan) -> None:
        # The groups as the driver made them replace the planned ones; ``notes`` stay the
        # planning notes (the fallbacks are the partition's ``warnings``), so a caller that
        # reports both reports each once.
        self.native = realised.native
        self.models = dict(realised.models)
        self.devices = list(realised.devices)

    def without(self, names: Iterable[str]) -> GpuPlan:
        """This plan without the models ``names`` (they left the runtime): the others keep
        what they were given, as the driver realised it."""
        out = GpuPlan(self.native.without(list(names)))
        out.notes = list(self.notes)
        return out

    def __str__(self) -> str:
        return str(self.native)

    def __repr__(self) -> str:
        return f"<GpuPlan models={list(self.models)} notes={len(self.notes)}>"


def _device_list(devs: object) -> list[Any]:
    if devs is None:
        live = devices()
        if not live:
            raise PlacementError(
                f"no GPU is available ({gpu_unavailable_reason()}); pass described devices, "
                "e.g. devices='h200', to plan without one"
            )
        return live
    if isinstance(devs, str | DeviceInfo):
        devs = [devs]
    if not isinstance(devs, Iterable):
        raise TypeError(f"devices must be a preset name, a DeviceInfo or a sequence of them, got {devs!r}")
    out = []
    for i, d in enumerate(devs):
        if isinstance(d, str):
            out.append(described_device(d, i))
        elif isinstance(d, DeviceInfo):
            out.append(d)
        else:
            raise TypeError(f"devices[{i}] must be a DeviceInfo or a preset name, got {d!r}")
    ordinals = [d.ordinal for d in out]
    twice = sorted({o for o in ordinals if ordinals.count(o) > 1})
    if twice:
        # A model on that ordinal would be planned (and realised) once per entry.
        raise QuotaError(f"devices: ordinal {twice[0]} is given more than once ({ordinals}); each device once")
    return out


def plan_gpus(
    models: Mapping[str, GPU] | Iterable[tuple[str, GPU]],
    devices: str | Any | Sequence[str | Any] | None = None,
) -> GpuPlan:
    """Plans every model's GPU quota together.

    ``devices``: None for the live devices, or described ones: a preset name, a DeviceInfo, or a
    sequence of them (names get ordinals 0, 1, ... by position). Raises QuotaError for an invalid
    quota and PlacementError when the quotas do not fit (both with ``.model``).
    """
    items = list(models.items()) if isinstance(models, Mapping) else list(models)
    quotas = []
    for name, quota in items:
        if not isinstance(quota, GPU):
            raise QuotaError(f"must be apportion.GPU(...), got {quota!r}", model=name, field="gpu")
        quotas.append(quota.validate(name).to_native(name))
    return GpuPlan(_native.plan_gpus(quotas, _device_list(devices)))


# --- partitions on the live driver --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class GpuContext:
    """One instance's GPU: its device, its stream (a raw CUstream / cudaStream_t as int), the SMs
    of the green context that stream lives in as the driver made it (0: no green context, the
    whole GPU) and the model's memory budget (0: none).
    Implements the CUDA stream protocol (``__cuda_stream__``), so libraries that speak it accept
    the object directly."""

    model: str
    device: int
    stream_ptr: int
    sm_count: int
    priority: int
    memory: int
    green_context: bool

    def __cuda_stream__(self) -> tuple[int, int]:
        # (protocol version, handle) as the CUDA Python stream protocol defines it.
        return (0, self.stream_ptr)

    def torch_stream(self) -> Any:
        """``torch.cuda.ExternalStream`` over this stream (torch is imported here, lazily)."""
        import torch

        return torch.cuda.ExternalStream(self.stream_ptr, device=torch.device("cuda", self.device))

    def cupy_stream(self) -> Any:
        """``cupy.cuda.ExternalStream`` over this stream (cupy is imported here, lazily)."""
        import cupy

        return cupy.cuda.ExternalStream(self.stream_ptr, self.device)


class GpuPartition:
    """A plan realised on the live driver. ``context(model, instance)`` hands out the instance's
    :class:`GpuContext`; ``warnings`` lists fallbacks taken (an SM group the driver could not
    build: the model's streams then run on the whole GPU); ``plan`` is the plan as realised (the
    driver's SM counts; notes end with the fallbacks). ``close()`` (idempotent; also on ``with``
    exit) destroys every stream and green context, after which the stream pointers are invalid.
    Raises PlacementError when no GPU is usable or a strict SM group cannot be built.

    The ``plan`` given is updated to the realised groups too (its ``notes`` stay the planning
    notes), so whoever shows that plan shows what the driver built."""

    def __init__(self, plan: GpuPlan) -> None:
        self._native = _native.GpuPartition(plan.native)
        self.warnings: list[str] = list(self._native.warnings)
        self.plan = GpuPlan(self._native.plan)
        plan._adopt_realised(self.plan)

    def context(self, model: str, instance: int = 0) -> GpuContext:
        m = self._native.find(model)
        if m is None:
            raise KeyError(model)
        if not m.streams:
            raise RuntimeError("the GPU partition is closed")
        return GpuContext(
            model=model,
            device=m.device,
            stream_ptr=int(m.streams[instance % len(m.streams)]),
            sm_count=m.sm_count,
            priority=m.priority,
            memory=m.memory,
            green_context=m.green_context,
        )

    def streams(self, model: str) -> list[int]:
        m = self._native.find(model)
        if m is None:
            raise KeyError(model)
        return [int(s) for s in m.streams]

    @property
    def closed(self) -> bool:
        return bool(self._native.closed)

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> GpuPartition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
