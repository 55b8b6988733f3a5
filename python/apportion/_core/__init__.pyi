"""
apportion native core: engine, queue, metrics, topology, placement, GPU partitioner
"""
from __future__ import annotations
import collections.abc
import concurrent.futures
import typing
from . import gpu
__all__: list[str] = ['Core', 'CoreKind', 'Cpu', 'Future', 'HistogramSnapshot', 'Isolation', 'L3Domain', 'LogHistogram', 'MemoryPolicy', 'ModelSnapshot', 'NumaNode', 'Package', 'Quota', 'ShmChannel', 'Topology', 'built_with_cuda', 'current_memory_policy', 'current_thread_affinity', 'format_cpulist', 'gpu', 'parse_cpulist', 'pin_current_thread', 'plan_placement', 'read_topology', 'set_memory_policy', 'set_parent_death_signal', 'thread_affinities']
class HistogramSnapshot:
    """
    The buckets of a log-bucket histogram at one moment (or of a window: a later snapshot minus
    an earlier one). Values are integers in the histogram's unit: nanoseconds for latencies,
    requests for batch sizes. Bucket i holds the values in (upper_bounds[i-1], upper_bounds[i]];
    32 buckets per power of two, so a quantile is within ~3% of the truth. Immutable.
    """
    def __getstate__(self) -> tuple[list[int], int, int, int]:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, arg0: tuple) -> None:
        ...
    def quantile(self, q: typing.SupportsFloat | typing.SupportsIndex) -> int:
        """
        The value at quantile q in [0, 1] (0.99: p99), in the histogram's unit: the midpoint of the
        bucket holding rank round(q * count), never above max; 0 when empty. Raises ValueError for q
        outside [0, 1].
        """
    def subtract(self, earlier: HistogramSnapshot) -> HistogramSnapshot:
        """
        What was recorded between `earlier` and this snapshot of the same histogram (a window):
        counts and sum are differences, so quantiles are the window's own. Raises ValueError when
        the two are snapshots of different histograms or `earlier` holds more in some bucket (it
        was taken later, or the arguments are swapped).
        """
    @property
    def count(self) -> int:
        """
        Values recorded (the sum of counts).
        """
    @property
    def counts(self) -> tuple[int, ...]:
        """
        Values per bucket, one per upper bound (built on each access).
        """
    @property
    def max(self) -> int:
        """
        Largest value recorded, in the histogram's unit; 0 when empty. For a window: exact when
        the maximum grew in it, else the top of its highest non-empty bucket (capped at the
        later snapshot's max).
        """
    @property
    def mean(self) -> float:
        """
        sum / count in the histogram's unit; 0.0 when empty.
        """
    @property
    def origin(self) -> int:
        """
        Which histogram this is a snapshot of (0: not said); windows need equal origins.
        """
    @property
    def sum(self) -> int:
        """
        Sum of the values recorded, in the histogram's unit (exact).
        """
    @property
    def upper_bounds(self) -> tuple[int, ...]:
        """
        The largest value each bucket holds, in the histogram's unit, ascending (the same for every
        snapshot); the last bucket also holds every value clamped into it (2**64 - 1).
        """
