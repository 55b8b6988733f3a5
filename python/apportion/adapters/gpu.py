"""GPU adapter: run each request on the instance's own stream, inside its memory budget.

The runtime's GPU partition gives every instance a stream (with the model's priority, and in
its SM group's green context when the driver supports them). This wrapper makes the framework
use that stream for the call and synchronises it before the request completes, so a result
handed back is ready. Everything is bound to the model's device, whatever device is current in
the calling thread.

Memory budgets, per model (its instances share one):

- CuPy: allocations go through a per-model ``MemoryPool`` whose ``set_limit`` is set on the
  model's device; an allocation past the budget raises CuPy's ``OutOfMemoryError`` in that
  request, and CuPy frees its cached blocks before refusing, so later requests are not affected.
- torch: allocations go through a per-model ``torch.cuda.MemPool``. After each call the pool's
  reserved segments on the model's device (which include any peak inside the call) plus the live
  allocations of pools retired earlier are compared with the budget. Past it, the request fails
  with :class:`GpuMemoryExceeded` and the pool is *retired*: a live MemPool keeps its blocks even
  through ``empty_cache()``, so the model gets a fresh pool and the old one is dropped once
  nothing allocated from it is alive. One overrun therefore fails that request only, unless the
  model itself keeps what it allocated.

Which framework: what the model uses, not what happens to be imported. A ``torch.nn.Module``,
or a callable whose code, closure, defaults or attributes reach torch, gets torch's current
stream set; one that reaches CuPy gets CuPy's; one that reaches both gets both. Only when nothing
can be told from the callable (a builtin, a C extension) does the import decide: torch if
imported, else CuPy if imported, else nothing is wrapped and the factory uses ``ctx.gpu``
(``stream_ptr``, ``__cuda_stream__``) itself.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..errors import ApportionError

__all__ = ["GpuMemoryExceeded", "GpuUsage", "frameworks_used", "wrap_for_gpu"]

_FRAMEWORKS = ("torch", "cupy")


class GpuMemoryExceeded(ApportionError, MemoryError):
    """A request took its model past the model's GPU memory budget."""


class GpuUsage:
    """GPU memory a model holds, shared by its instances (reported by ``rt.stats()``).

    ``used`` is what the last call left counted against the budget, summed over the frameworks
    the model uses; ``peak`` the most seen after any call."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.ledgers: dict[str, _Ledger] = {}
        self._held: dict[str, int] = {}

    def record(self, framework: str, held: int) -> int:
        """Sets what ``framework`` holds; returns the model's total."""
        self._held[framework] = held
        self.used = sum(self._held.values())
        self.peak = max(self.peak, self.used)
        return self.used


# --- which framework ------------------------------------------------------------------------


def _framework_of(value: object) -> str | None:
    if isinstance(value, types.ModuleType):
        name = value.__name__
    else:
        # Functions and classes carry the module that defined them; instances their type's.
        defined_in = getattr(value, "__module__", None) if callable(value) else None
        name = defined_in if isinstance(defined_in, str) and defined_in else type(value).__module__
    root = name.partition(".")[0]
    return root if root in _FRAMEWORKS else None


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:  # lambdas, comprehensions and nested functions
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def frameworks_used(obj: object, depth: int = 3) -> frozenset[str]:
    """The GPU frameworks (``"torch"``, ``"cupy"``) that ``obj`` reaches: itself, what its code
    names as globals, its closure, defaults and attributes, ``depth`` references deep."""
    found: set[str] = set()
    seen: set[int] = set()

    def visit(v: object, d: int) -> None:
        if d < 0 or id(v) in seen or isinstance(v, str | bytes | int | float | type(None)):
            return
        seen.add(id(v))
        kind = _framework_of(v)
        if kind is not None:
            found.add(kind)
            return
        if isinstance(v, types.MethodType):
            visit(v.__func__, d)
            visit(v.__self__, d)
        elif isinstance(v, functools.partial):
            for inner in (v.func, *v.args, *v.keywords.values()):
                visit(inner, d - 1)
        elif isinstance(v, types.FunctionType):
            for name in _global_names(v.__code__):
                if name in v.__globals__:
                    visit(v.__globals__[name], d - 1)
            for cell in v.__closure__ or ():
                with contextlib.suppress(ValueError):  # an unfilled cell
                    visit(cell.cell_contents, d - 1)
            for default in v.__defaults__ or ():
                visit(default, d - 1)
        elif isinstance(v, list | tuple | set | frozenset):
            for item in itertools.islice(v, 32):
                visit(item, d - 1)
        elif isinstance(v, dict):
            for item in itertools.islice(v.values(), 32):
                visit(item, d - 1)
        elif not isinstance(v, type):
            call = getattr(type(v), "__call__", None)
            if isinstance(call, types.FunctionType):
                visit(call, d - 1)
            attrs = getattr(v, "__dict__", None)
            if isinstance(attrs, dict):
                for item in itertools.islice(attrs.values(), 32):
                    visit(item, d - 1)

    visit(obj, depth)
    return frozenset(found)


