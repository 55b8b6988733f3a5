"""
apportion native core: engine, queue, metrics, topology, placement, GPU partitioner
"""
from __future__ import annotations
import collections.abc
import typing
from . import gpu
__all__: list[str] = ['Future', 'Quota', 'ShmChannel', 'Topology', 'built_with_cuda', 'current_memory_policy', 'current_thread_affinity', 'format_cpulist', 'gpu', 'parse_cpulist', 'pin_current_thread', 'plan_placement', 'read_topology', 'set_memory_policy', 'set_parent_death_signal', 'thread_affinities']
class Future:
    """
    A pending request (concurrent.futures-compatible interface).
    
    Completes exactly once: with a result, the model's exception, DeadlineExceeded, or cancellation.
    """
    def __repr__(self) -> str:
        ...
    def add_done_callback(self, fn: typing.Any) -> None:
        """
        Calls fn(future) once the request completes (at once if it already has), in the thread that completes it. Exceptions from fn are reported, not raised.
        """
    def cancel(self) -> bool:
        """
        Cancels the request if it is still queued (it is then never run). Returns whether the request is cancelled.
        """
    def cancelled(self) -> bool:
        """
        True if the request was cancelled.
        """
    def done(self) -> bool:
        """
        True once the request completed (in any way).
        """
    def exception(self, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> typing.Any:
        """
        The exception the request completed with (None on success); raises CancelledError if it was cancelled.
        """
    def result(self, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> typing.Any:
        """
        The model's result; raises its exception, DeadlineExceeded or CancelledError. Waits at most `timeout` seconds (TimeoutError), releasing the GIL while it waits.
        """
    def running(self) -> bool:
        """
        True while a worker executes the model for this request.
        """
    @property
    def model(self) -> str:
        """
        Name of the model this request was submitted to.
        """
class _Runtime:
    """
    Native core of apportion.Runtime.
    """
    def __init__(self) -> None:
        ...
    def _add_model(self, spec: typing.Any, make_instance: typing.Any, placement: collections.abc.Sequence[tuple[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], typing.SupportsInt | typing.SupportsIndex]], memory_policy: str, groups: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], pooled: bool) -> None:
        ...
    def _check_admin(self, what: str) -> None:
        ...
    def _close(self, drain: bool) -> None:
        ...
    def _direct_begin(self, model: str, timeout_ms: typing.Any, priority: typing.Any) -> int:
        ...
    def _direct_end(self, model: str, ok: bool, start_ns: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def _model_names(self) -> list[str]:
        ...
    def _model_stats(self, name: str) -> dict:
        ...
    def _set_placement(self, name: str, instances: collections.abc.Sequence[tuple[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], typing.SupportsInt | typing.SupportsIndex]], memory_policy: str, groups: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = []) -> None:
        ...
    def _set_pool_capacity(self, capacity: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def _start(self) -> None:
        ...
    def remove_model(self, name: str, *, drain: bool = True) -> None:
        """
        Unregisters a model: new requests get ModelNotFound; queued ones are finished (drain=True) or cancelled (drain=False); returns once its workers have exited.
        """
    def submit(self, model: str, inputs: typing.Any, *, timeout_ms: typing.Any = None, priority: typing.Any = None) -> Future:
        """
        Queues one request; returns a Future. Raises QueueFull, ModelNotFound, RuntimeClosed.
        """
    def submit_many(self, model: str, inputs: collections.abc.Iterable, *, timeout_ms: typing.Any = None, priority: typing.Any = None) -> list:
        """
        Queues one request per item, all or none (QueueFull if they do not all fit); returns a list of Futures.
        """
    @property
    def _pool_capacity(self) -> int:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def started(self) -> bool:
        ...
class Topology:
    """
    A snapshot of the machine read from sysfs (immutable; safe to share between threads). apportion.topology wraps it in dataclasses.
    """
    def as_dict(self) -> dict:
        """
        Everything as plain lists and dicts (cpus, cores, packages, nodes, l3_domains, ...).
        """
    def restricted_to(self, cpus: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> Topology:
        """
        A copy whose allowed set is intersected with `cpus`. Raises ValueError for a CPU that is not present.
        """
    @property
    def allowed(self) -> list[int]:
        """
        The process's allowed CPU set.
        """
    @property
    def hybrid(self) -> bool:
        """
        True when performance and efficiency cores differ.
        """
    @property
    def offline(self) -> list[int]:
        ...
    @property
    def online(self) -> list[int]:
        ...
    @property
    def root(self) -> str:
        """
        The root the tree was read from.
        """
    @property
    def usable(self) -> list[int]:
        """
        Online CPUs in the allowed set.
        """
class Quota:
    """
    The CPU side of one model's quota, as placement sees it. Build it through apportion.placement.Quota, which validates every field first.
    """
    def __init__(self, *, name: str, cores: typing.SupportsInt | typing.SupportsIndex = 0, cpus: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], instances: typing.SupportsInt | typing.SupportsIndex = 1, threads: typing.SupportsInt | typing.SupportsIndex = 0, isolation: str = 'shared', numa: typing.SupportsInt | typing.SupportsIndex = -1, smt: bool = False, memory_policy: str = 'bind', oversubscribe: bool = False) -> None:
        ...
    @property
    def cores(self) -> int:
        ...
    @property
    def cpus(self) -> list[int]:
        ...
    @property
    def instances(self) -> int:
        ...
    @property
    def isolation(self) -> str:
        ...
    @property
    def memory_policy(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def numa(self) -> int:
        ...
    @property
    def oversubscribe(self) -> bool:
        ...
    @property
    def smt(self) -> bool:
        ...
    @property
    def threads(self) -> int:
        ...
class ShmChannel:
    """
    Two-way message channel in a POSIX shared-memory segment: one byte ring per
    direction, cross-process futex wake-ups. One thread sends and one receives
    on each side. Used by process-isolated instances (apportion._private.process).
    """
    @staticmethod
    def create(name: str, ring_bytes: typing.SupportsInt | typing.SupportsIndex) -> ShmChannel:
        """
        Create segment `name` ("/..."; must not exist) with rings of `ring_bytes` each (sparse:
        each sender reserves the pages its messages reach before writing them). The creator unlinks the name on unlink()/close().
        Raises OSError.
        """
    @staticmethod
    def open(name: str) -> ShmChannel:
        """
        Map the existing segment `name` as the child side. Raises OSError.
        """
    def close(self) -> None:
        """
        Unmap (and, for the creator, unlink). Idempotent.
        """
    def max_message_bytes(self, parts: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        The most payload bytes, over `parts` parts, that always fit one message.
        """
    def receive(self, spin_us: typing.SupportsFloat | typing.SupportsIndex = 0.0, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> typing.Any:
        """
        Wait (GIL released; spin `spin_us` first) up to `timeout` seconds for a message: a list
        whose first part is bytes and the others bytearrays; None on timeout.
        """
    def send(self, parts: list, spin_us: typing.SupportsFloat | typing.SupportsIndex = 0.0, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> bool:
        """
        Send the buffers in `parts` (bytes-like, C-contiguous) as one message. Waits for room
        (GIL released) up to `timeout` seconds (None: no limit); False if it timed out.
        ValueError if the message can never fit; OSError (errno ENOSPC, nothing sent) if the
        shared-memory filesystem cannot back it.
        """
    def unlink(self) -> None:
        """
        Remove the segment's name (mappings stay valid). Idempotent; either side.
        """
    @property
    def closed(self) -> bool:
        ...
    @property
    def free_bytes(self) -> int:
        """
        Bytes free on the filesystem holding the segment (/dev/shm); -1 if unknown.
        """
    @property
    def name(self) -> str:
        ...
    @property
    def reserved_bytes(self) -> int:
        """
        Bytes of this side's outgoing ring backed so far (reserved before a message is written).
        """
    @property
    def ring_bytes(self) -> int:
        ...
    @property
    def sent_unread(self) -> bool:
        """
        A sent message the peer has not taken yet (after the peer died: it never saw it).
        """
def _join_orphans() -> None:
    """
    Waits for the background closes of runtimes that were dropped inside one of their own workers (called at interpreter exit).
    """
def _lane_cells(max_queue: typing.SupportsInt | typing.SupportsIndex, priority_levels: typing.SupportsInt | typing.SupportsIndex, groups: typing.SupportsInt | typing.SupportsIndex, delayed_lane: bool) -> int:
    """
    Queue cells (64 bytes each) a model's lanes take: see ModelOptions::instance_group.
    """
def current_memory_policy() -> tuple[str, list[int]]:
    """
    The calling thread's NUMA policy as ("bind" | "prefer" | "none", nodes).
    """
def current_thread_affinity() -> list[int]:
    """
    The calling thread's allowed CPUs. Raises OSError when the OS refuses to say.
    """
def format_cpulist(cpus: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> str:
    """
    Format CPU ids the way the kernel does ("0-3,8,10-11").
    """
def parse_cpulist(text: str) -> list[int]:
    """
    Parse a kernel cpulist such as "0-3,8,10-11" into a sorted list of CPU ids.
    Raises ValueError naming the bad token.
    """
def pin_current_thread(cpus: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> tuple[bool, str]:
    """
    Pin the calling thread to `cpus` (pthread_setaffinity_np). Returns (ok, reason); never raises
    for an OS refusal. Threads created afterwards inherit the mask.
    """
def plan_placement(topology: Topology, quotas: collections.abc.Sequence[Quota]) -> dict:
    """
    Place every quota on the topology (pure and deterministic). Returns a dict: models (in the
    given order, each with cpus, reserved, cores, locality, order, instances), shared_pool, usable.
    Raises apportion.errors.QuotaError or PlacementError with .model and .field.
    """
def read_topology(root: str = '/') -> Topology:
    """
    Read CPUs, cores, SMT siblings, packages, NUMA nodes, L3 domains, core kinds and the allowed
    set under `root` ("/" for this machine). Raises RuntimeError naming the file for a malformed tree.
    """
def set_memory_policy(policy: str, nodes: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> tuple[bool, str]:
    """
    Set the calling thread's NUMA policy: "bind", "prefer" (first node) or "none" (default).
    Returns (ok, reason); never raises for an OS refusal.
    """
def set_parent_death_signal(signal: typing.SupportsInt | typing.SupportsIndex) -> bool:
    """
    Ask the kernel to send `signal` to this process when the thread that started it exits
    (prctl PR_SET_PDEATHSIG). False where unsupported.
    """
def thread_affinities(pid: typing.SupportsInt | typing.SupportsIndex = 0, proc_root: str = '/proc') -> list[tuple[int, str, list[int]]]:
    """
    Every thread of process `pid` (0: this one) as (tid, name, allowed CPUs), by tid.
    Raises OSError when the task directory cannot be read.
    """
built_with_cuda: bool = True