class LogHistogram:
    """
    A log-bucket histogram of non-negative integers (the engine's latency histogram): record()
    values, snapshot() the buckets. One writer at a time; snapshots may be taken meanwhile.
    """
    def __init__(self) -> None:
        ...
    def record(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Record one value (an integer >= 0, e.g. nanoseconds).
        """
    def snapshot(self) -> HistogramSnapshot:
        """
        The buckets now.
        """
class ModelSnapshot:
    """
    One model's counters and histograms at one moment (apportion.ModelStats is built from it).
    Counters count requests since the model was added; latency histograms are in nanoseconds.
    """
    def __repr__(self) -> str:
        ...
    @property
    def batch_size(self) -> HistogramSnapshot:
        """
        Requests per model call (one value per call).
        """
    @property
    def burst_served(self) -> int:
        """
        Requests served by burst workers on the shared pool.
        """
    @property
    def cancelled(self) -> int:
        """
        Requests cancelled before they started.
        """
    @property
    def completed(self) -> int:
        """
        Requests that returned a result.
        """
    @property
    def compute(self) -> HistogramSnapshot:
        """
        Duration of the model call that served each request, in nanoseconds.
        """
    @property
    def delayed(self) -> int:
        """
        Requests moved behind the others by on_timeout="delay".
        """
    @property
    def direct(self) -> int:
        """
        Requests served by their callers directly (Runtime.call on a process model).
        """
    @property
    def end_to_end(self) -> HistogramSnapshot:
        """
        Time from admission to completion, in nanoseconds.
        """
    @property
    def expired(self) -> int:
        """
        Requests whose deadline passed before they started.
        """
    @property
    def failed(self) -> int:
        """
        Requests that raised the model's exception (or whose worker crashed).
        """
    @property
    def instances(self) -> int:
        """
        Worker instances (burst instances excluded).
        """
    @property
    def lane_groups(self) -> int:
        """
        Queues the model keeps (one per NUMA node its instances span; at least 1).
        """
    @property
    def max_queue(self) -> int:
        """
        Admission bound, in requests.
        """
    @property
    def moves(self) -> int:
        """
        Live moves (Runtime.apply) that moved the model while it served.
        """
    @property
    def name(self) -> str:
        ...
    @property
    def oldest_call_ns(self) -> int:
        """
        How long the oldest of those calls has run, in nanoseconds (0: none).
        """
    @property
    def pool_calls(self) -> int:
        """
        Model calls granted shared-pool units.
        """
    @property
    def pool_time_ns(self) -> int:
        """
        Shared-pool time those calls held, in nanoseconds x units (call duration x
        intra-op threads, summed).
        """
    @property
    def queue_wait(self) -> HistogramSnapshot:
        """
        Time from admission to the start of the call, in nanoseconds.
        """
    @property
    def queued(self) -> int:
        """
        Queue slots taken now: requests waiting, plus cancelled or expired ones beyond the spare room.
        """
    @property
    def rejected(self) -> int:
        """
        Submissions refused (queue full, or the model or runtime closing).
        """
    @property
    def running_calls(self) -> int:
        """
        Model calls the model's workers are in now (a batch's call counts once).
        """
    @property
    def stolen(self) -> int:
        """
        Requests an instance took from another NUMA node's queue.
        """
    @property
    def submitted(self) -> int:
        """
        Requests submitted, admitted or refused.
        """
class Future(concurrent.futures.Future[typing.Any]):
    """
    A pending request (concurrent.futures-compatible interface).
    
    Completes exactly once: with a result, the model's exception, DeadlineExceeded, or cancellation.
    """
    def __await__(self) -> typing.Generator[typing.Any, None, typing.Any]:
        ...
    def __repr__(self) -> str:
        ...
    def _interop_setdefault(self, state: typing.Any) -> typing.Any:
        """
        Stores `state` as _interop unless one is stored; returns the stored one.
        """
    def _refuse_own_wait(self) -> None:
        """
        Raises, as result() would, when a wait for this request could not end: ApportionError when the calling thread is a worker of its model (or a done-callback it runs), RuntimeClosed in a process forked since it was submitted; nothing once it is done (for waits that do not go through result(): an event loop run inside the model).
        """
    def add_done_callback(self, fn: collections.abc.Callable[[Future], object]) -> None:  # type: ignore[override]
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
    def exception(self, timeout: float | None = None) -> BaseException | None:
        """
        The exception the request completed with (None on success); raises CancelledError if it was cancelled.
        """
    def result(self, timeout: float | None = None) -> typing.Any:
        """
        The model's result; raises its exception, DeadlineExceeded or CancelledError. Waits at most `timeout` seconds (TimeoutError), releasing the GIL while it waits.
        """
    def running(self) -> bool:
        """
        True while a worker executes the model for this request.
        """
    @property
    def _interop(self) -> typing.Any:
        """
        State that apportion.futures keeps for the stdlib's wait()/as_completed() (None until used).
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
    def _cancel_queued(self, model: str) -> None:
        """
        Completes the model's queued requests, and those its workers take from now on, as cancelled (what close without drain does first).
        """
    def _check_admin(self, what: str) -> None:
        ...
    def _check_not_forked(self) -> None:
        """
        Raises RuntimeClosed in a process forked from the one that made this runtime.
        """
    def _close(self, drain: bool) -> None:
        ...
    def _direct_begin(self, model: str, timeout_ms: typing.Any, priority: typing.Any) -> int:
        ...
    def _direct_end(self, model: str, ok: bool, start_ns: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def _model_names(self) -> list[str]:
        ...
    def _model_stats(self, name: str) -> ModelSnapshot:
        ...
    def _priority_class(self, name: str) -> int | None:
        ...
    def _reshape(self, spec: typing.Any, make_instance: typing.Any, placement: collections.abc.Sequence[tuple[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], typing.SupportsInt | typing.SupportsIndex]], memory_policy: str, groups: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    def _set_max_queue(self, name: str, max_queue: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def _set_placement(self, name: str, instances: collections.abc.Sequence[tuple[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], typing.SupportsInt | typing.SupportsIndex]], memory_policy: str, groups: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = []) -> None:
        ...
    def _set_pool_capacity(self, capacity: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def _set_pool_reserve(self, reserve: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]], nice: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Class reservations on the scheduled pool: (priority_class, units) pairs, and the nice offset of the workers of lower classes.
        """
    def _set_priority_class(self, name: str, priority_class: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def _start(self) -> None:
        ...
    def _submit_to_wait(self, model: str, inputs: typing.Any, timeout_ms: typing.Any, priority: typing.Any) -> Future:
        """
        submit() for call() and infer(), which wait for the result at once: first raises ApportionError when the calling thread is a worker of model `model` (or a done-callback it runs), where that wait could not end.
        """
    def _worker_tids(self, model: str) -> list[int]:
        """
        Kernel thread ids of the model's running workers (empty: no such model).
        """
    def remove_model(self, name: str, *, drain: bool = True) -> None:
        """
        Unregisters a model: new requests get ModelNotFound; queued ones are finished (drain=True) or cancelled (drain=False); returns once its workers have exited.
        """
    def submit(self, model: str, inputs: typing.Any, *, timeout_ms: float | None = None, priority: int | None = None) -> Future:
        """
        Queues one request; returns a Future. Raises QueueFull, ModelNotFound, RuntimeClosed.
        """
    def submit_many(self, model: str, inputs: collections.abc.Iterable[typing.Any], *, timeout_ms: float | None = None, priority: int | None = None) -> list[Future]:
        """
        Queues one request per item, all or none (QueueFull if they do not all fit); returns a list of Futures.
        """
    @property
    def _forked(self) -> bool:
        """
        True in a process forked from the one that made this runtime.
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
class CoreKind:
    """
    What kind of core a hybrid part puts a CPU on (unknown: homogeneous).
    
    Members:
    
      unknown
    
      performance
    
      efficiency
    """
    __members__: typing.ClassVar[dict[str, CoreKind]]
    efficiency: typing.ClassVar[CoreKind]
    performance: typing.ClassVar[CoreKind]
    unknown: typing.ClassVar[CoreKind]
    @typing.overload
    def __eq__(self, other: CoreKind) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: CoreKind) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class MemoryPolicy:
    """
    A thread's NUMA memory policy: bind (only its nodes), prefer (its first node first), none.
    
    Members:
    
      bind
    
      prefer
    
      none
    """
    __members__: typing.ClassVar[dict[str, MemoryPolicy]]
    bind: typing.ClassVar[MemoryPolicy]
    none: typing.ClassVar[MemoryPolicy]
    prefer: typing.ClassVar[MemoryPolicy]
    @typing.overload
    def __eq__(self, other: MemoryPolicy) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: MemoryPolicy) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class Cpu:
    """
    One logical CPU (hardware thread). Offline CPUs have core, package and l3 -1.
    """
    @property
    def allowed(self) -> bool:
        """
        In the process's allowed set.
        """
    @property
    def core(self) -> int:
        """
        Index into Topology.cores; -1 when offline.
        """
    @property
    def id(self) -> int:
        ...
    @property
    def kind(self) -> CoreKind:
        ...
    @property
    def l3(self) -> int:
        """
        Index into Topology.l3_domains; -1 when offline.
        """
    @property
    def node(self) -> int:
        """
        NUMA node id.
        """
    @property
    def online(self) -> bool:
        ...
    @property
    def package(self) -> int:
        """
        physical_package_id.
        """
