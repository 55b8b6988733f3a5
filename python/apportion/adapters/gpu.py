"""GPU adapter: run each request on the instance's own stream, inside its memory budget.

The runtime's GPU partition gives every instance a stream (with the model's priority, and
confined to its SM group when the driver supports green contexts). This wrapper makes the
framework use that stream for the call and synchronises it before the request completes, so a
result handed back is ready. Memory budgets: CuPy allocations go through a per-model
``MemoryPool`` with ``set_limit`` (an allocation past the budget raises in that request only);
torch allocations go through a per-model ``torch.cuda.MemPool`` whose size is checked after
each call (a request that left the pool above budget fails with :class:`GpuMemoryExceeded`,
and the model's cached blocks are released).

Which framework: torch if torch is imported (a module or any callable doing torch work), else CuPy if CuPy is imported, else nothing is wrapped and the factory uses
``ctx.gpu`` (``stream_ptr``, ``__cuda_stream__``) itself.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ApportionError

__all__ = ["GpuMemoryExceeded", "GpuUsage", "wrap_for_gpu"]


class GpuMemoryExceeded(ApportionError, MemoryError):
    """A request took its model past the model's GPU memory budget."""


class GpuUsage:
    """GPU memory a model's pool holds, shared by its instances (reported by ``rt.stats()``)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.peak = 0
        self.pool: Any = None
        self.lock = threading.Lock()

    def record(self, used: int) -> None:
        self.used = used
        self.peak = max(self.peak, used)


def _framework() -> str | None:
    # Any callable counts as torch code once torch is imported: the stream is set for whatever
    # torch work it does, and a module is just the common case.
    if sys.modules.get("torch") is not None:
        return "torch"
    if sys.modules.get("cupy") is not None:
        return "cupy"
    return None


class _TorchOnStream:
    def __init__(self, fn: Callable[[Any], Any], gpu: Any, usage: GpuUsage) -> None:
        import torch

        self.fn = fn
        self.gpu = gpu
        self.usage = usage
        self.device = torch.device("cuda", gpu.device)
        self.stream = gpu.torch_stream()
        with usage.lock:
            if usage.budget and usage.pool is None:
                usage.pool = torch.cuda.MemPool()

    def __call__(self, x: Any) -> Any:
        import torch

        pool = self.usage.pool
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if pool is not None:
                with torch.cuda.use_mem_pool(pool, self.device):
                    y = self.fn(x)
            else:
                y = self.fn(x)
        self.stream.synchronize()
        if pool is not None:
            used = sum(seg["total_size"] for seg in pool.snapshot())
            self.usage.record(used)
            if used > self.usage.budget:
                del y
                torch.cuda.empty_cache()
                raise GpuMemoryExceeded(
                    f"model {self.gpu.model!r}: GPU memory budget exceeded on cuda:{self.gpu.device} "
                    f"({used} bytes held, budget {self.usage.budget})"
                )
        return y


class _CupyOnStream:
    def __init__(self, fn: Callable[[Any], Any], gpu: Any, usage: GpuUsage) -> None:
        import cupy

        self.fn = fn
        self.gpu = gpu
        self.usage = usage
        self.stream = gpu.cupy_stream()
        with usage.lock:
            if usage.pool is None:
                usage.pool = cupy.cuda.MemoryPool()
                if usage.budget:
                    usage.pool.set_limit(size=usage.budget)

    def __call__(self, x: Any) -> Any:
        import cupy

        with cupy.cuda.Device(self.gpu.device), self.stream, \
                cupy.cuda.using_allocator(self.usage.pool.malloc):
            y = self.fn(x)
        self.stream.synchronize()
        self.usage.record(int(self.usage.pool.total_bytes()))
        return y


def wrap_for_gpu(fn: Callable[[Any], Any], gpu: Any, usage: GpuUsage) -> Callable[[Any], Any]:
    """Wraps the served callable ``fn`` to run on ``gpu``'s stream within its budget."""
    kind = _framework()
    if kind == "torch":
        return _TorchOnStream(fn, gpu, usage)
    if kind == "cupy":
        return _CupyOnStream(fn, gpu, usage)
    return fn