def _frameworks_for(fn: object) -> list[str]:
    used = frameworks_used(fn)
    if used:
        return [k for k in _FRAMEWORKS if k in used]
    for kind in _FRAMEWORKS:
        if sys.modules.get(kind) is not None:
            return [kind]
    return []


# --- memory accounting ------------------------------------------------------------------------


class _Backend(Protocol):
    """One framework's hooks on the model's device (tests hand in fakes)."""

    name: str

    def scope(self, pool: Any) -> contextlib.AbstractContextManager[Any]:
        """The model's device current, its stream the framework's current stream, and (when
        ``pool`` is not None) allocations routed to ``pool``."""

    def synchronize(self) -> None: ...

    def new_pool(self, budget: int) -> Any: ...

    def held(self, pool: Any) -> int:
        """Bytes the current pool counts against the budget."""

    def live(self, pool: Any) -> int:
        """Bytes of allocations from ``pool`` still alive."""

    def release(self) -> None:
        """Hands cached, unused memory of the model's device back to the driver."""


class _Ledger:
    """A model's pools of one framework: the current one, and retired ones that still have live
    allocations (they count until those die). Shared by the model's instances."""

    def __init__(self, backend: _Backend, usage: GpuUsage) -> None:
        self.backend = backend
        self.usage = usage
        self.pool: Any = backend.new_pool(usage.budget)
        self.retired: list[Any] = []
        self._calls: dict[int, int] = {}  # id(pool) -> calls running in it

    def enter(self) -> Any:
        """The pool a call allocates from; counted as in use until :meth:`leave`."""
        with self.usage.lock:
            pool = self.pool
            self._calls[id(pool)] = self._calls.get(id(pool), 0) + 1
            return pool

    def leave(self, pool: Any) -> None:
        with self.usage.lock:
            n = self._calls[id(pool)] - 1
            if n:
                self._calls[id(pool)] = n
            else:
                del self._calls[id(pool)]

    def _kept(self, pool: Any) -> bool:
        # A retired pool counts while something from it lives, or while a call that took it
        # still runs (it may allocate yet: dropped then, what it made would count nowhere).
        return self.backend.live(pool) > 0 or id(pool) in self._calls

    def settle(self) -> int:
        """Records what the model holds after a call; returns the model's total."""
        with self.usage.lock:
            self.retired = [p for p in self.retired if self._kept(p)]
            held = self.backend.held(self.pool)
            held += sum(self.backend.held(p) if id(p) in self._calls else self.backend.live(p)
                        for p in self.retired)
            return self.usage.record(self.backend.name, held)

    def retire(self) -> None:
        """Gives the model a fresh pool; the old one is dropped once nothing from it is alive
        and no call runs in it."""
        with self.usage.lock:
            old, self.pool = self.pool, self.backend.new_pool(self.usage.budget)
            if self._kept(old):
                self.retired.append(old)
            del old
            self.backend.release()
        self.settle()