class Core:
    """
    One physical core: its online SMT siblings, and those this process may use.
    """
    @property
    def core_id(self) -> int:
        """
        The kernel's core_id (unique only within a package/die).
        """
    @property
    def cpus(self) -> list[int]:
        """
        Online siblings, ascending.
        """
    @property
    def die(self) -> int:
        ...
    @property
    def index(self) -> int:
        """
        Position in Topology.cores.
        """
    @property
    def kind(self) -> CoreKind:
        ...
    @property
    def l3(self) -> int:
        ...
    @property
    def node(self) -> int:
        ...
    @property
    def package(self) -> int:
        ...
    @property
    def usable(self) -> list[int]:
        """
        The siblings this process may run on.
        """
class Package:
    """
    One CPU package (socket).
    """
    @property
    def cpus(self) -> list[int]:
        """
        Online CPUs.
        """
    @property
    def id(self) -> int:
        ...
class NumaNode:
    """
    One NUMA node.
    """
    @property
    def cpus(self) -> list[int]:
        """
        Online CPUs (none for a memory-only node).
        """
    @property
    def id(self) -> int:
        ...
    @property
    def memory_bytes(self) -> int:
        """
        MemTotal in bytes; 0 when unknown.
        """
class L3Domain:
    """
    CPUs sharing one L3 cache (one per package without cache information).
    """
    @property
    def cpus(self) -> list[int]:
        ...
    @property
    def id(self) -> int:
        """
        The cache's sysfs id; -1 when unknown or synthesised.
        """
    @property
    def index(self) -> int:
        ...
    @property
    def size_bytes(self) -> int:
        """
        Cache size in bytes; 0 when unknown or synthesised.
        """
