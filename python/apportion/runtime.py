"""The runtime: named models, each served by its own worker threads, behind bounded queues."""

from __future__ import annotations

import asyncio
import atexit
import numbers
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import _core
from .errors import QuotaError
from .stats import ModelStats, RuntimeStats

__all__ = ["InstanceContext", "Runtime"]

_DEFAULT_MAX_QUEUE = 1024
_MAX_INSTANCES = 1024


@dataclass(frozen=True, slots=True)
class InstanceContext:
    """What a factory learns about the instance it builds (passed as ``factory(ctx)``).

    The factory runs inside the instance's own worker thread, so thread pools it creates there
    belong to that instance.
    """

    model: str
    instance: int
    instances: int
    threads: int | None = None
    cpus: tuple[int, ...] | None = None
    gpu: Any = None


def _quota_int(model: str, field: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise QuotaError(
            f"model {model!r}: {field} must be an integer >= {minimum}, got {value!r} "
            f"({type(value).__name__})"
        )
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise QuotaError(f"model {model!r}: {field} must be an integer {bound}, got {v}")
    return v


def _quota_timeout(model: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise QuotaError(
            f"model {model!r}: timeout_ms must be a positive number of milliseconds or None, "
            f"got {value!r}"
        )
    v = float(value)
    if not v > 0 or v == float("inf"):
        raise QuotaError(
            f"model {model!r}: timeout_ms must be a positive, finite number of milliseconds "
            f"or None, got {value!r}"
        )
    return v


_live: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _close_live_runtimes() -> None:
    # Worker threads must be gone before the interpreter finalises: a C++ thread that touches
    # a finalising interpreter hangs or dies mid-call. Queued work is cancelled, running calls
    # finish.
    for rt in list(_live):
        try:
            rt.close(drain=False)
        except Exception:  # noqa: BLE001 - nothing useful to do at exit but go on
            pass


class Runtime(_core._Runtime):
    """Serves several models side by side, each with its own workers, queue and limits.

    Usage::

        rt = Runtime()
        rt.add_model("ranker", factory=build_ranker, instances=2, max_queue=256)
        rt.start()
        y = rt.submit("ranker", x).result()
        rt.close()

    ``submit`` and ``submit_many`` are safe from any thread; so are ``add_model`` and
    ``remove_model`` while the runtime serves other models.
    """

    def __init__(self, cpus: Iterable[int] | None = None) -> None:
        super().__init__()
        if cpus is not None:
            cpus = tuple(cpus)
            if not cpus or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0
                               for c in cpus):
                raise QuotaError(f"Runtime: cpus must be None or non-empty CPU ids >= 0, got {cpus!r}")
        self._cpus = cpus
        _live.add(self)

    # -- models -------------------------------------------------------------------------------
    def add_model(
        self,
        name: str,
        factory: Callable[[InstanceContext], Callable[[Any], Any]] | None = None,
        *,
        model: Callable[[Any], Any] | None = None,
        instances: int = 1,
        threads: int | None = None,
        max_queue: int = _DEFAULT_MAX_QUEUE,
        timeout_ms: float | None = None,
        priority_levels: int = 1,
        spin_us: float = 50.0,
    ) -> None:
        """Registers a model. Pass ``factory`` (called as ``factory(ctx)`` once per instance,
        inside that instance's worker thread, returning the callable to serve) or ``model``
        (one callable shared by every instance).

        ``max_queue`` bounds queued requests (beyond it ``submit`` raises QueueFull);
        ``timeout_ms`` is the default deadline (a request's own may only be shorter).
        If the runtime is started, the instances are built before this returns and a factory's
        exception is raised here.
        """
        if not isinstance(name, str) or not name:
            raise QuotaError(f"model name must be a non-empty string, got {name!r}")
        if (factory is None) == (model is None):
            raise QuotaError(f"model {name!r}: pass exactly one of factory= or model=")
        if factory is not None and not callable(factory):
            raise QuotaError(f"model {name!r}: factory must be callable, got {type(factory).__name__}")
        if model is not None and not callable(model):
            raise QuotaError(f"model {name!r}: model must be callable, got {type(model).__name__}")
        instances = _quota_int(name, "instances", instances, 1, _MAX_INSTANCES)
        if threads is not None:
            threads = _quota_int(name, "threads", threads, 1)
        max_queue = _quota_int(name, "max_queue", max_queue, 1, 1 << 30)
        timeout = _quota_timeout(name, timeout_ms)
        priority_levels = _quota_int(name, "priority_levels", priority_levels, 1, 256)
        if isinstance(spin_us, bool) or not isinstance(spin_us, numbers.Real) or not 0 <= spin_us <= 1e6:
            raise QuotaError(
                f"model {name!r}: spin_us must be a number of microseconds in [0, 1e6], got {spin_us!r}"
            )

        # The native runtime owns this closure: it must not reference the runtime itself, or
        # the cycle (invisible to the garbage collector) would keep an unused runtime alive.
        cpus = self._cpus

        def make_instance(index: int) -> Callable[[Any], Any]:
            if model is not None:
                return model
            ctx = InstanceContext(model=name, instance=index, instances=instances,
                                  threads=threads, cpus=cpus)
            fn = factory(ctx)  # type: ignore[misc]
            if not callable(fn):
                raise TypeError(
                    f"model {name!r}: factory returned {type(fn).__name__}, which is not callable"
                )
            return fn

        self._add_model(name, make_instance, instances, max_queue, timeout, priority_levels,
                        float(spin_us))

    @property
    def models(self) -> list[str]:
        """Names of the registered models, sorted."""
        return self._model_names()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Runtime:
        """Builds every model's instances (factories run in their worker threads) and starts
        serving. Requests submitted before start() wait in their queues."""
        self._start()
        return self

    def close(self, drain: bool = True) -> None:
        """Stops accepting requests. ``drain=True`` finishes queued work; ``drain=False``
        cancels it. Running calls always finish. Idempotent; returns when workers have exited."""
        self._close(drain)

    def __enter__(self) -> Runtime:
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=True)

    # -- asyncio ------------------------------------------------------------------------------
    async def infer(
        self,
        model: str,
        inputs: Any,
        *,
        timeout_ms: float | None = None,
        priority: int | None = None,
    ) -> Any:
        """Submits and awaits one request without blocking the event loop. Cancelling the
        awaiting task cancels the request if it is still queued."""
        loop = asyncio.get_running_loop()
        fut = self.submit(model, inputs, timeout_ms=timeout_ms, priority=priority)
        waiter = loop.create_future()

        def transfer(done: _core.Future) -> None:
            if waiter.done():
                return
            if done.cancelled():
                waiter.cancel()
                return
            exc = done.exception()
            if exc is None:
                waiter.set_result(done.result())
            else:
                waiter.set_exception(exc)

        def on_done(done: _core.Future) -> None:
            # Runs in the worker thread: hand over to the loop's thread, never touch it here.
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(transfer, done)
                except RuntimeError:  # loop closed between the check and the call
                    pass

        fut.add_done_callback(on_done)
        try:
            return await waiter
        except asyncio.CancelledError:
            fut.cancel()
            raise

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> RuntimeStats:
        """Per-model counts and latency percentiles (queue wait, compute, end to end)."""
        return RuntimeStats({n: ModelStats._from_native(n, self._model_stats(n)) for n in self.models})

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("started" if self.started else "new")
        return f"<apportion.Runtime {state} models={self.models}>"
