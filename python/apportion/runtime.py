"""The runtime: named models, each served by its own worker threads, behind bounded queues."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import numbers
import os
import pkgutil
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import _core
from .adapters import build_instance
from .batching import Batching, wrap_factory
from .context import InstanceContext
from .adapters.gpu import GpuUsage, wrap_for_gpu
from .errors import ModelNotFound, PinningWarning, PlacementError, QuotaError, RuntimeClosed, raised_on_import
from .futures import on_loop
from .gpu import GPU, GpuPartition, gpu_available, gpu_unavailable_reason, plan_gpus
from .placement import ModelPlan, Plan, Quota, plan
from ._private.claims import CpuClaims
from ._private.cputime import CpuTracker
from ._private.process import NOT_TAKEN, SPAWN_NOTE, ProcessInstance, factory_path, start_spawner
from .spec import DEFAULT_MAX_QUEUE, Isolation, ModelSpec
from .stats import ModelStats, RuntimeStats
from .topology import Topology, format_cpulist, topology

if TYPE_CHECKING:
    from .controller import Controller

__all__ = ["InstanceContext", "Runtime"]

_MAX_QUEUE_BYTES = 256 << 20
"""What a model's queue cells may take together (64 bytes each; every priority lane of every
lane group has 2 x max_queue cells, rounded up to a power of two; see _core._lane_cells):
refused beyond it."""
_CELL_BYTES = 64


def _imported(model: str, field: str, ref: str) -> Any:
    """The object a spec's "module:function" field names, or a QuotaError naming model and field."""
    try:
        return pkgutil.resolve_name(ref)
    except ValueError as e:
        if str(e).startswith("invalid format"):  # pkgutil's own word for a malformed path
            raise QuotaError(f"{ref!r} cannot be imported: {e}", model=model, field=field) from None
        raise QuotaError(f"{ref!r} cannot be imported: importing it raised ValueError: {e}",
                         model=model, field=field) from None
    except (ImportError, AttributeError) as e:
        raise QuotaError(f"{ref!r} cannot be imported: {e}", model=model, field=field) from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the module's own code raised while it was imported
        raise QuotaError(f"{ref!r} cannot be imported: importing it raised {raised_on_import(e)}",
                         model=model, field=field) from None


def _warmup_sizes(spec: ModelSpec) -> list[int]:
    """The batch sizes a batching model is warmed at (see Runtime.add_model)."""
    assert spec.batching is not None
    top = spec.batching.max_size
    sizes = {1, top, *(spec.batching.preferred_sizes or ())}
    b = 2
    while b < top:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def _warmed(spec: ModelSpec, build: Callable[[int], Any]) -> Callable[[int], Any]:
    """``build`` whose instances run the spec's warm-up before they are handed to the worker
    (in the instance's own worker thread, like the factory)."""
    warmup = spec.warmup
    if isinstance(warmup, str):
        warmup = _imported(spec.name, "warmup", warmup)
        if not callable(warmup):
            raise QuotaError(f"{spec.warmup!r} names a {type(warmup).__name__}, not a zero-argument callable "
                             "that returns a sample input", model=spec.name, field="warmup")
    samples = warmup if isinstance(warmup, tuple) else None
    make_sample = warmup if callable(warmup) else None

    def sample(k: int) -> Any:
        if samples is not None:
            return samples[k % len(samples)]
        try:
            return make_sample()  # type: ignore[misc]
        except BaseException as e:
            # Whose it is: the warm-up callable's (a config's tuned plan warms with its inputs).
            with contextlib.suppress(AttributeError, TypeError):
                e.apportion_warmup_sample_of = spec.name  # type: ignore[attr-defined]
            raise

    def build_warm(index: int) -> Any:
        fn = build(index)
        try:
            if spec.batching is not None:
                for size in _warmup_sizes(spec):
                    fn([sample(k) for k in range(size)])
            else:
                for k in range(len(samples) if samples is not None else 1):
                    fn(sample(k))
        except BaseException as e:
            e.add_note(f"(raised by the warm-up of model {spec.name!r}, instance {index})")
            raise
        return fn

    return build_warm


_MAX_UNITS = 65536
"""The most units a pool reservation may hold (the bound of the other counts)."""


def _check_reserve(reserve: Mapping[int, int] | None, nice: Any, scheduled: bool) -> dict[int, int]:
    """Runtime(pool_reserve=, reserve_nice=) validated: {priority_class: units}."""
    if isinstance(nice, bool) or not isinstance(nice, numbers.Integral) or not 1 <= int(nice) <= 19:
        raise QuotaError(f"Runtime: reserve_nice must be an integer in 1..19, got {nice!r}", field="reserve_nice")
    if reserve is None:
        return {}
    if not scheduled:
        raise QuotaError("Runtime: pool_reserve needs shared_pool='scheduled' (this one has shared_pool='os')",
                         field="pool_reserve")
    if not isinstance(reserve, Mapping) or not reserve:
        raise QuotaError(f"Runtime: pool_reserve must be a non-empty {{priority_class: units}} mapping, "
                         f"got {reserve!r}", field="pool_reserve")
    out: dict[int, int] = {}
    for cls, units in reserve.items():
        if isinstance(cls, bool) or not isinstance(cls, numbers.Integral) or not -1000 <= cls <= 1000:
            raise QuotaError(f"Runtime: pool_reserve key {cls!r} is not a priority class "
                             "(an integer in [-1000, 1000])", field="pool_reserve")
        if isinstance(units, bool) or not isinstance(units, numbers.Integral) or not 1 <= units <= _MAX_UNITS:
            raise QuotaError(f"Runtime: pool_reserve[{cls}] must be a unit count in [1, {_MAX_UNITS}], "
                             f"got {units!r}", field="pool_reserve")
        out[int(cls)] = int(units)
    return out


class _GpuState:
    """The runtime's GPU partition, shared with the instance closures (which must not hold the
    runtime itself)."""

    def __init__(self) -> None:
        self.partition: GpuPartition | None = None

    def context(self, model: str, instance: int) -> Any:
        if self.partition is None:
            raise RuntimeError(f"model {model!r}: the GPU partition was not created")
        return self.partition.context(model, instance)

    def close(self) -> None:
        if self.partition is not None:
            self.partition.close()


_UNMOVABLE = {"isolation": "process instances", "gpu": "GPU models", "burst": "models with burst instances"}


def _unmovable(name: str, fld: str) -> QuotaError:
    # GPU models are partitioned together at start(): one cannot be added to a serving runtime
    # either, so "remove it and add it again" would be advice that fails.
    how = ("GPU models are partitioned together at start(): start a new runtime with the new quotas"
           if fld == "gpu" else "remove the model and add it again")
    return QuotaError(f"{_UNMOVABLE[fld]} cannot move while they serve: {how}", model=name, field=fld)


def _plan_without(plan_: Plan, name: str) -> Plan:
    """A running runtime's plan once model ``name`` has left: the others stay where they run
    (a plan made afresh would show a shared model on the freed cores too, and GPU groups other
    than those the driver made, checked against memory the models now use)."""
    return dataclasses.replace(plan_, models=tuple(m for m in plan_.models if m.name != name),
                               gpu=plan_.gpu.without([name]) if plan_.gpu is not None else None)


def _check_burst_pool(name: str, plan_: Plan) -> None:
    """A burst model needs shared-pool CPUs for its burst instances: with none, they would wait
    for the pool for good (and a drained close with them)."""
    if not plan_.shared_pool:
        raise PlacementError(
            f"model {name!r}, field 'burst': the shared pool is empty (exclusive models "
            "hold every CPU), so there is nowhere to burst to", model=name, field="burst"
        )