class Topology:
    """
    A snapshot of the machine read from sysfs (immutable; safe to share between threads). apportion.topology wraps it in dataclasses.
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
    def cores(self) -> list[Core]:
        ...
    @property
    def cpus(self) -> list[Cpu]:
        """
        Every present CPU, ascending by id.
        """
    @property
    def hybrid(self) -> bool:
        """
        True when performance and efficiency cores differ.
        """
    @property
    def l3_domains(self) -> list[L3Domain]:
        ...
    @property
    def nodes(self) -> list[NumaNode]:
        """
        By id.
        """
    @property
    def offline(self) -> list[int]:
        ...
    @property
    def online(self) -> list[int]:
        ...
    @property
    def packages(self) -> list[Package]:
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
class Isolation:
    """
    How a model holds its CPUs: exclusive (cores of its own) or shared (the shared pool).
    
    Members:
    
      exclusive
    
      shared
    """
    __members__: typing.ClassVar[dict[str, Isolation]]
    exclusive: typing.ClassVar[Isolation]
    shared: typing.ClassVar[Isolation]
    @typing.overload
    def __eq__(self, other: Isolation) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: Isolation) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
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
        Unmap (and, for the creator, unlink); a call in flight on another thread keeps the
        segment mapped until it returns. Idempotent.
        """
    def max_message_bytes(self, parts: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        The most payload bytes, over `parts` parts, that always fit one message.
        """
    def receive(self, spin_us: typing.SupportsFloat | typing.SupportsIndex = 0.0, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> typing.Any:
        """
        Wait (GIL released; spin `spin_us` first) up to `timeout` seconds for a message: a list
        whose first part is bytes and the others bytearrays; None on timeout. ValueError when
        the ring holds a frame no sender writes (the other process's memory was overwritten).
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
def _lane_cells(max_queue: typing.SupportsInt | typing.SupportsIndex, priority_levels: typing.SupportsInt | typing.SupportsIndex, groups: typing.SupportsInt | typing.SupportsIndex, delayed_lane: bool, workers: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Queue cells (64 bytes each) a model's lanes take, as the engine makes them: lanes of 2 x max_queue cells (the delayed lane 2 x max_queue + workers), each rounded up to a power of two.
    """
def _set_future_class(cls: typing.Any) -> None:
    """
    Makes apportion.Future instances report `cls` as their __class__.
    """
def current_memory_policy() -> tuple[MemoryPolicy, list[int]]:
    """
    The calling thread's NUMA policy as (MemoryPolicy, nodes).
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
