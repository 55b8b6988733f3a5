"""The per-node actor: one :class:`apportion.Runtime` serving that node's share of the plan.

Imported only by :mod:`apportion.ray.cluster` (it imports Ray)."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._private.payload import portable_error
from ..runtime import Runtime
from ..spec import ModelSpec

__all__ = ["ModelCounts", "NodeRuntime", "counts", "raise_portable", "started_runtime"]


@dataclass(frozen=True)
class ModelCounts:
    """One model's request outcomes on one node (or summed over nodes; the latency figures are
    per node only: percentiles do not add up, so a sum carries ``nan``)."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    queued: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")

    @property
    def in_flight(self) -> int:
        return self.submitted - (self.completed + self.failed + self.rejected + self.expired + self.cancelled)

    def __add__(self, other: ModelCounts) -> ModelCounts:
        return ModelCounts(self.submitted + other.submitted, self.completed + other.completed,
                           self.failed + other.failed, self.rejected + other.rejected,
                           self.expired + other.expired, self.cancelled + other.cancelled,
                           self.queued + other.queued)


def raise_portable(model: str, exc: Exception) -> None:
    """Raises, in place of ``exc``, a RuntimeError naming it when Ray could not rebuild it for
    the caller (Ray would hand over its own UnserializableException instead); returns when
    ``exc`` can go as it is. The original stays the new one's cause in the node's own
    traceback."""
    sent = portable_error(model, exc, "the exception could not be sent to the caller as it is")
    if sent is not exc:
        raise sent from exc


def tamed(model: str, exc: BaseException) -> RuntimeError:
    """A model's BaseException that is no Exception (SystemExit, KeyboardInterrupt...) as a
    RuntimeError naming it. Raised as it is out of an actor method it ends the node's actor,
    failing every request the node served (and, retried, the next node's); out of a Serve
    replica's coroutine it stops the replica's event loop."""
    return RuntimeError(f"model {model!r} raised {type(exc).__module__}.{type(exc).__qualname__}: {exc} (sent as "
                        "a RuntimeError: raised as it is, it would end the worker that serves the other requests)")


def runtime_settings(config: Any) -> dict[str, Any]:
    """The settings of a config's ``[runtime]`` table that each node's runtime takes as they
    are (how the shared pool is shared, its reservations); empty for a sequence of specs. Its
    ``cpus`` names CPUs of one host: each node's runtime takes the CPU set the cluster gives it."""
    from ..config import Config

    if not isinstance(config, Config):
        return {}
    return {"shared_pool": config.shared_pool, "pool_reserve": config.pool_reserve,
            "reserve_nice": config.reserve_nice}


def started_runtime(cpu_set: str | None, specs: Sequence[ModelSpec],
                    settings: Mapping[str, Any] | None = None) -> Runtime:
    """A Runtime on ``cpu_set`` serving ``specs`` (with ``settings``, see
    :func:`runtime_settings`), started (closed again if a model fails)."""
    rt = Runtime(cpus=cpu_set, **(settings or {}))
    try:
        for s in specs:
            rt.add(s)
        rt.start()
    except BaseException:
        rt.close(drain=False)
        raise
    return rt


def counts(rt: Runtime) -> dict[str, ModelCounts]:
    """Every model's outcome counts and end-to-end p50/p99 on ``rt``."""
    return {name: ModelCounts(s.submitted, s.completed, s.failed, s.rejected, s.expired, s.cancelled, s.queued,
                              s.end_to_end.p50_ms, s.end_to_end.p99_ms)
            for name, s in rt.stats().items()}


_ABSENT = object()
_CANCELS_KEPT = 4096  # cancels that came before their request (or after it ended), newest kept


class NodeRuntime:
    """Runs on one node (the cluster pins it there and reserves the node's CPUs for it).

    A threaded actor: each request in flight holds one of Ray's actor threads (created as
    needed) while it waits on the runtime. Measured against an asyncio actor awaiting
    ``Runtime.infer``, this is ~150 us less per round trip, most of it Ray's own asyncio path.
    Ray cannot interrupt a running method of a threaded actor, so a caller that gives up on a
    request cancels it by its key (:meth:`cancel`)."""

    def __init__(self, cpu_set: str | None, specs: Sequence[ModelSpec],
                 settings: Mapping[str, Any] | None = None) -> None:
        # A start failure is kept for ready() to raise: raised here, Ray would report only that
        # the actor died, and the caller would lose the error (QuotaError, PlacementError, the
        # factory's own exception).
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}  # key -> the runtime's Future of a request in flight
        self._cancelled: dict[int, None] = {}  # keys cancelled while no request held them
        try:
            self.rt = started_runtime(cpu_set, specs, settings)
        except Exception as e:  # noqa: BLE001 - handed to the cluster by ready()
            self.error = e

    def ready(self) -> tuple[str, int]:
        import ray

        if self.error is not None:
            raise self.error
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def call(self, model: str, inputs: Any, timeout_ms: float | None, priority: int | None, key: int) -> Any:
        """Serves one request and returns its result (or raises its error). ``key``: the
        caller's name for it, for :meth:`cancel`."""
        with self._lock:
            if self._cancelled.pop(key, _ABSENT) is not _ABSENT:
                # Cancelled before it arrived: it never enters the runtime (submitted and then
                # cancelled, an idle worker could start it first).
                raise concurrent.futures.CancelledError(f"request to {model!r} was cancelled before it reached the node")
        fut = self.rt.submit(model, inputs, timeout_ms=timeout_ms, priority=priority)
        with self._lock:
            self._pending[key] = fut
            late = self._cancelled.pop(key, _ABSENT) is not _ABSENT  # came while it was being submitted
        try:
            if late:
                fut.cancel()
            return fut.result()
        except Exception as e:
            raise_portable(model, e)
            raise
        except BaseException as e:  # the model's own (the actor's thread is not interrupted)
            raise tamed(model, e) from None
        finally:
            with self._lock:
                del self._pending[key]

    def cancel(self, key: int) -> bool:
        """Cancels request ``key`` if it is still queued (True when it was). A cancel that
        arrives before its request is kept, and applied when the request comes."""
        with self._lock:
            fut = self._pending.get(key)
            if fut is None:
                self._cancelled[key] = None
                if len(self._cancelled) > _CANCELS_KEPT:
                    del self._cancelled[next(iter(self._cancelled))]
                return False
        return bool(fut.cancel())

    def add(self, specs: Sequence[ModelSpec]) -> list[str]:
        for s in specs:
            if s.name not in self.rt.models:
                self.rt.add(s)
        return list(self.rt.models)

    def models(self) -> list[str]:
        return list(self.rt.models)

    def plan(self) -> str:
        return str(self.rt.plan())

    def stats(self) -> dict[str, ModelCounts]:
        return counts(self.rt)

    def close(self, drain: bool = True) -> None:
        if self.error is None:
            self.rt.close(drain=drain)