@dataclass(eq=False)
class _ModelEntry:
    """What the Python side keeps for one registered model (the core keeps its queue, workers
    and stats): one record, dropped whole by remove_model."""

    spec: ModelSpec
    burst: int = 0
    placed: dict[int, tuple[tuple[int, ...], tuple[int, ...], int]] = field(default_factory=dict)
    gpu_usage: GpuUsage | None = None
    processes: list[ProcessInstance] = field(default_factory=list)
    closed_restarts: int = 0
    """Restarts of the process instances closed already (process_restarts keeps counting them)."""
    direct: bool = False
    """Synchronous calls may skip the worker thread (see Runtime.call)."""
    queue_capacity: int = 0
    """The max_queue the model was added with: the size of its queue, which a move may not
    exceed."""
    factory_ref: str | None = None
    """A process model's factory as an import path (its children import it)."""
    building: bool = False
    """add_model on a started runtime still builds and warms its instances."""


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are one object, or equal values (arrays and tensors compare by identity)."""
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an elementwise ==, or one that refuses: not the same
        return False


def _instance_builder(entry: _ModelEntry, spec: ModelSpec, gpu_state: _GpuState,
                      memory_word: str) -> Callable[[int], Any]:
    """What builds (and warms) instance ``index`` of ``spec``'s model in its worker thread.

    The native runtime owns these closures: they must not reference the runtime itself, or the
    cycle (invisible to the garbage collector) would keep an unused runtime alive."""
    name = spec.name
    quota = spec.quota
    placed = entry.placed
    procs = entry.processes
    usage = entry.gpu_usage
    factory_ref = entry.factory_ref
    # Without the warm-up samples: the parent warms the instance through its proxy, and the
    # child's spec travels as JSON on its command line (an array sample is not JSON, a large
    # one overflows the argument).
    child_spec = dataclasses.replace(spec, factory=factory_ref, warmup=None) if factory_ref is not None else None

    def make_process_instance(index: int) -> Callable[[Any], Any]:
        cpus, nodes, planned_threads = placed.get(index, (None, (), spec.threads))
        # On a single CPU the proxy's spin only delays the child it waits for (they share
        # that CPU): park at once there (measured: 75-100 us round trips with the spin,
        # 52-55 us without, on the 2-core VM). Likewise the child's spin after a direct
        # call would only delay the worker thread pinned to that CPU.
        proxy_spin = spec.spin_us if cpus is None or len(cpus) > 1 else 0.0
        assert child_spec is not None
        proxy = ProcessInstance(child_spec, instance=index, threads=planned_threads, cpus=cpus,
                                memory_nodes=nodes, memory_policy=memory_word, spin_us=proxy_spin)
        # Listed before its child starts, so that close(drain=False) can stop a start that
        # hangs.
        procs.append(proxy)
        try:
            proxy.start()
        except BaseException as e:
            if not any(n.startswith(SPAWN_NOTE) for n in getattr(e, "__notes__", ())):
                e.add_note(f"(raised by the factory of model {name!r}, instance {index}, in its worker process)")
            raise
        return proxy

    def make_instance(index: int) -> Callable[[Any], Any]:
        cpus, nodes, planned_threads = placed.get(index, (None, (), spec.threads))
        gpu_ctx = gpu_state.context(name, index) if usage is not None else None
        is_burst = index >= spec.instances
        ctx = InstanceContext(model=name, instance=index, instances=spec.instances,
                              threads=planned_threads, cpus=cpus, memory_nodes=nodes,
                              isolation="shared" if is_burst else quota.isolation, gpu=gpu_ctx,
                              burst=is_burst, own_cpus=quota.isolation == "exclusive" and not is_burst)
        try:
            fn = build_instance(ctx, None if spec.model is not None else spec.factory,  # type: ignore[arg-type]
                                spec.model)
        except BaseException as e:
            e.add_note(f"(raised by the factory of model {name!r}, instance {index})")
            raise
        return wrap_for_gpu(fn, gpu_ctx, usage) if usage is not None else fn

    build: Callable[[int], Any] = make_process_instance if spec.process else make_instance
    if spec.batching is not None:
        build = wrap_factory(name, build, spec.batching.single_unbatched)
    if spec.warmup is not None:
        build = _warmed(spec, build)
    return build


_live: weakref.WeakSet[Runtime] = weakref.WeakSet()


def _abort_starting_children() -> None:
    # Runs before the interpreter waits for non-daemon threads: a thread still waiting for a
    # process instance's child to build its model would otherwise hold exit for up to
    # start_timeout_s. Children that already serve are left to the exit handler below.
    for rt in list(_live):
        if rt._forked:
            continue  # its children belong to the parent
        for entry in list(rt._models.values()):
            for proxy in list(entry.processes):
                proxy.abort_start()


threading._register_atexit(_abort_starting_children)  # type: ignore[attr-defined]


@atexit.register
def _close_live_runtimes() -> None:
    # Worker threads must be gone before the interpreter finalises: a C++ thread that touches
    # a finalising interpreter hangs or dies mid-call. Queued work is cancelled, running calls
    # finish; except where a close(drain=True) was interrupted (Ctrl-C): its drain goes on and
    # is waited for, as the next close() would, unless Ctrl-C comes again.
    for rt in list(_live):
        drain = rt._drain_pending
        try:
            rt.close(drain=drain)
        except KeyboardInterrupt:
            if drain:
                with contextlib.suppress(Exception):
                    rt.close(drain=False)
        except Exception:  # noqa: BLE001 - nothing useful to do at exit but go on
            pass
    # Runtimes dropped inside one of their own workers are closed by a background thread.
    _core._join_orphans()


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

    def __init__(
        self,
        cpus: Iterable[int] | str | None = None,
        *,
        topology_root: str = "/",
        shared_pool: str = "os",
        pool_reserve: Mapping[int, int] | None = None,
        reserve_nice: int = 10,
    ) -> None:
        """``cpus``: the CPUs this runtime may use (ids or a list like "0-7"); None means every
        CPU this process may use. ``topology_root`` reads the machine from another sysfs tree
        (tests and planning for other machines).

        ``shared_pool``: how models with ``isolation="shared"`` share the CPUs no exclusive
        model holds. "os" (default): every shared worker runs whenever it has work and the OS
        balances them. "scheduled": each model call first takes units of the pool (one per
        intra-op thread; the pool has one per CPU), granted to the highest ``priority_class``
        first, then by ``weight``; an idle model's share goes to the busy ones; burst instances
        of exclusive models borrow from it. A call holds its units until it returns, sleeping
        or not: a call that waits for another pooled model's result can deadlock the pool
        once every unit is held by such waiting calls (keep such pipeline models exclusive).

        ``pool_reserve`` (scheduled pool only): ``{priority_class: units}``. Grants happen
        between calls, so without it a high-class request waits for whatever lower-class call
        holds the units, however long that call is. With ``{1: 1}``, models of class 1 and
        above may hold one unit beyond the pool's capacity: their call starts at once, on a CPU
        where a lower-class call runs, and gets that CPU because the workers of every class
        below a reservation run at a lower OS priority (their nice raised by ``reserve_nice``,
        1-19, default 10; threads they create, such as intra-op pools, inherit it). Lower
        classes lose only the CPU time the reserved class uses; no capacity sits idle waiting
        for it. Their workers also yield to other processes at that nice."""
        super().__init__()
        if shared_pool not in ("scheduled", "os"):
            raise QuotaError(f"Runtime: shared_pool must be 'scheduled' or 'os', got {shared_pool!r}",
                             field="shared_pool")
        self._scheduled = shared_pool == "scheduled"
        self._pool_reserve = _check_reserve(pool_reserve, reserve_nice, self._scheduled)
        if self._pool_reserve:
            self._set_pool_reserve(sorted(self._pool_reserve.items()), reserve_nice)
        if cpus is not None and not isinstance(cpus, str):
            cpus = tuple(cpus)
            if not cpus or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0
                               for c in cpus):
                raise QuotaError(f"Runtime: cpus must be None or non-empty CPU ids >= 0, got {cpus!r}", field="cpus")
        elif isinstance(cpus, str):
            try:
                _core.parse_cpulist(cpus)
            except ValueError as e:
                raise QuotaError(f"Runtime: cpus {cpus!r} is not a CPU list such as '0-3,8': {e}",
                                 field="cpus") from None
        self._cpus = cpus
        self._topology_root = topology_root
        self._topo: Topology | None = None
        self._models: dict[str, _ModelEntry] = {}
        self._plan: Plan | None = None
        self._gpu = _GpuState()
        self._cpu = CpuTracker()
        self._claims = CpuClaims()
        # add_model, remove_model and start change the models' records one at a time; close()
        # does not wait for it (it must be able to stop a start that hangs).
        self._admin = threading.RLock()
        self._controller: Controller | None = None  # set by Controller.start()
        _live.add(self)

    # -- models -------------------------------------------------------------------------------
    def add_model(
        self,
        name: str,
        factory: Callable[[InstanceContext], Any] | str | None = None,
        *,
        model: Any = None,
        instances: int = 1,
        threads: int | None = None,
        cores: int | str | Sequence[int] | None = None,
        isolation: Isolation = "shared",
        numa: int | Literal["auto"] = "auto",
        smt: bool = False,
        memory_policy: Literal["bind", "prefer", "none"] = "bind",
        oversubscribe: bool = False,
        max_queue: int = DEFAULT_MAX_QUEUE,
        timeout_ms: float | None = None,
        priority_levels: int = 1,
        on_timeout: Literal["reject", "delay"] = "reject",
        admission: Literal["queue", "deadline"] = "queue",
        batching: Batching | None = None,
        spin_us: float = 50.0,
        gpu: GPU | None = None,
        weight: float | None = None,
        priority_class: int | None = None,
        burst: bool | int = False,
        watchdog_s: float | None = None,
        start_timeout_s: float | None = None,
        warmup: Sequence[Any] | Callable[[], Any] | str | None = None,
    ) -> None:
        """Registers a model. Pass ``factory`` (called as ``factory(ctx)`` once per instance,
        inside that instance's pinned worker thread, returning the model to serve) or ``model``
        (one object shared by every instance). A torch module is served in inference mode with
        the instance's intra-op threads; any other callable as it is.

        Resources (validated here, placed with every other model; see ``plan()``):
        ``cores`` (a count of physical cores or a CPU list like "0-3,8"), ``isolation``
        ("exclusive": cores of its own; "shared": the shared pool), ``instances`` (concurrent
        executions, each a worker thread), ``threads`` (intra-op threads per instance),
        ``numa``, ``smt``, ``memory_policy``, ``oversubscribe``.
        The instances of a model pull from one queue (an idle instance takes the next request);
        when they were placed on several NUMA nodes, each node gets its own queue: a request
        goes to the queue of the node it is submitted from (else round-robin), and stays on
        that node while its instances keep up; an instance whose node's queue is empty steals
        from the others (``stats()[name].stolen`` counts those), after watching its own queue
        for at most ``spin_us``: work stays node-local when load allows, and is never left
        waiting behind busy instances while another node's instance is idle.

        Queueing: ``max_queue`` bounds queued requests (beyond it ``submit`` raises QueueFull);
        ``timeout_ms`` is the default deadline (a request's own may only be shorter).
        ``priority_levels``: requests carry ``priority=`` 0 (served first) to levels - 1; a
        worker always takes the highest non-empty level. ``on_timeout``: what happens to a
        request whose deadline passes before it starts: "reject" (DeadlineExceeded, never run)
        or "delay" (it still runs, after every request that is still in time).
        ``admission``: "queue" (default) refuses only beyond ``max_queue``; "deadline" also
        refuses at once (QueueFull, saying so) a request with a deadline that would wait past
        it: while the model is backlogged, the requests queued ahead of it times the model's
        measured pace (time between completions per request, all instances together), plus
        its own call's measured duration (both smoothed over about eight calls, and measured
        again after a move), plus how late recent requests ran against that estimate (a margin
        learned from every completion and expiry: it rises at once when calls stretch after
        admission, as when other processes take the CPUs, and decays as requests finish in
        time). A burst then turns into
        refusals at submit instead of requests that hold a slot, expire in the queue or
        complete late. Needs ``priority_levels=1``.
        ``batching``: an :class:`~apportion.Batching`; the model then receives a list of inputs
        (or stacked arrays/tensors) and returns one result per input.
        GPU: ``gpu=ap.GPU(device, streams, priority, sm_share | sm_count, memory)`` gives each
        instance its own stream (``ctx.gpu``) with the planned priority and SM group; the call
        runs on it and the stream is synchronised before the request completes. A GPU quota on a
        machine without a usable GPU is a QuotaError saying why. GPU models are added before
        start().

        Sharing the pool (with ``Runtime(shared_pool="scheduled")``): a shared model's
        calls draw on the pool's capacity. ``priority_class`` (default 0): a higher class is
        always granted the next free capacity first (at call boundaries: a running call is
        never preempted). ``weight`` (default 1.0): among backlogged models of one class, each
        gets pool time (call duration x threads) in proportion to its weight; capacity a model
        does not use goes to the others. ``burst`` (exclusive models only): True (as many as
        ``instances``) or a count of extra instances that run on the shared pool, built by the
        factory like the others, and serve only while every own instance is busy; they take
        pool capacity with the model's ``weight`` and ``priority_class``. The trade-off: a
        burst request no longer waits for the model's own cores, but it runs on shared ones,
        at the speed the pool's load allows, and the pool's other models lose that time.

        Process isolation: ``isolation="process"`` runs each instance's model in a child process
        of its own, pinned like the instance (``factory`` is then a "module:function" path or a
        module-level function, imported in the child; ``model=`` and ``gpu=`` are not
        available). It is planned like "exclusive" when ``cores`` is given, else like
        "shared". A child that dies, or runs one call longer than ``watchdog_s`` seconds (None:
        no limit), fails that call with WorkerCrashed and is restarted for the next one. A
        child has ``start_timeout_s`` seconds (default 300) to import and build its model;
        one that takes longer is killed and the start fails with WorkerCrashed. A start in
        progress never holds up ``close(drain=False)`` or interpreter exit: the child is killed.
        ``Runtime.call`` on an idle process instance skips the worker thread; the child then
        spins for up to ``spin_us`` for the caller's next call (on instances of one CPU it
        parks at once).

        Warm-up: ``warmup`` (sample inputs, a zero-argument callable returning one, or its
        "module:function" path) is run by every instance, right after it is built and before the
        model takes requests: each sample once, or, with batching, one batch of each size the
        model will be called with (1, the powers of two up to ``max_size``, ``max_size`` and the
        preferred sizes). A framework's first call in a fresh thread, and its first call for each
        batch shape, are several times slower than the steady state; without warm-up the first
        requests pay for it. A sample that fails fails the start like a factory's exception.

        If the runtime is started, the instances are built (and warmed) before this returns and
        a factory's exception is raised here.
        """
        self.add(ModelSpec(
            name=name, factory=factory, model=model, instances=instances, threads=threads, cores=cores,
            isolation=isolation, numa=numa, smt=smt, memory_policy=memory_policy,
            oversubscribe=oversubscribe, max_queue=max_queue, timeout_ms=timeout_ms,
            priority_levels=priority_levels, on_timeout=on_timeout, admission=admission,
            batching=batching,
            spin_us=spin_us, gpu=gpu, weight=weight, priority_class=priority_class, burst=burst,
            watchdog_s=watchdog_s, start_timeout_s=start_timeout_s, warmup=warmup))

    def add(self, spec: ModelSpec) -> None:
        """Registers the model ``spec`` describes (see :meth:`add_model`, whose arguments are
        its fields). Raises QuotaError (``.model``, ``.field``) for a spec this runtime cannot
        serve, PlacementError when it does not fit beside the other models."""
        if not isinstance(spec, ModelSpec):
            raise QuotaError(f"give an apportion.ModelSpec, got {type(spec).__name__}")
        name = spec.name
        if spec.factory is None and spec.model is None:
            raise QuotaError("give factory= (called once per instance) or model=", model=name, field="factory")
        factory_ref = factory_path(name, spec.factory) if spec.process else None
        if spec.process:
            start_spawner()  # from this thread, not a worker whose nice a reservation raised
        if isinstance(spec.factory, str) and not spec.process:
            # A thread instance calls the factory in this process: import it now.
            spec = dataclasses.replace(spec, factory=_imported(name, "factory", spec.factory))
        self._check_sharing(spec)
        self._check_admin("add_model()")
        with self._admin:
            self._add_locked(spec, factory_ref)
            self._claim_exclusive()  # not on failure: a warning must not hide the error

    def _add_locked(self, spec: ModelSpec, factory_ref: str | None) -> None:
        name = spec.name
        if self.closed:  # before the name and the placement: neither is what stops it
            raise RuntimeClosed(f"runtime is closed: cannot add model {name!r}")
        if name in self._models:
            raise QuotaError("a model of that name is already registered", model=name, field="name")
        if spec.gpu is not None:
            self._check_gpu(name, spec.gpu)
        quota = spec.quota
        # Place it with every other model now, so an impossible quota fails here, not at start.
        # Running models with cores of their own keep them: placed afresh by their counts, the
        # largest first and the fullest L3 domain first, they moved for nearly any new model
        # (62 of 64 cores free, every exclusive model added was refused).
        new_plan = self._place({**(self._pinned_quotas() if self.started else self._quotas()), name: quota})
        if self.started:
            new_plan = self._as_they_run(new_plan, name)
            self._check_running_models_stay(new_plan, name)
        groups = self._lane_groups(new_plan[name])
        cells = _core._lane_cells(spec.max_queue, spec.priority_levels, max(len(set(groups)), 1),
                                  spec.on_timeout == "delay", spec.instances + spec.burst_instances)
        if cells * _CELL_BYTES > _MAX_QUEUE_BYTES:
            raise QuotaError(
                f"max_queue={spec.max_queue} with priority_levels={spec.priority_levels} needs "
                f"{cells * _CELL_BYTES / 2**20:.0f} MiB of queue cells ({_CELL_BYTES} bytes each; every lane "
                f"has 2 x max_queue cells); the limit is {_MAX_QUEUE_BYTES >> 20} MiB: lower max_queue or "
                "priority_levels", model=name, field="max_queue")
        burst_n = spec.burst_instances
        pooled = self._scheduled and quota.isolation == "shared"  # its calls hold pool units
        if burst_n:
            _check_burst_pool(name, new_plan)

        entry = _ModelEntry(spec=spec, burst=burst_n, queue_capacity=spec.max_queue)
        entry.gpu_usage = GpuUsage(spec.gpu.to_native(name)["memory"]) if spec.gpu is not None else None
        entry.factory_ref = factory_ref
        memory_word = quota.memory_policy if len(self.topology.nodes) > 1 else "none"
        self._models[name] = entry
        entry.building = True
        try:
            instances_arg, policy, groups = self._native_placement(new_plan, name)
            build = _instance_builder(entry, spec, self._gpu, memory_word)
            self._add_model(spec, build, instances_arg, policy, groups, pooled)
        finally:
            entry.building = False
            # Registered even if something was raised after its workers started (a
            # PinningWarning turned into an error): the bookkeeping follows the native side.
            if name in self._model_names():
                self._plan = new_plan
                # A direct call is one request on an idle instance, right away: not for a model
                # that batches (its worker waits to gather a batch) or whose calls hold units of
                # the scheduled pool (the worker takes those in turn).
                entry.direct = spec.process and spec.batching is None and not pooled
            else:
                del self._models[name]
                self._close_processes(entry)

    def _check_sharing(self, spec: ModelSpec) -> None:
        """What a spec's sharing settings need from this runtime: a scheduled shared pool."""
        for fld, given in (("weight", spec.weight is not None), ("priority_class", spec.priority_class is not None),
                           ("burst", spec.burst_instances > 0)):
            if given and not self._scheduled:
                raise QuotaError(f"needs a scheduled shared pool: make the runtime with "
                                 "Runtime(shared_pool='scheduled'), or in a config set [runtime] "
                                 "shared_pool = \"scheduled\" (this one has shared_pool='os')",
                                 model=spec.name, field=fld)

    def remove_model(self, name: str, *, drain: bool = True) -> None:
        """Unregisters a model: new requests get ModelNotFound; queued ones are finished
        (drain=True) or cancelled (drain=False); returns once its workers have exited. On a
        started runtime the other models keep their CPUs (``plan()`` shows them where they run):
        its cores are free for a model added later that the planner places there (the same
        spec added again, for one), or for a live move (:meth:`apply`)."""
        self._check_not_forked()
        self._check_admin("remove_model()")
        with self._admin:
            entry = self._models.get(name)
            interrupted: BaseException | None = None
            if entry is not None:
                if not drain:
                    self._abort_processes(entry, lambda: self._cancel_queued(name))
                # Not interruptible, like the engine's drain below: what a signal handler
                # raises meanwhile (KeyboardInterrupt) is raised once the model is gone.
                while True:
                    try:
                        own = self._end_direct_calls(entry, wait=drain)
                        break
                    except BaseException as e:  # noqa: BLE001 - raised below
                        interrupted = interrupted or e
                if own is not None:
                    # A signal handler's, while its thread is in a direct call to this model
                    # (see _end_direct_calls): the removal follows once that call returned.
                    def remove_later() -> None:
                        with contextlib.suppress(ModelNotFound):  # removed meanwhile
                            self.remove_model(name, drain=drain)

                    own.after_direct_call(remove_later)
                    if interrupted is not None:
                        raise interrupted
                    return
            # Its workers' thread names, while they run: a thread the model started that outlives
            # it carries one of them, and counts for no model once it is gone.
            if entry is not None:
                self._cpu.note_names(name, self._worker_tids(name))
            try:
                super().remove_model(name, drain=drain)  # ModelNotFound when there is none
            finally:
                # Also when Ctrl-C arrives: the engine's drain cannot be interrupted, and the
                # KeyboardInterrupt is raised only once it returned, with the model gone from
                # the engine (the bookkeeping kept it: "already registered", spec(), plan()).
                if entry is not None and name not in self._model_names():
                    self._forget(name)
                    self._claim_exclusive()  # lets go of its CPUs (wants none it did not hold)
                if interrupted is not None:
                    raise interrupted

    def _forget(self, name: str) -> None:
        """Drops model ``name`` (gone from the engine) from this runtime's bookkeeping, with its
        worker processes and its place in the plan."""
        entry = self._models.pop(name, None)
        if entry is not None:
            self._close_processes(entry)
        self._cpu.forget(name)
        if self.started and self._plan is not None:
            # The others run where they were placed: a plan made afresh would show a shared
            # model on the freed cores too, and refuse any model added next for moving it.
            self._plan = _plan_without(self._plan, name)
        else:
            self._plan = None

    # -- live moves ----------------------------------------------------------------------------
    _FIXED_WHILE_REGISTERED = ("factory", "model", "priority_levels", "on_timeout", "admission", "timeout_ms",
                               "spin_us", "weight")

    def apply(self, target: ModelSpec | Iterable[ModelSpec] | Mapping[str, ModelSpec] | Any) -> list[str]:
        """Moves registered models to new settings while they serve: ``target`` is a
        :class:`ModelSpec`, several (a sequence, or a mapping by name), or an
        :class:`apportion.Config` (such as a tuner's plan). Returns the names of the models that
        moved, in the order they moved, then those whose admission bound or priority class alone
        changed.

        What may change: ``cores``, ``isolation`` ("exclusive" / "shared"), ``instances``,
        ``threads``, ``numa``, ``smt``, ``memory_policy``, ``oversubscribe``, ``batching`` (on,
        off or other sizes), ``warmup``, ``max_queue`` (up to the value the model was added
        with: its queue's size) and, for a model whose calls draw on a scheduled shared pool
        without ``pool_reserve``, ``priority_class`` (a spec without one is class 0: a plan
        without classes applied to models with one moves them to class 0). Every model is
        placed again with the others; a model whose CPUs, threads, instances, batching or
        warm-up change moves, including models not named whose CPUs the new plan changes. A
        new ``max_queue`` alone takes effect at once, with no new instances: the queue, its
        requests and the model's learned estimates
        stay (a bound below what is queued refuses new requests until the queue drains below
        it). So does a new ``priority_class``: the model's waiting calls and the next ones are
        granted by it, the calls running finish as they are; a class is lowered before the
        moves and raised after them, so during the moves a model holds the lower of its two
        classes.

        How a model moves: its new instances start on their new CPUs (the factory runs in each
        new pinned worker, and the warm-up at every batch size it will use) while the old ones
        still serve; once every new one is ready they take over, and the old ones finish the
        call (or the batch) they hold and exit. Queued and admitted requests stay queued and
        are served exactly once, stats go on counting, and this returns once the old instances
        have exited: from then on every request runs on the new CPUs. Models move one at a time,
        those that give up CPUs before those that take CPUs, so a CPU holds at most one extra
        instance during the move.

        Nothing moves when the target is invalid: a QuotaError (``.model``, ``.field``) for a
        field that cannot change live (the factory or model, priority levels, timeouts,
        ``on_timeout``, ``admission``, ``spin_us``, weight, a max_queue above the queue's size,
        the priority class where the pool has ``pool_reserve``: a worker's OS priority follows
        its class from its start), for process or GPU models and models with burst instances; a PlacementError when
        the models do not fit the machine together, or a model would span several NUMA nodes;
        ModelNotFound for a name not registered. When a new instance's factory (or warm-up)
        raises, that exception is raised here and the model keeps serving where it was; models
        moved earlier in the same call are moved back first (one whose move back fails too keeps
        serving as moved: a note on the exception says so, and :meth:`plan` shows it there).

        Before ``start()`` the new settings simply replace the old ones."""
        self._check_not_forked()
        self._check_admin("apply()")
        specs = self._target_specs(target)
        with self._admin:
            if self.closed:  # also for a target that changes nothing: the runtime serves no more
                names = ", ".join(repr(x.name) for x in specs) or "nothing"
                raise RuntimeClosed(f"runtime is closed: cannot move model {names} (apply() after close)")
            moved = self._apply_locked(specs)
            self._claim_exclusive()
            return moved

    @staticmethod
    def _target_specs(target: Any) -> list[ModelSpec]:
        if isinstance(target, ModelSpec):
            return [target]
        models = getattr(target, "models", None)  # an apportion.Config
        if isinstance(models, Mapping):
            target = [getattr(m, "spec", m) for m in models.values()]
        elif isinstance(target, Mapping):
            for key, spec in target.items():
                if isinstance(spec, ModelSpec) and key != spec.name:
                    raise QuotaError(f"apply(): the mapping's key {key!r} names another model than its "
                                     f"spec ({spec.name!r}); key each spec by its own name", model=spec.name,
                                     field="name")
            target = list(target.values())
        if isinstance(target, (str, bytes)) or not isinstance(target, Iterable):
            raise QuotaError(f"apply(): give ModelSpecs, a mapping of them, or a Config; got {type(target).__name__}")
        specs = list(target)
        for spec in specs:
            if not isinstance(spec, ModelSpec):
                raise QuotaError(f"apply(): give apportion.ModelSpec objects, got {type(spec).__name__}")
        names = [s.name for s in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise QuotaError(f"apply(): models named more than once: {twice}")
        return specs

    def _checked_move(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with its factory resolved, after checking the move changes only what a live
        move can change."""
        name = spec.name
        entry = self._models.get(name)
        if entry is None:
            known = ", ".join(repr(n) for n in sorted(self._models)) or "none"
            raise ModelNotFound(f"no model named {name!r} (registered: {known})", model=name)
        old = entry.spec
        if isinstance(spec.factory, str) and not spec.process:
            spec = dataclasses.replace(spec, factory=_imported(name, "factory", spec.factory))
        elif spec.process and old.process and not _same(old.factory, spec.factory):
            # A function here and its "module:function" there (a plan read from a file) are one
            # factory to the worker process, which imports it by that path.
            with contextlib.suppress(QuotaError):  # not importable: refused below as a change
                if factory_path(name, old.factory) == factory_path(name, spec.factory):
                    spec = dataclasses.replace(spec, factory=old.factory)
        # Process, GPU and burst instances cannot be rebuilt while they serve: these kinds may
        # not change at all, and a model of one of them may change only what needs no new
        # instances (its admission bound; see _check_movable).
        for changed, fld in ((old.process != spec.process, "isolation"), (not _same(old.gpu, spec.gpu), "gpu"),
                             (entry.burst != spec.burst_instances, "burst")):
            if changed:
                raise _unmovable(name, fld)
        for fld in self._FIXED_WHILE_REGISTERED:
            was, now = getattr(old, fld), getattr(spec, fld)
            if not _same(was, now):
                raise QuotaError(f"cannot change while the model is registered ({was!r} -> {now!r}): remove "
                                 "the model and add it again", model=name, field=fld)
        if self._scheduled and (old.isolation == "shared") != (spec.isolation == "shared"):
            raise QuotaError(f"isolation {old.isolation!r} -> {spec.isolation!r}: on a scheduled shared pool a "
                             "model's calls either draw on the pool or not, for as long as it is registered",
                             model=name, field="isolation")
        if (old.priority_class or 0) != (spec.priority_class or 0):
            self._check_sharing(spec)
            if self._priority_class(name) is None:  # as registered: what draws on the pool
                raise QuotaError(f"priority_class {old.priority_class!r} -> {spec.priority_class!r}: only a model "
                                 "whose calls draw on the scheduled shared pool has a class", model=name,
                                 field="priority_class")
            if self._pool_reserve:
                raise QuotaError(f"priority_class {old.priority_class!r} -> {spec.priority_class!r}: cannot change "
                                 "while the runtime has pool_reserve (a worker's OS priority follows its class "
                                 "from its start): remove the model and add it again", model=name,
                                 field="priority_class")
        if spec.max_queue > entry.queue_capacity:
            raise QuotaError(f"max_queue={spec.max_queue} is above {entry.queue_capacity}, the size of the "
                             "queue the model was added with: a move may lower it and raise it back, not beyond",
                             model=name, field="max_queue")
        return spec

    def _check_movable(self, name: str) -> None:
        """Raises QuotaError for a model that needs new instances to move but cannot have them
        while it serves."""
        entry = self._models[name]
        for what, fld in ((entry.spec.process, "isolation"), (entry.spec.gpu is not None, "gpu"),
                          (entry.burst, "burst")):
            if what:
                raise _unmovable(name, fld)

    @staticmethod
    def _moves(old: ModelSpec, old_mp: ModelPlan, new: ModelSpec, new_mp: ModelPlan) -> bool:
        """Whether going from ``old`` placed as ``old_mp`` to ``new`` as ``new_mp`` needs new
        instances."""
        def where(mp: ModelPlan) -> tuple[Any, ...]:
            return tuple((i.cpus, i.threads, i.memory_nodes) for i in mp.instances), mp.memory_policy
        return (where(old_mp) != where(new_mp) or old.instances != new.instances or old.batching != new.batching
                or not _same(old.warmup, new.warmup))

    def _apply_locked(self, specs: list[ModelSpec]) -> list[str]:
        new_specs = {s.name: self._checked_move(s) for s in specs}
        old_plan = self.plan()
        try:
            new_plan = self._place({**self._quotas(), **{n: s.quota for n, s in new_specs.items()}})
        except PlacementError as e:
            culprit = getattr(e, "model", None)
            if not culprit or culprit in new_specs:
                raise
            # The planner names the model it could not place; here that is one the caller did
            # not touch, left without room by the models that move.
            named = ", ".join(repr(n) for n in sorted(new_specs))
            err = PlacementError(f"apply(): the new settings of {named} leave no room for model {culprit!r}: {e}",
                                 model=next(iter(new_specs)) if len(new_specs) == 1 else culprit,
                                 field=getattr(e, "field", None))
            err.displaced = culprit  # type: ignore[attr-defined]
            raise err from None
        targets = {n: new_specs.get(n, e.spec) for n, e in self._models.items()}
        moving = [n for n in self._models
                  if self._moves(self._models[n].spec, old_plan[n], targets[n], new_plan[n])]
        started = self.started
        for n in moving:
            if n not in new_specs:
                self._checked_move(targets[n])  # moved by the others' new plan: it must be movable too
            self._check_movable(n)
            if started and (self._lane_groups(new_plan[n]) or self._lane_groups(old_plan[n])):
                spread = new_plan if self._lane_groups(new_plan[n]) else old_plan
                raise PlacementError(f"model {n!r}: the {'new' if spread is new_plan else 'current'} plan spreads "
                                     f"its instances over several NUMA nodes "
                                     f"({[i.memory_nodes for i in spread[n].instances]}); a model moves while it "
                                     "serves only within one node", model=n)
        for n, entry in self._models.items():
            if not entry.burst:
                continue
            _check_burst_pool(n, new_plan)
            if started and new_plan.shared_pool != old_plan.shared_pool:
                # Its burst instances are pinned to the pool they started on, and cannot move.
                raise PlacementError(
                    f"model {n!r}, field 'burst': this move changes the shared pool from "
                    f"{list(old_plan.shared_pool)} to {list(new_plan.shared_pool)}, where its burst instances "
                    "run; burst instances cannot move while they serve: remove the model first", model=n, field="burst")

        def cpus(plan_: Plan, n: str) -> int:
            return len({c for i in plan_[n].instances for c in i.cpus})

        # Those that give up CPUs first, so that those that take CPUs find them free.
        moving.sort(key=lambda n: (cpus(new_plan, n) - cpus(old_plan, n), n))
        # Classes lowered before the moves, raised after them (see the docstring).
        old_class = {n: self._models[n].spec.priority_class or 0 for n in new_specs}
        new_class = {n: s.priority_class or 0 for n, s in new_specs.items()}
        lowered = [n for n in new_specs if new_class[n] < old_class[n]]
        raised = [n for n in new_specs if new_class[n] > old_class[n]]
        classed: dict[str, int] = {}  # the classes set on the engine so far
        done: list[tuple[str, ModelSpec, dict[int, Any]]] = []
        current: str | None = None
        current_moves: int | None = None
        try:
            for n in lowered:
                self._set_priority_class(n, new_class[n])
                classed[n] = new_class[n]
            for n in moving:
                entry = self._models[n]
                undo = (n, entry.spec, dict(entry.placed))
                current, current_moves = n, self._model_stats(n).moves if started else None
                self._move(n, targets[n], new_plan, moves=current_moves)
                done.append(undo)
            current = None
        except BaseException as e:
            stuck = set()
            if current is not None and started and self._model_stats(current).moves != current_moves:
                # The engine's move cannot be interrupted: Ctrl-C is raised once it returned,
                # with the model moved.
                e.add_note(f"(model {current!r} had moved when this was raised: it serves as moved, and plan() "
                           "shows it there)")
                stuck.add(current)
            for n, spec, placed in reversed(done):
                try:
                    self._move(n, spec, old_plan, placed)
                except BaseException as back:  # noqa: BLE001 - reported on the original error
                    e.add_note(f"(model {n!r} could not be moved back: {back!r}; it serves as moved, and "
                               "plan() shows it there)")
                    stuck.add(n)
                else:
                    e.add_note(f"(model {n!r}, moved before, was moved back)")
            # Each class as its model's record now says: the old one for a model moved back or
            # not moved, the new one for a model that serves as moved (lowered already, or
            # raised here).
            for n in lowered + raised:
                want, now = self._models[n].spec.priority_class or 0, classed.get(n, old_class[n])
                if want == now:
                    continue
                try:
                    self._set_priority_class(n, want)
                except BaseException as back:  # noqa: BLE001 - reported on the original error
                    e.add_note(f"(model {n!r} keeps priority class {now}: setting {want} failed: {back!r})")
                    self._models[n].spec = dataclasses.replace(self._models[n].spec, priority_class=now)
            if stuck:
                # What runs now: those models where the new plan put them, the others where they
                # were (the shared pool's size was not changed either). Placing the specs afresh
                # would show CPUs no instance runs on.
                self._plan = dataclasses.replace(old_plan, models=tuple(
                    new_plan[m.name] if m.name in stuck else m for m in old_plan.models))
            raise
        if moving and self.closed:
            # close() stopped the move's new instances: as add_model says, the caller learns it.
            # The moved models' records hold their new specs: the plan says where those were put
            # (plan() and spec() disagreed, and the next add_model() read the old plan).
            self._plan = dataclasses.replace(old_plan, models=tuple(
                new_plan[m.name] if m.name in moving else m for m in old_plan.models))
            raise RuntimeClosed(f"runtime was closed while {', '.join(repr(n) for n in moving)} moved")
        # The admission bound alone changes at once, with no new instances (a move sets it
        # with the new ones): after the moves, so a failed move leaves every bound as it was.
        bounded = [n for n in new_specs if n not in moving and (new_specs[n].max_queue != self._models[n].spec.max_queue
                                                               or new_class[n] != old_class[n])]
        for n in bounded:
            if new_specs[n].max_queue != self._models[n].spec.max_queue:
                self._set_max_queue(n, new_specs[n].max_queue)
        for n in raised:
            self._set_priority_class(n, new_class[n])
        for n, spec in new_specs.items():
            if n not in moving:
                self._models[n].spec = spec
        if started and self._scheduled:
            self._set_pool_capacity(len(new_plan.shared_pool))
        if old_plan.gpu is not None:
            new_plan = dataclasses.replace(new_plan, gpu=old_plan.gpu)
        self._plan = new_plan
        return moving + bounded

    def _move(self, name: str, spec: ModelSpec, plan_: Plan, placed: dict[int, Any] | None = None,
              moves: int | None = None) -> None:
        """Moves model ``name`` to ``spec`` placed as in ``plan_``; on an exception raised before
        the engine moved it, the model's record is as it was (one raised after, such as Ctrl-C
        on the engine call's return, leaves the record moved with the model). ``moves``: the
        engine's move count read by the caller just before (read here when not given)."""
        entry = self._models[name]
        old_spec, old_placed = entry.spec, dict(entry.placed)
        if moves is None and self.started:
            moves = self._model_stats(name).moves
        entry.spec = spec
        try:
            instances_arg, policy, groups = self._native_placement(plan_, name)
            if placed is not None:
                entry.placed.clear()
                entry.placed.update(placed)
            memory_word = spec.quota.memory_policy if len(self.topology.nodes) > 1 else "none"
            self._reshape(spec, _instance_builder(entry, spec, self._gpu, memory_word), instances_arg, policy,
                          groups)
        except BaseException:
            if moves is None or self._model_stats(name).moves == moves:
                entry.spec = old_spec
                entry.placed.clear()
                entry.placed.update(old_placed)
            raise

    def _entry(self, name: str) -> _ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            known = ", ".join(repr(n) for n in sorted(self._models)) or "none"
            raise ModelNotFound(f"no model named {name!r} (registered: {known})", model=name)
        return entry

    def spec(self, name: str) -> ModelSpec:
        """The spec model ``name`` serves with now (after the latest :meth:`apply`)."""
        return self._entry(name).spec

    def queue_size(self, name: str) -> int:
        """The size of model ``name``'s queue: the max_queue it was added with, the highest
        bound :meth:`apply` may set."""
        return self._entry(name).queue_capacity

    def _quotas(self) -> dict[str, Quota]:
        return {n: e.spec.quota for n, e in self._models.items()}

    def _as_they_run(self, new_plan: Plan, name: str) -> Plan:
        """``new_plan`` with each running model that keeps its CPUs placed as it runs: a list of
        CPUs is split between instances in CPU order, where the count it was placed by split them
        L3 domain by L3 domain (a model spread over two domains read as moved, and the add was
        refused)."""
        current = {m.name: m for m in self.plan().models}

        def keeps_cpus(m: ModelPlan) -> bool:
            now = current.get(m.name)
            return (m.name != name and now is not None and bool(m.instances) and set(m.cpus) == set(now.cpus)
                    and len(m.instances) == len(now.instances))

        return dataclasses.replace(new_plan, models=tuple(
            current[m.name] if keeps_cpus(m) else m for m in new_plan.models))

    def _pinned_quotas(self) -> dict[str, Quota]:
        """The models' quotas with each exclusive one's core count replaced by the CPUs it runs
        on now (the planner places named CPUs first, as they are)."""
        out = self._quotas()
        current = self.plan()
        for mp in current.models:
            q = out.get(mp.name)
            if q is None or q.isolation != "exclusive" or q.cpus is not None or not mp.instances:
                continue
            try:
                out[mp.name] = dataclasses.replace(q, cores=mp.cpus)
            except QuotaError:  # what the count allowed, a list does not (then it is placed as before)
                continue
        return out

    def _gpu_quotas(self) -> dict[str, GPU]:
        return {n: e.spec.gpu for n, e in self._models.items() if e.spec.gpu is not None}

    @property
    def models(self) -> list[str]:
        """Names of the registered models, sorted."""
        return self._model_names()

    def serving(self, name: str) -> bool:
        """Whether model ``name`` takes requests now: the runtime started and is not closed, and
        the model is registered with its instances built and warmed. False while ``add_model``
        on a started runtime still builds or warms them (requests submitted meanwhile wait in
        its queue), for a name the runtime does not have, and in a process forked from the one
        that made the runtime (its workers do not exist there)."""
        entry = self._models.get(name)
        return (self.started and not self.closed and entry is not None and not entry.building
                and not self._forked and name in self._model_names())

    @property
    def controller(self) -> Controller | None:
        """The online controller last started on this runtime (:meth:`Controller.start`), running
        or stopped since; None if none was. ``/metrics`` reports its state
        (``apportion_controller_*``)."""
        return self._controller

    @property
    def shared_pool(self) -> str:
        """How shared models share the pool: "os" or "scheduled" (see the constructor)."""
        return "scheduled" if self._scheduled else "os"

    # -- placement ----------------------------------------------------------------------------
    @property
    def topology(self) -> Topology:
        """The machine as this runtime sees it (restricted to ``cpus`` when given)."""
        if self._topo is None:
            try:
                self._topo = topology(self._topology_root, cpus=self._cpus)
            except ValueError as e:  # named CPUs none of which this process may use
                if self._cpus is None:
                    raise
                raise QuotaError(f"Runtime: {e}", field="cpus") from None
        return self._topo

    def plan(self) -> Plan:
        """Who gets (or got) which CPUs, threads and memory nodes, and GPU streams, SMs and
        memory. Printable."""
        plan_ = self._plan
        if plan_ is None:
            plan_ = self._place(self._quotas())
        gpu_quotas = self._gpu_quotas()
        if gpu_quotas and plan_.gpu is None:
            plan_ = dataclasses.replace(plan_, gpu=plan_gpus(gpu_quotas))
        self._plan = plan_
        return plan_

    def _check_gpu(self, name: str, gpu: GPU) -> None:
        # The quota itself was validated by the ModelSpec; what is checked here is the machine.
        if not gpu_available():
            raise QuotaError(f"no usable GPU: {gpu_unavailable_reason()}", model=name, field="gpu")
        if self.started:
            raise PlacementError(
                f"model {name!r}: GPU models are partitioned together at start(); add it before "
                "start() (the runtime is already serving)", model=name, field="gpu"
            )
        plan_gpus({**self._gpu_quotas(), name: gpu})  # SM or memory over-subscription fails here

    def _place(self, quotas: dict[str, Quota]) -> Plan:
        return plan(list(quotas.values()), self.topology)

    def _native_placement(self, p: Plan, name: str):
        mp = p[name]
        # One memory node: binding adds nothing but a syscall that some sandboxes refuse.
        policy = mp.memory_policy if len(self.topology.nodes) > 1 else "none"
        entry = self._models[name]
        placed = entry.placed
        out = []
        for inst in mp.instances:
            placed[inst.index] = (inst.cpus, inst.memory_nodes, inst.threads)
            out.append((list(inst.cpus), list(inst.memory_nodes), inst.threads))
        # Burst instances float on the shared pool with an own instance's thread count, and no
        # memory binding (the pool may span nodes; their pages follow first touch).
        threads = mp.instances[0].threads if mp.instances else 1
        for k in range(entry.burst):
            index = len(mp.instances) + k
            placed[index] = (tuple(p.shared_pool), (), threads)
            out.append((list(p.shared_pool), [], threads))
        return out, policy, self._lane_groups(mp)

    @staticmethod
    def _lane_groups(mp: ModelPlan) -> list[int]:
        """Per own instance, the index of its (first) memory node among the distinct nodes of
        the model's instances: instances on one node share one queue; on several nodes each
        node gets its own queue, and idle instances steal from the others. [] (one queue) when
        every instance is on one node or none has a node."""
        firsts = [inst.memory_nodes[0] if inst.memory_nodes else -1 for inst in mp.instances]
        nodes = sorted(set(firsts))
        if len(nodes) <= 1:
            return []
        return [nodes.index(n) for n in firsts]

    def _check_running_models_stay(self, new_plan: Plan, name: str) -> None:
        current = self.plan()
        moved = [m.name for m in current.models
                 if m.name != name and [i.cpus for i in new_plan[m.name].instances]
                 != [i.cpus for i in m.instances]]
        if moved:
            before, after = format_cpulist(current.shared_pool), format_cpulist(new_plan.shared_pool)
            # The pool is every usable CPU no exclusive model holds: it grows when a removed
            # model's cores come back to it, and its shared models would move with it.
            pool = f" (the shared pool would be {after or 'empty'} instead of {before})" if after != before else ""
            raise PlacementError(
                f"model {name!r}: placing it now would move running models {moved} to other "
                f"CPUs{pool}; add it before start(), remove those models first, or give it CPUs "
                f"outside the shared pool (shared pool now: {before})", model=name
            )

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Runtime:
        """Places every model, builds its instances (each factory runs in its own pinned
        worker thread) and starts serving. Requests submitted before start() wait in their
        queues. A pinning the OS refuses is a PinningWarning, not an error."""
        self._check_admin("start()")
        with self._admin:
            if not self.started and not self.closed:
                p = self._place(self._quotas())
                for name, e in self._models.items():  # models added before start, checked together
                    if e.burst:
                        _check_burst_pool(name, p)
                for name in self._models:
                    self._set_placement(name, *self._native_placement(p, name))
                if self._scheduled:
                    self._set_pool_capacity(len(p.shared_pool))
                gpu_quotas = self._gpu_quotas()
                if gpu_quotas:
                    gplan = plan_gpus(gpu_quotas)
                    partition = GpuPartition(gplan)
                    # Stored before anything can raise (a note is an error under -W error): the
                    # partition's streams are then released by close().
                    self._gpu.partition = partition
                    for note in [*gplan.notes, *partition.warnings]:
                        warnings.warn(note, PinningWarning, stacklevel=3)
                    p = dataclasses.replace(p, gpu=partition.plan)  # the SM counts the driver made
                self._plan = p
            try:
                self._start()
            finally:
                # A model whose instance failed to build is gone from the engine (the others
                # serve): forget it here too, and its worker processes, so that it can be
                # added again (it read "already registered") and nothing of it lingers.
                registered = set(self._model_names())
                for name in [n for n in self._models if n not in registered]:
                    self._forget(name)
            self._claim_exclusive()  # not on failure: a warning must not hide the error
        return self

    def _claim_exclusive(self) -> None:
        """Claims the CPUs of the exclusive models of the plan in force, letting go of those no
        longer in it, and warns (PinningWarning) about those another runtime claims: this
        process's or another's. Only on the real machine (not a ``topology_root`` tree)."""
        plan_ = self._plan
        if self._topology_root != "/" or not self.started or self.closed or plan_ is None:
            self._claims.release()
            return
        owner = {c: m.name for m in plan_.models if m.isolation == "exclusive" for c in (*m.cpus, *m.reserved)}
        taken = self._claims.claim(owner)  # each taken CPU once
        if not taken:
            return
        models = sorted({owner[c] for c in taken})
        holders = sorted({"this process" if pid == os.getpid() else f"process {pid}" if pid else "another process"
                          for pid in taken.values()})
        warnings.warn(
            f"CPU{'s' if len(taken) > 1 else ''} {format_cpulist(sorted(taken))}, which this runtime gives model(s) "
            f"{', '.join(repr(m) for m in models)} exclusively, are claimed by another apportion runtime "
            f"({', '.join(holders)}): their models share those CPUs. Give each runtime CPUs of its own "
            "(Runtime(cpus=...), the config's [runtime] cpus, or taskset/cpuset for each process).",
            PinningWarning, stacklevel=3)

    _drain_pending = False
    """A close(drain=True) was interrupted and goes on: interpreter exit waits for its drain."""
    _closer: threading.Thread | None = None
    """Goes on with a close(drain=True) interrupted while it waited for a direct call."""

    def close(self, drain: bool = True) -> None:
        """Stops accepting requests. ``drain=True`` finishes queued work; ``drain=False``
        cancels it. A runtime never started has no workers to finish anything: its queued
        requests are cancelled either way. Running calls always finish, except in process instances with
        ``drain=False``: their children are killed and those calls fail with WorkerCrashed.
        Idempotent; returns when workers (and worker processes) have exited. A second close()
        made from a done-callback that the first runs (cancelling queued requests) returns at
        once. So does a close() made by a signal handler while its thread is in a direct call
        (``call`` to a process model): the close follows once that call returned, before
        ``call`` returns. In a process forked from the one that made the runtime, close() does nothing
        (the runtime's threads and worker processes belong to the parent)."""
        if self._forked:
            return
        self._check_admin("close()")
        closer = self._closer
        if drain and closer is not None and closer is not threading.current_thread():
            closer.join()  # an interrupted close that goes on, as the engine's own is waited for
        entries = list(self._models.values())
        if not drain:
            for name, entry in list(self._models.items()):
                self._abort_processes(entry, functools.partial(self._cancel_queued, name))
        try:
            for entry in entries:
                own = self._end_direct_calls(entry, wait=drain)
                if own is not None:
                    # A signal handler's, while its thread is in a direct call to this runtime:
                    # the close follows once that call returned.
                    own.after_direct_call(lambda: self.close(drain))
                    return
        except BaseException:
            # Ctrl-C while a direct call of another thread finishes: the close goes on (the
            # next close(), or interpreter exit, waits for this non-daemon thread). Only the
            # main thread's wait is interrupted (by its signal handlers).
            if drain and threading.current_thread() is threading.main_thread():
                self._closer = threading.Thread(target=self.close, args=(drain,), name="apportion-close",
                                                daemon=False)
                self._closer.start()
            raise
        try:
            self._close(drain)
        except BaseException:
            # Ctrl-C in a draining close: the engine goes on with it in the background.
            self._drain_pending = drain and self.closed
            raise
        self._drain_pending = False
        self._claims.close()
        self._gpu.close()  # streams outlive every call that used them: workers have exited
        for entry in list(self._models.values()):
            self._close_processes(entry)

    @staticmethod
    def _abort_processes(entry: _ModelEntry, cancel_queued: Callable[[], None]) -> None:
        # Before the workers are joined: a child that never answers (or never finishes building
        # its model) would otherwise keep its worker, and so close(drain=False) and the exit
        # handler, waiting. The queue is cancelled first: a worker freed by the abort (its
        # restart's back-off ended) then finds it cancelled, rather than run the next request
        # on a child that is being killed.
        if entry.processes:
            cancel_queued()
        for proxy in list(entry.processes):
            proxy.abort()

    @staticmethod
    def _end_direct_calls(entry: _ModelEntry, wait: bool) -> ProcessInstance | None:
        # Before the workers stop: the children are closed once they have, so when draining, a
        # direct call in flight must finish first; without draining it was aborted
        # and fails anyway. None may start after. A call that finds direct calls refused takes
        # the queue instead. Waits again when called again (an interrupted close). Returns the
        # instance the calling thread is itself in a direct call to (a signal handler that
        # interrupted it), whose call cannot be waited for: the caller stops nothing then (the
        # worker may wait for that call's lock), and goes on once the call returned.
        entry.direct = False
        for proxy in list(entry.processes):
            if not proxy.end_direct_calls(wait):
                return proxy
        return None

    @staticmethod
    def _close_processes(entry: _ModelEntry) -> None:
        # Only once the model's workers have exited: no call is in flight in any proxy.
        for proxy in list(entry.processes):
            proxy.close()
        # A counter never goes back: a last scrape after close read 0 restarts.
        entry.closed_restarts += sum(p.restarts for p in entry.processes)
        entry.processes.clear()

    def __enter__(self) -> Runtime:
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=True)

    # -- synchronous calls ----------------------------------------------------------------------
    def call(
        self,
        model: str,
        inputs: Any,
        *,
        timeout_ms: float | None = None,
        priority: int | None = None,
    ) -> Any:
        """Runs one request and returns its result (raises its error): the same outcome as
        ``submit(...).result()``, with the same checks and stats.

        For a process model (``isolation="process"``, without batching or a scheduled pool)
        with nothing queued and an idle instance, the calling thread sends the request to that
        instance's child and waits for the answer itself: two hand-offs instead of four (no
        worker thread in between), about half the round trip. Such a call counts as a request
        in ``stats()`` (``direct`` says how many) with no queue wait; it starts at once, so its
        deadline cannot pass. Anything else (a busy or restarting instance, queued requests,
        other models) takes the queue like ``submit``."""
        entry = self._models.get(model)
        procs = entry.processes if entry is not None and entry.direct else None
        if procs:
            self._check_not_forked()  # the children belong to the parent

            def begin() -> int:
                return self._direct_begin(model, timeout_ms, priority)

            def end(ok: bool, start: int) -> None:
                self._direct_end(model, ok, start)

            for proxy in list(procs):
                out = proxy.call_directly(inputs, begin, end)
                if out is not NOT_TAKEN:
                    return out
        # Refused before admission on the model's own worker: refused after it, the request ran.
        return self._submit_to_wait(model, inputs, timeout_ms, priority).result()

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
        # Refused before admission when awaited on a worker of the model itself.
        fut = self._submit_to_wait(model, inputs, timeout_ms, priority)
        waiter = on_loop(fut, loop, model)
        try:
            return await waiter
        except asyncio.CancelledError:
            fut.cancel()
            raise

    # -- observability ------------------------------------------------------------------------
    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system, seconds) each model has used in this process so far: its
        worker threads and every thread they created, such as a framework's intra-op pool
        (those inherit their creator's thread name, which ties them to the model), read from
        /proc. Exact for a model whose threads stay its own. Where two models' names agree in
        the part a thread name keeps (Linux: 15 bytes, ``ap:<model>:<instance>``), each still
        gets its workers' time, but threads their workers created count for neither. A
        thread's time after the last reading before it exits is lost, and a worker process's
        (isolation="process") is not counted. Costs a /proc read per thread of the process:
        for a metrics scrape, not a hot path. Zero where /proc is not available."""
        return self._cpu.read({n: self._worker_tids(n) for n in self.models})

    def stats(self) -> RuntimeStats:
        """Per-model counts and latency percentiles (queue wait, compute, end to end)."""
        out = {}
        for n in self.models:
            try:
                s = ModelStats._from_native(self._model_stats(n))
            except ModelNotFound:  # removed by another thread meanwhile
                continue
            entry = self._models.get(n)
            usage = entry.gpu_usage if entry is not None else None
            if usage is not None:
                s = dataclasses.replace(s, gpu_memory_bytes=usage.used, gpu_memory_peak_bytes=usage.peak)
            if entry is not None and entry.spec.process:
                s = dataclasses.replace(s, process_restarts=entry.closed_restarts
                                        + sum(p.restarts for p in list(entry.processes)))
            out[n] = s
        return RuntimeStats(out)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("started" if self.started else "new")
        return f"<apportion.Runtime {state} models={self.models}>"