class _OnStream:
    """Runs ``fn`` on the instance's stream with one framework, inside the model's budget."""

    def __init__(self, fn: Callable[[Any], Any], gpu: Any, usage: GpuUsage,
                 backend: _Backend, *, pooled: bool) -> None:
        self.fn = fn
        self.gpu = gpu
        self.usage = usage
        self.backend = backend
        self.ledger: _Ledger | None = None
        if pooled:
            with usage.lock:
                self.ledger = usage.ledgers.get(backend.name)
                if self.ledger is None:
                    self.ledger = usage.ledgers[backend.name] = _Ledger(backend, usage)

    def __call__(self, x: Any) -> Any:
        ledger = self.ledger
        if ledger is None:
            with self.backend.scope(None):
                y = self.fn(x)
            self.backend.synchronize()
            return y
        pool = ledger.enter()
        try:
            with self.backend.scope(pool):
                y = self.fn(x)
            self.backend.synchronize()
        except BaseException:
            # What the failed call left reserved counts now, and a pool it took past the budget
            # is replaced: the next request must not fail for this one.
            ledger.leave(pool)
            if self.usage.budget and ledger.settle() > self.usage.budget:
                ledger.retire()
            raise
        ledger.leave(pool)
        used = ledger.settle()
        if self.usage.budget and used > self.usage.budget:
            del y  # before retiring: what the request made must not keep the old pool
            ledger.retire()
            raise GpuMemoryExceeded(
                f"model {self.gpu.model!r}: GPU memory budget exceeded on "
                f"cuda:{self.gpu.device} ({used} bytes held, budget {self.usage.budget}); "
                "this request failed, the model's pool was replaced"
            )
        return y


# --- the frameworks ---------------------------------------------------------------------------


class _TorchBackend:
    name = "torch"

    def __init__(self, gpu: Any) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", gpu.device)
        self.stream = gpu.torch_stream()

    @contextlib.contextmanager
    def scope(self, pool: Any) -> Iterator[None]:
        torch = self.torch
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if pool is None:
                yield
            else:
                with torch.cuda.use_mem_pool(pool, self.device):
                    yield

    def synchronize(self) -> None:
        self.stream.synchronize()

    def new_pool(self, budget: int) -> Any:
        return self.torch.cuda.MemPool()

    def _segments(self, pool: Any) -> list[dict[str, Any]]:
        # A pool's snapshot covers every device; only the model's counts.
        return [s for s in pool.snapshot(include_traces=False)
                if s.get("device") == self.device.index]

    def held(self, pool: Any) -> int:
        return sum(int(s["total_size"]) for s in self._segments(pool))

    def live(self, pool: Any) -> int:
        return sum(int(s["allocated_size"]) for s in self._segments(pool))

    def release(self) -> None:
        with self.torch.cuda.device(self.device):
            self.torch.cuda.empty_cache()


class _CupyBackend:
    name = "cupy"

    def __init__(self, gpu: Any) -> None:
        import cupy

        self.cupy = cupy
        self.device = gpu.device
        self.stream = gpu.cupy_stream()

    @contextlib.contextmanager
    def scope(self, pool: Any) -> Iterator[None]:
        cuda = self.cupy.cuda
        with cuda.Device(self.device), self.stream:
            if pool is None:
                yield
            else:
                with cuda.using_allocator(pool.malloc):
                    yield

    def synchronize(self) -> None:
        self.stream.synchronize()

    def new_pool(self, budget: int) -> Any:
        pool = self.cupy.cuda.MemoryPool()
        if budget:
            # set_limit applies to the current device's part of the pool.
            with self.cupy.cuda.Device(self.device):
                pool.set_limit(size=budget)
        return pool

    def held(self, pool: Any) -> int:
        # The limit already refused any allocation past the budget; what counts is what lives.
        return self.live(pool)

    def live(self, pool: Any) -> int:
        with self.cupy.cuda.Device(self.device):
            return int(pool.used_bytes())

    def release(self) -> None:
        pass  # CuPy frees its cached blocks itself before refusing an allocation


_BACKENDS: dict[str, Callable[[Any], _Backend]] = {"torch": _TorchBackend, "cupy": _CupyBackend}


def wrap_for_gpu(fn: Callable[[Any], Any], gpu: Any, usage: GpuUsage) -> Callable[[Any], Any]:
    """Wraps the served callable ``fn`` to run on ``gpu``'s stream within its budget."""
    wrapped = fn
    for kind in reversed(_frameworks_for(fn)):
        # torch keeps no pool without a budget (a MemPool only serves accounting); CuPy's pool
        # also reports what the model holds.
        wrapped = _OnStream(wrapped, gpu, usage, _BACKENDS[kind](gpu),
                            pooled=kind == "cupy" or bool(usage.budget))
    return wrapped
