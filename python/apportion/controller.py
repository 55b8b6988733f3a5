"""The online controller: re-divides a serving runtime's capacity between its models when the
load mix shifts.

Every ``window_s`` it reads each model's window from the native stats (arrivals, completions,
refusals, p99 end to end (or the objective's percentile), p99 queue wait, mean compute per
request and batch size), refits each
model's per-request cost (compute time of a call divided by its batch size, as measured in that
window) and from it the instances the arrival rate needs at the target utilisation. A model
whose SLO is at risk (p99 above ``risk`` x SLO, refusals, instances busier than ``hot``, a
call still running after ``risk`` x SLO, or requests queued while none completed in a window
longer than that) for
``confirm`` windows in a row gets capacity (of several, the one that leaves the most arrivals
unserved within its SLO; while that one waits out its dwell, the others wait too, and in its
dwell one window at risk is enough to count, since its move started its streak again; one that
no move can help this window, for another reason, is held and the next one is tried): one more
instance, taken from the free CPUs, from CPU time the shared pool's CPUs left idle (a
shared-pool model whose instances are all busy while at least ``headroom`` CPUs sat idle over
the window: instances there own no CPUs, so the nominal count says nothing about the time the
pool has left), or from a model that idles (used below ``idle``, see :attr:`Window.used`:
for a model with CPUs of its own also by its threads' CPU time, which a noisy neighbour does
not inflate, and p99 well under its SLO, no call running half of it, at most one request
queued per instance, for ``confirm`` windows, and more than one instance,
or one core of its own: on an "os" shared pool that core goes to the pool, and the model
serves from the pool beside the others; undone like any move when the models then serve less), or,
on an "os" pool for a pool model that turns requests away with every instance busy, a core
from a model that uses less than UNDERUSED of its own with latency to spare for ``confirm``
windows and stays under ``target`` on the cores it keeps (given its last, it serves from the
pool), or an instance from a pool neighbour of several one-thread instances whose threads' CPU time
(:attr:`Window.pool_cpu_s`) keeps one instance fewer under ``target``, with latency to spare for
``confirm`` windows; a model with a count of cores of its own (one thread an instance) that turns requests
away with every instance busy and gets no core joins the "os" pool with its cores and one
instance more while the pool's models have latency to spare, within ``oversubscribe`` x the
pool's CPUs busy threads; when
nothing can be taken it switches batching on (or, when its calls are already full batches,
doubles its batch size, once per size up to ``max_batch_size``; where its cost model is known,
``costs``, only if that saves BATCH_SAVES of a request's instance time; never in a window whose
arrival rates moved from the ones before it, which its trial could not judge: it waits a window
then, with no other move), and then moves its
``max_queue`` towards what its SLO allows (never below one full batch): down while its p99 is
above ``risk`` x SLO (refusing at once what would miss it; not for admission by deadline, which
already refuses each request that would miss), up while it refuses requests with its p99 below
that (a bound planned for a lower rate refuses requests that would have met the SLO; by a
quarter of the bound at least, see RAISE_AT_LEAST). Last, on an "os" pool, a pool model that
still turns requests away with every instance busy gets one more instance while every other
model in the pool has latency to spare (its objective's latency under half its SLO, nothing
refused or stalled): the OS divides the pool's CPUs between the threads that can run, so the
instance takes a larger share of them from those neighbours, while they keep SHARE_WORTH busy
threads between them and the pool's busy threads (its own instances whole, each neighbour's
counted by the share of them it used) stay within ``oversubscribe`` x its CPUs, and while its
threads each used ``target`` of a CPU or more, where their CPU time is read
(:attr:`Window.pool_cpu_s`; below that its neighbours, keeping up with their load, use the
CPU time it lacks, which a thread more takes from them only while they wait), or while other
processes keep ``headroom`` of the pool's CPUs busy (:attr:`Controller.outside_cpus`; the OS
shares the CPUs out by thread: a thread more takes its share from them). On a scheduled pool
no move leaves a model with an objective where the shared instances of the classes above it
hold every unit (where it was not before): a unit goes to the highest class waiting, so that
model would get one only when they idle. There, a model that turns requests away with every
instance busy, which another instance would let starve
the classes below, joins the highest class below its own where nobody starves, with one more
instance, while its neighbours have latency to spare, given ``classes=True`` (the classes are
a tuner's, not the user's): it then shares the units with that class by weight instead of
holding one above it (its class changes in place; see :meth:`Runtime.apply`). A new
bound alone takes effect at once, without new instances (see :meth:`Runtime.apply`). A model that idles
gives admission back first. A model that moved waits ``dwell_s`` before it moves again (with the
``confirm`` streaks, that is the hysteresis: no flapping on a noisy window).

Every move is a trial. Models share CPUs (a shared pool, its priority classes), so capacity a
model gains can come out of another's: a higher class admitted more starves a lower one. For
the ``judge`` windows after a move the controller makes no other; then it compares the share
of the arrivals its models served within their SLOs (all models with an SLO together) with the
share over as many windows before the move. When that share fell by more than
``tolerance`` (relative) and by more than it moved from window to window over the windows
before the move (a fall within that spread does not tell the move's doing from a noisy host's
or from a load still settling), while the load held (no model's arrival rate moved by more than
MIX_MOVED: a shifting load says nothing about the move), or a moved model's share of failed
requests rose by more than FAILING_JUMP (whatever the load did), the move is undone (the moved models get their old specs back,
logged as a move of its own) and the same kind of move (more instances, a bigger batch or
batching on, a raised or a lowered bound) is not tried for that model again for ``tabu_s``
seconds, or until the load moves (some model's arrival rate by more than MIX_MOVED from the
windows that judged it: the verdict was about another load); the next kind in line is tried
instead (a spare instance's swap, one thread for another, is its own kind: an instance more
undone does not hold it, and one swap undone holds every other for that model; a model that
takes back an instance it gave in a swap gives none for
``tabu_s``: on a saturated pool every thread reads a share of a CPU, and two models whose
latency has room would hand one instance back and forth). A moved model that worked off a backlog over
the trial (served more than arrived, its queue shorter than at the move) completes requests
queued before the move late, however much faster it serves: its windows that began with a
backlog are left out of the trial (the others judge whether the move took from them, and its
own windows once the backlog is gone whether it hurt the model). An idle model's admission restored in the
same step is not judged with the move, and stays.

Every move goes through :meth:`Runtime.apply` (live, exactly once) and is logged with its
reason; :meth:`Controller.stats` reports the state. A model at risk (for ``confirm`` windows)
that gets no move in a window is held, and :attr:`Controller.held` says why. :meth:`Controller.decide` is a pure
function of the windows and the controller's state, so the decision logic is tested without
timing.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._private.checks import finite_number
from ._private.cputime import THREAD_TIMES, cpus_busy_s
from .batching import _MAX_BATCH as MAX_BATCH
from .batching import Batching
from .errors import ApportionError, ModelNotFound, QuotaError, RuntimeClosed
from .spec import ModelSpec
from .stats import HistogramSnapshot, ModelStats, RuntimeStats, same_model
from .tune.cost import CostModel

__all__ = ["Controller", "Move", "Window"]


FULL_BATCHES = 0.9
"""A batching model's calls count as full at a mean batch of this share of its max_size."""

RAISE_AT_MOST = 4
"""A raised admission bound grows by at most this factor in one move."""

ERRORS_KEPT = 100
"""Failures kept in :attr:`Controller.errors`."""

MOVES_KEPT = 10_000
"""Moves kept in :attr:`Controller.moves` (a controller that runs for months keeps its last
ones; :attr:`Controller.counts` counts them all)."""

MIN_WINDOW_S = 0.05
"""The shortest window: a shorter one holds too few requests to read a p99 from (the controller
moved and undid models that met their objectives), and its thread spins (a window of 1 us took
0.75 of a CPU)."""

UNDERUSED = 0.5
"""A model with cores of its own that uses less than this share of them, with latency to spare,
gives a core to a saturated "os" shared pool whose model turns requests away (it serves from
the pool then); an idle one (``idle``) gives it to any model at risk."""

SHARE_WORTH = 0.5
"""Busy threads the other models of a saturated "os" pool must keep between them for one more
instance of a model that refuses requests to take a share of the pool from them."""

BATCH_SAVES = 0.05
"""A model with a known cost model (``Controller(costs=...)``) has batching switched on, or its
batch size doubled, only where that model says a request then costs at least this share less
instance time: a bigger batch lengthens every call and the wait to fill it, so a move that
saves little costs latency, a trial and a dwell for nothing."""

SPARE = "spare: "
"""How the reason of a spare instance's donor move starts (see :meth:`Controller._spare`):
a trial that undoes it holds the receiving model's swaps for ``tabu_s``."""

RAISE_AT_LEAST = 0.25
"""A raise of an admission bound by less than this share of it is not made: a few more queued
requests change little, while the move costs a trial and a dwell in which the model gets no
other (such as a core another model frees)."""


@dataclass(frozen=True)
class Window:
    """One model's load and latency over one controller window."""

    seconds: float
    arrivals: int
    completed: int
    refused: int
    """Rejected at admission or expired before running."""
    p99_ms: float
    queue_wait_p99_ms: float
    compute_ms: float
    """Mean compute time per request (a batch's call time, recorded for each of its requests)."""
    mean_batch: float
    instances: int
    good: int | None = None
    """Completed within the model's SLO (from the end-to-end histogram's buckets); None when
    not known (no SLO given)."""
    cpu_s: float | None = None
    """CPU time the model's threads used in the window (s); None: not read (a model without
    CPUs of its own, or no /proc)."""
    failed: int = 0
    """Requests whose call raised: they took instance time as completions do."""
    pool_cpu_s: float | None = None
    """CPU time the threads of a model on the shared pool used in the window (s): its share of
    the pool's CPUs, which its calls' wall time overstates where its threads wait for a CPU
    (None: not read, or a model with CPUs of its own, see ``cpu_s``)."""
    tail_ms: float | None = None
    """End-to-end latency at the percentile of the model's objective (None: p99, ``p99_ms``)."""
    queued: int = 0
    """Requests waiting in the model's queue at the window's end."""
    queued_before: int = 0
    """... and at its start."""
    oldest_call_ms: float = 0.0
    """How long the oldest call still running at the window's end had run (ms; 0: none ran)."""

    @property
    def objective_ms(self) -> float:
        """The latency the model's objective is about: ``tail_ms``, else ``p99_ms``."""
        return self.p99_ms if self.tail_ms is None else self.tail_ms

    @property
    def pool_cpus(self) -> float | None:
        """CPUs of the shared pool the model's threads used on average (``pool_cpu_s`` over the
        window; None: not read)."""
        return self.pool_cpu_s / self.seconds if self.pool_cpu_s is not None and self.seconds > 0 else None

    @property
    def rate(self) -> float:
        """Arrivals per second."""
        return self.arrivals / self.seconds if self.seconds > 0 else 0.0

    @property
    def cost_s(self) -> float:
        """Instance time one request costs (s): its call's time shared by the call's batch."""
        return self.compute_ms / 1e3 / max(self.mean_batch, 1.0)

    @property
    def busy(self) -> float:
        """Fraction of the instances' time spent in calls (0 .. ~1)."""
        if self.seconds <= 0 or self.instances <= 0:
            return 0.0
        return (self.completed + self.failed) * self.cost_s / (self.seconds * self.instances)

    @property
    def used(self) -> float:
        """Fraction of its instances' capacity the model used: ``busy``, or less where the CPU
        time its threads used (``cpu_s``) reads lower. Both can only overstate the work: a call's
        time includes the moments a busier neighbour held its CPU, and CPU time includes a
        worker's spin before it parks. Whether a model idles is asked of this."""
        if self.cpu_s is None or self.seconds <= 0 or self.instances <= 0:
            return self.busy
        return min(self.busy, self.cpu_s / (self.seconds * self.instances))

    @property
    def stuck(self) -> bool:
        """Whether the model's work stalls: requests waited at the window's end while none
        completed in it. Its latency figures (of completed requests) then say nothing."""
        return self.queued > 0 and self.completed + self.failed == 0

    @property
    def backlogged(self) -> bool:
        """Whether the window began with more queued than the model's instances take at once
        (its requests then waited from before the window)."""
        return self.queued_before > max(self.instances, round(self.instances * self.mean_batch))

    @property
    def draining(self) -> bool:
        """Whether the model served more than arrived in the window, its queue shorter at the
        end: it works off a backlog, whose requests waited before the window."""
        return self.queued < self.queued_before and self.completed + self.failed > self.arrivals

    @property
    def unserved(self) -> int:
        """Arrivals not served within the SLO: not completed, or (when ``good`` is known)
        completed late."""
        return max(0, self.arrivals - (self.completed if self.good is None else self.good))

    def needed(self, target: float) -> int:
        """Instances the arrival rate needs at utilisation ``target``."""
        return max(1, math.ceil(self.rate * self.cost_s / target)) if self.arrivals else 1

    @classmethod
    def between(cls, before: ModelStats, after: ModelStats, seconds: float, slo_ms: float | None = None,
                percentile: float = 99.0) -> Window:
        """The window from two ``rt.stats()`` readings of one model; with ``slo_ms``, also how
        many completed within it; ``percentile``: the objective's (``tail_ms``)."""
        done = after.completed - before.completed
        failed = after.failed - before.failed
        batches = after.batches - before.batches
        e2e = after.end_to_end.since(before.end_to_end)
        good = None
        if slo_ms is not None and e2e.histogram is not None:
            good = min(done, within(e2e.histogram, slo_ms * 1e6))
        tail = None
        if percentile != 99.0 and e2e.histogram is not None:
            tail = e2e.histogram.quantile(percentile / 100) / 1e6
        return cls(
            seconds=seconds,
            arrivals=after.submitted - before.submitted,
            completed=done,
            refused=(after.rejected - before.rejected) + (after.expired - before.expired),
            p99_ms=e2e.p99_ms,
            queue_wait_p99_ms=after.queue_wait.since(before.queue_wait).p99_ms,
            compute_ms=after.compute.since(before.compute).mean_ms,
            mean_batch=(done + failed) / batches if batches > 0 else 1.0,
            instances=after.instances,
            good=good,
            failed=failed,
            tail_ms=tail,
            queued=after.queued,
            queued_before=before.queued,
            oldest_call_ms=after.oldest_call_s * 1e3,
        )


def within(hist: HistogramSnapshot, limit: float) -> int:
    """Values of a histogram snapshot at or below ``limit`` (in its unit): every bucket whose
    upper bound is at or below it, and of the bucket it falls in the share of its width below
    it (values spread evenly within a bucket)."""
    total, lower = 0.0, 0
    for upper, n in zip(hist.upper_bounds, hist.counts):
        if upper <= limit:
            total += n
        else:
            if n and limit > lower:
                total += n * (limit - lower) / (upper - lower)
            break
        lower = upper
    return int(round(total))


@dataclass(frozen=True)
class Move:
    """One change the controller made (or, in ``decide``, wants to make)."""

    at_s: float
    """Seconds since the controller started."""
    model: str
    change: str
    """What changed, e.g. "instances 2 -> 3"."""
    reason: str
    spec: ModelSpec = dataclasses.field(repr=False, compare=False)
    undo: bool = False
    """Whether the move undoes the model's last one (judged to have served less)."""


@dataclass
class _Trial:
    """A move being judged: the moves made (with each model's spec before them), the windows
    before them it is judged against, and the windows read since."""

    moves: list[tuple[Move, ModelSpec]]
    before: list[Mapping[str, Window]]
    after: list[Mapping[str, Window]] = dataclasses.field(default_factory=list)


def _served(windows: list[Mapping[str, Window]]) -> float | None:
    """Completed within the SLO / arrived over ``windows``, all models together (None: no
    arrivals; a window that does not know how many met the SLO counts its completions).
    Against the arrivals, not per second: Poisson noise in the offered rate does not judge a
    move."""
    arrived = sum(w.arrivals for ws in windows for w in ws.values())
    good = sum(w.completed if w.good is None else w.good for ws in windows for w in ws.values())
    return good / arrived if arrived else None


RESTORED = "idle: admission restored"
"""The reason of an idle model's move back to the admission bound the controller lowered. Such
a move rides along in another model's trial (one apply per window) but is not what the trial
judges: it is never undone with it."""


def _drained(trial: _Trial) -> set[str]:
    """The moved models that worked off a backlog over the trial: they served more requests
    than arrived, and their queue is shorter at its end than at the move. Requests queued
    before the move complete late after it, however much faster the model now serves, so
    their share served within the SLO cannot judge such a move while the backlog lasts (which
    may be longer than the trial)."""
    out = set()
    for m, _ in trial.moves:
        name = m.model
        ws = [w[name] for w in trial.after if name in w]
        if not ws or not trial.before or name not in trial.before[-1]:
            continue
        served = sum(w.completed + w.failed for w in ws)
        if served > sum(w.arrivals for w in ws) and ws[-1].queued < trial.before[-1][name].queued:
            out.add(name)
    return out


def _judged(trial: _Trial, drained: set[str]) -> tuple[list[Mapping[str, Window]], list[Mapping[str, Window]]]:
    """The windows before and after a move that judge it: a drained model's windows that began
    with a backlog are left out, before the move as after it (the rest judge it, as every other
    model's do: once its backlog is gone a move that hurt it shows); one left out of every window
    after the move is left out of those before it too."""
    def kept(windows: list[Mapping[str, Window]], gone: set[str]) -> list[Mapping[str, Window]]:
        return [{n: w for n, w in ws.items() if n not in gone and not (n in drained and w.backlogged)}
                for ws in windows]

    after = kept(trial.after, set())
    return kept(trial.before, {n for n in drained if not any(n in ws for ws in after)}), after


MIX_MOVED = 0.25
"""A trial's verdict needs the same load before and after the move: no model's arrival rate
may have moved by more than this share (of the larger of the two rates)."""


def _mix_moved(before: Sequence[Mapping[str, Window]], after: Sequence[Mapping[str, Window]],
               sigmas: float = 0.0) -> bool:
    """Whether some model's arrival rate differs between ``before`` and ``after`` by more than
    MIX_MOVED (a model with fewer than 20 arrivals in both is not judged by its rate) and, given
    ``sigmas``, by more than that many standard deviations of Poisson arrivals (a model with a
    few dozen arrivals a window moves by a quarter now and then by chance alone)."""
    def rates(windows: Sequence[Mapping[str, Window]]) -> dict[str, tuple[float, int, float]]:
        """Per model: its arrival rate, its arrivals and the seconds they came in."""
        out: dict[str, tuple[float, int, float]] = {}
        for name in {n for ws in windows for n in ws}:
            ws = [w[name] for w in windows if name in w]
            seconds = sum(w.seconds for w in ws)
            n = sum(w.arrivals for w in ws)
            out[name] = (n / seconds if seconds > 0 else 0.0, n, seconds)
        return out

    def variance(n: int, seconds: float) -> float:
        """Of a Poisson rate measured as ``n`` arrivals in ``seconds``."""
        return n / seconds ** 2 if seconds > 0 else 0.0

    b, a = rates(before), rates(after)
    for name in b.keys() | a.keys():
        (rb, nb, sb), (ra, na, sa) = b.get(name, (0.0, 0, 0.0)), a.get(name, (0.0, 0, 0.0))
        if (max(nb, na) >= 20 and abs(ra - rb) > MIX_MOVED * max(ra, rb)
                and abs(ra - rb) > sigmas * math.sqrt(variance(nb, sb) + variance(na, sa))):
            return True
    return False


SPREAD_MIN_ARRIVALS: float = 20
"""A window before a move counts toward the spread its verdict allows for (see
:meth:`Controller.verdict`) with at least this many arrivals, all models together: a share of a
handful of requests is 0 or 1 by chance."""

LIFT_SIGMAS = 4.0
"""A hold from a verdict is lifted when some model's arrival rate moved by more than MIX_MOVED
and by more than this many standard deviations of Poisson arrivals (see
:meth:`Controller.lift_stale`): it is checked every window for ``tabu_s``, so chance alone
must almost never pass it."""

FAILING_JUMP = 0.1
"""A moved model whose share of failed requests rose by more than this after the move (with
at least 5 failures) has its move undone, whatever else the windows say."""


def _failing_since(before: list[Mapping[str, Window]], after: list[Mapping[str, Window]],
                   moved: set[str]) -> str | None:
    """Why the move broke a moved model (its failed share jumped), or None."""
    def share(windows: list[Mapping[str, Window]], name: str) -> tuple[float, int]:
        ws = [w[name] for w in windows if name in w]
        failed = sum(w.failed for w in ws)
        done = failed + sum(w.completed for w in ws)
        return (failed / done if done else 0.0), failed

    for name in sorted(moved):
        (fb, _), (fa, na) = share(before, name), share(after, name)
        if na >= 5 and fa > fb + FAILING_JUMP:
            return f"{name!r} failed {fa:.0%} of its requests after it against {fb:.0%} before"
    return None


def _saving(saves: float | None) -> str:
    """A batching move's reason's note of what its model's cost model says it saves."""
    return "" if saves is None else f" (its cost model: {saves:.1%} less a request)"


def _swap_receivers(moves: list[Move]) -> list[str]:
    """The models that received an instance in a spare instance's swap among ``moves`` (its
    donor's reason starts with SPARE; an idle model's admission restored in the same step is
    neither): a swap undone or refused holds their swaps."""
    if not any(m.reason.startswith(SPARE) for m in moves):
        return []
    return [m.model for m in moves if not m.reason.startswith(SPARE) and m.reason != RESTORED]


def _kind(old: ModelSpec, new: ModelSpec) -> str:
    """What a move changed, as its tabu key: "grow", "shrink", "batch", "raise" or "lower"."""
    if (old.isolation == "exclusive") != (new.isolation == "exclusive"):
        return "shrink" if old.isolation == "exclusive" else "grow"  # its cores to the pool, or back
    if _units(new) != _units(old):
        return "grow" if _units(new) > _units(old) else "shrink"
    if new.batching != old.batching:
        return "batch"
    return "raise" if new.max_queue > old.max_queue else "lower"


def _units(spec: ModelSpec) -> int:
    """Intra-op threads a model holds: its instances x threads."""
    return spec.instances * (spec.threads or 1)


def _core_count(spec: ModelSpec) -> int | None:
    """The count of cores of its own of an exclusive model given one (not a CPU list); else None."""
    return spec.cores if spec.isolation == "exclusive" and isinstance(spec.cores, int) else None


def _own_cores(spec: ModelSpec) -> int:
    """CPUs a model holds outside the shared pool (its cores of its own)."""
    if spec.isolation != "exclusive":
        return 0
    count = _core_count(spec)
    return count if count is not None else _units(spec)


def _grown(spec: ModelSpec) -> ModelSpec:
    """One more instance: a single-thread one (and, for a model with cores of its own, one more
    core); for a model of several threads per instance, one more of those (with as many more
    cores), so that growing never takes threads from its instances."""
    t = spec.threads or 1
    if t > 1:
        cores = spec.cores + t if spec.isolation == "exclusive" and isinstance(spec.cores, int) else spec.cores
        return dataclasses.replace(spec, cores=cores, instances=spec.instances + 1)
    if spec.isolation == "exclusive" and isinstance(spec.cores, int):
        n = spec.cores + 1
        return dataclasses.replace(spec, cores=n, instances=n, threads=1)
    return dataclasses.replace(spec, instances=spec.instances + 1, threads=1)


def _shrunk(spec: ModelSpec, release: bool = False) -> ModelSpec | None:
    """One instance (or core) less, or for a model of one multi-thread instance one thread
    less; None when the model is down to one. With ``release``, a model down to one core of its
    own gives that core to the shared pool instead: it serves from the pool with one instance."""
    t = spec.threads or 1
    # The count of cores of its own, for an exclusive model with a count (not a CPU list).
    own = _core_count(spec)
    if t > 1:
        # Several threads per instance: one instance less (and its cores), or for a model of
        # one instance, one thread less (and a core): never all its threads at once.
        try:
            if spec.instances > 1:
                cores = own - t if own is not None else spec.cores
                return dataclasses.replace(spec, cores=cores, instances=spec.instances - 1)
            cores = own - 1 if own is not None else spec.cores
            return dataclasses.replace(spec, cores=cores, threads=t - 1)
        except QuotaError:  # fewer cores than the rest would need (an oversubscribed model)
            return None
    if own is not None:
        if own <= 1:
            if not release:
                return None
            try:
                return dataclasses.replace(spec, isolation="shared", cores=None, instances=1, threads=1)
            except QuotaError:  # a setting only an exclusive model may have, such as burst instances
                return None
        n = own - 1
        return dataclasses.replace(spec, cores=n, instances=n, threads=1)
    if spec.instances <= 1:
        return None
    return dataclasses.replace(spec, instances=spec.instances - 1, threads=1)


def _movable(spec: ModelSpec) -> bool:
    """Whether the model may get new instances while it serves (process, GPU and burst models
    may change their admission bound alone; see Runtime.apply)."""
    return not (spec.process or spec.gpu is not None or spec.burst_instances)


def _change(old: ModelSpec, new: ModelSpec) -> str:
    if old.isolation == "exclusive" and new.isolation == "shared":
        return f"cores {old.cores} -> the shared pool"
    parts = [f"instances {old.instances} -> {new.instances}"]
    if old.cores != new.cores:
        parts.append(f"cores {old.cores} -> {new.cores}")
    if (old.threads or 1) != (new.threads or 1):
        parts.append(f"threads {old.threads} -> {new.threads}")
    if (old.priority_class or 0) != (new.priority_class or 0):
        parts.append(f"priority_class {old.priority_class or 0} -> {new.priority_class or 0}")
    return ", ".join(parts)


class Controller:
    """Runs beside a serving runtime and moves capacity between its models (see the module
    documentation). ``slos``: latency objective in milliseconds per model, at the 99th
    percentile unless ``percentiles`` gives another (models without one are left where they
    are). ``capacity``: instances (one intra-op thread each) the models may hold together,
    those of models without an objective included; default: the CPUs the runtime may use
    (``rt.topology.usable``). ``headroom``: idle CPUs (averaged over a
    window) that let a saturated shared-pool model grow beyond ``capacity``, up to
    ``oversubscribe`` x ``capacity`` instances in all (and a larger share of a saturated "os"
    pool, up to ``oversubscribe`` x the pool's CPUs busy threads). ``history``: windows kept in
    :attr:`history` (for reports such as how long an SLO miss lasted). ``max_batch``,
    ``batch_delay_ms``: the batching a model at risk without it is given, if it is one of
    ``batchable`` (True: every model; default none: a model that takes one input per call
    would fail every request given a list); ``max_batch_size``:
    the largest batch a model at risk whose calls are already full is moved up to (doubling).
    ``judge``, ``tolerance``, ``tabu_s``: how a move is judged, and undone when it served less
    (see the module documentation). ``costs``: cost models of some of the models (such as
    :attr:`apportion.tune.TuneResult.costs`, fitted from the tuner's profiles); a model's batching
    is switched on or its batch doubled only where its cost model says that saves at least
    BATCH_SAVES of a request's instance time (without one, the move is tried and judged).
    ``classes``: whether a saturated model whose instance more would starve the classes below
    it on a scheduled pool may join one of them (default False: a class set to protect a model
    stays where it was set; True for classes a tuner chose, as the demo passes).

    Use ``start()`` / ``stop()`` (or ``with``) to run it on a thread of its own, or call
    ``step()`` yourself once per window."""

    def __init__(self, rt: Any, slos: Mapping[str, float], *, window_s: float = 1.0, dwell_s: float = 3.0,
                 confirm: int = 2, risk: float = 0.8, hot: float = 0.85, idle: float = 0.3, target: float = 0.7,
                 capacity: int | None = None, headroom: float = 0.25, oversubscribe: float = 3.0,
                 max_batch: int = 8, batch_delay_ms: float = 1.0, max_batch_size: int = 32, history: int = 600,
                 judge: int = 3, tolerance: float = 0.03, tabu_s: float = 30.0,
                 log: Callable[[Move], None] | None = None, on_error: Callable[[str], None] | None = None,
                 percentiles: Mapping[str, float] | None = None,
                 batchable: bool | Iterable[str] = False, costs: Mapping[str, CostModel] | None = None,
                 classes: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(slos, Mapping):
            raise QuotaError(f"Controller: slos must be a mapping of model name to its objective in ms, got "
                             f"{type(slos).__name__}")
        if rt is None and capacity is None:
            raise QuotaError("Controller: without a runtime, give capacity (the instances the models may hold)")
        if not slos:
            raise QuotaError("Controller: slos is empty: give the latency objective (ms) of each model it should "
                             "manage, e.g. {'ranker': 50.0}", field="slos")
        for name in slos:
            if not isinstance(name, str):
                raise QuotaError(f"Controller: slos must be keyed by model name, got the key {name!r}", field="slos")
        for field, fn in (("log", log), ("on_error", on_error)):
            if fn is not None and not callable(fn):
                raise QuotaError(f"Controller: {field} must be callable or None, got {type(fn).__name__}",
                                 field=field)
        if not isinstance(classes, bool):
            raise QuotaError(f"Controller: classes must be True or False, got {classes!r}", field="classes")
        if not callable(clock):
            raise QuotaError(f"Controller: clock must be callable (seconds), got {type(clock).__name__}",
                             field="clock")
        for name, slo in slos.items():
            if not (finite_number(slo) and slo > 0):
                raise QuotaError(f"Controller: the SLO must be a positive, finite number of ms, got {slo!r}",
                                 model=name, field="slo")
        if rt is not None:  # (None: decide() alone, in tests)
            unknown = sorted(n for n in slos if n not in rt.models)
            if unknown:
                raise ModelNotFound(f"Controller: model {unknown[0]!r} (field 'slos') is not registered with the "
                                    f"runtime; its models: {sorted(rt.models)}", model=unknown[0])
        for field, value, least in (("window_s", window_s, MIN_WINDOW_S), ("dwell_s", dwell_s, 0.0),
                                    ("tabu_s", tabu_s, 0.0), ("batch_delay_ms", batch_delay_ms, 0.0)):
            if not (finite_number(value) and value >= least):
                raise QuotaError(f"Controller: {field} must be a finite number >= {least:g}, got {value!r}",
                                 field=field)
        if window_s > threading.TIMEOUT_MAX:  # the controller's thread waits a window at a time
            raise QuotaError(f"Controller: window_s must be at most {threading.TIMEOUT_MAX:g} s, got {window_s!r}",
                             field="window_s")
        for field, value in (("confirm", confirm), ("judge", judge), ("max_batch", max_batch),
                             ("max_batch_size", max_batch_size), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuotaError(f"Controller: {field} must be an int >= 1, got {value!r}", field=field)
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise QuotaError(f"Controller: capacity must be an int >= 1 (instances) or None, got {capacity!r}",
                             field="capacity")
        if not all(finite_number(v) for v in (idle, target, hot, risk)) or not 0 < idle < target < hot <= 1.5 \
                or not 0 < risk <= 1:
            raise QuotaError("Controller: need 0 < idle < target < hot <= 1.5 and 0 < risk <= 1")
        if not (finite_number(tolerance) and 0 <= tolerance < 1):
            raise QuotaError(f"Controller: need 0 <= tolerance < 1, got tolerance={tolerance!r}", field="tolerance")
        if max_batch > max_batch_size or max_batch_size > MAX_BATCH:
            raise QuotaError(f"Controller: need max_batch <= max_batch_size <= {MAX_BATCH} (the largest batch a "
                             f"model may be moved to), got max_batch={max_batch}, max_batch_size={max_batch_size}",
                             field="max_batch")
        if isinstance(batchable, str) or not isinstance(batchable, (bool, Iterable)):
            raise QuotaError(f"Controller: batchable must be True, False or an iterable of model names, got "
                             f"{batchable!r}", field="batchable")
        batchable_names = None if isinstance(batchable, bool) else frozenset(batchable)
        for name in sorted(batchable_names or ()):
            if not isinstance(name, str) or name not in slos:
                raise QuotaError(f"Controller: batchable names {name!r}, which has no SLO in slos",
                                 model=name if isinstance(name, str) else None, field="batchable")
        if costs is not None and not isinstance(costs, Mapping):
            raise QuotaError(f"Controller: costs must be a mapping of model name to its CostModel (such as "
                             f"TuneResult.costs), got {type(costs).__name__}", field="costs")
        for name, cost in (costs or {}).items():
            # The tuner fits every model of its config: one without an objective is kept, unused.
            if not isinstance(name, str) or (name not in slos and (rt is None or name not in rt.models)):
                raise QuotaError(f"Controller: costs names {name!r}, which is neither in slos nor a model of the "
                                 "runtime", model=name if isinstance(name, str) else None, field="costs")
            if not isinstance(cost, CostModel):
                raise QuotaError(f"Controller: the cost model must be an apportion.tune.CostModel, got "
                                 f"{type(cost).__name__}", model=name, field="costs")
        pcts = dict(percentiles or {})
        for name, pct in pcts.items():
            if name not in slos:
                raise QuotaError(f"Controller: a percentile for model {name!r}, which has no SLO in slos",
                                 model=name, field="percentile")
            if not (finite_number(pct) and 0 < pct <= 100):
                raise QuotaError(f"Controller: the percentile must be a number in (0, 100], got {pct!r}",
                                 model=name, field="percentile")
        if not (finite_number(headroom) and headroom > 0 and finite_number(oversubscribe) and oversubscribe >= 1):
            raise QuotaError(f"Controller: need finite headroom > 0 and oversubscribe >= 1, got headroom={headroom!r}, "
                             f"oversubscribe={oversubscribe!r}")
        self.rt = rt
        self.slos = dict(slos)
        self.percentiles = {n: float(pcts.get(n, 99.0)) for n in self.slos}
        """The percentile each model's objective is about (default 99)."""
        self.window_s, self.dwell_s, self.confirm = window_s, dwell_s, confirm
        self.risk, self.hot, self.idle, self.target = risk, hot, idle, target
        self.capacity = capacity if capacity is not None else len(rt.topology.usable)
        self.release = getattr(rt, "shared_pool", "os") == "os"
        """Whether an idle donor down to one core of its own may give that core to the shared
        pool (moving to the pool itself): on an "os" pool; a scheduled pool's models cannot
        change isolation while registered."""
        self.headroom, self.oversubscribe = headroom, oversubscribe
        self._pool: frozenset[int] = frozenset()  # the shared pool's CPUs at the last reading
        self._busy_s: float | None = None  # their busy seconds then
        self._last_cpu: dict[str, float] = {}  # CPU seconds of the models with an objective
        self.idle_cpus: float | None = None
        """CPUs of the runtime's shared pool that sat idle over the last window (None: not
        measured, or the pool changed during the window)."""
        self._own: float | None = None  # this process's CPU seconds in the pool at the last reading
        self.outside_cpus: float | None = None
        """CPUs of the runtime's shared pool that other processes kept busy over the last
        window: the pool's busy time less this process's CPU time, less what its models with
        cores of their own used there (None: not measured; or the pool changed, or a model runs
        in worker processes, whose time is not this process's)."""
        self.max_batch, self.batch_delay_ms, self.max_batch_size = max_batch, batch_delay_ms, max_batch_size
        self.batchable: frozenset[str] = frozenset(self.slos) if batchable is True else (batchable_names or frozenset())
        """The models whose batching the controller may switch on (their calls take a list of
        inputs); a model that already batches may have its batch size changed whatever this says."""
        # Beside a pool_reserve a class cannot change live (see Runtime.apply): the move would
        # only be refused, and hold the model's growth.
        self.classes = classes and not getattr(rt, "_pool_reserve", None)
        """Whether a model may be moved to a lower priority class of the scheduled pool (see
        :meth:`decide`): for classes a tuner chose; a class set to protect a model stays."""
        self.costs: dict[str, CostModel] = dict(costs or {})
        """Known cost models (``costs``): what batching saves a model (see BATCH_SAVES)."""
        self.clock = clock
        self._log = log
        self._t0 = clock()
        self._risk_streak: dict[str, int] = {n: 0 for n in slos}
        self._idle_streak: dict[str, int] = {n: 0 for n in slos}
        self._roomy_streak: dict[str, int] = {n: 0 for n in slos}  # windows in a row with latency to spare
        self._stalled_s: dict[str, float] = {}  # seconds of windows in a row with work waiting, none done
        self._last_move: dict[str, float] = {}
        self._full_queue: dict[str, int] = {}  # max_queue before the controller lowered it
        self._batch_tried: dict[str, set[int]] = {}  # batch sizes the controller moved a model to
        self.judge, self.tolerance, self.tabu_s = judge, tolerance, tabu_s
        self._trial: _Trial | None = None  # the last move, while it is judged
        self._tabu: dict[tuple[str, str], float] = {}  # (model, kind of move) -> tried again from (s)
        # A hold set by a trial's verdict -> the windows that judged it (the load it held under).
        self._tabu_load: dict[tuple[str, str], list[Mapping[str, Window]]] = {}
        self._gave: dict[str, tuple[str, float]] = {}  # swap donor -> (its receiver, when: s)
        self._last: RuntimeStats | None = None
        self._last_at = 0.0
        self.moves: list[Move] = []
        """The moves made (the last MOVES_KEPT), oldest first."""
        self.counts: dict[str, dict[str, int]] = {n: {"moves": 0, "undone": 0, "held": 0} for n in self.slos}
        """Per model, since the start: moves made, moves undone (those made undoing an earlier
        one), and windows in which it was at risk and got no move (:attr:`held`)."""
        self.error_count = 0
        """Failures since the start (:attr:`errors` keeps the last ERRORS_KEPT)."""
        self.windows: dict[str, Window] = {}
        self.history: deque[tuple[float, dict[str, Window]]] = deque(maxlen=history)
        """The last ``history`` windows read, as (seconds since the start at the window's
        end, {model: window}), oldest first."""
        self.held: dict[str, tuple[float, int, str]] = {}
        """Per model: the last window in which it was at risk and got no move
        (seconds since the start), in how many windows that happened, and why: what stopped
        each way of serving it more (a dwell, no capacity to take, calls not full, admission
        already at its bound)."""
        self.errors: list[str] = []
        """The last ERRORS_KEPT failures (moves the runtime refused, windows that failed), oldest
        first; each is also passed to ``on_error`` as it happens."""
        self._on_error = on_error
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- decisions (pure: windows and state in, moves out) ---------------------------------------
    def decide(self, windows: Mapping[str, Window], specs: Mapping[str, ModelSpec], now_s: float,
               fits: Callable[[Mapping[str, ModelSpec]], bool] | None = None,
               idle_cpus: float | None = None, queue_sizes: Mapping[str, int] | None = None,
               held_by_others: int = 0, pool_cpus: int | None = None,
               other_specs: Mapping[str, ModelSpec] | None = None, load_held: bool = True,
               outside_cpus: float | None = None) -> list[Move]:
        """The moves this window calls for, given each model's window and current spec, at
        ``now_s`` seconds since the start; updates the streaks (call once per window). At most
        one model gains per window; the donor it takes from moves in the same step. ``fits``
        says whether a set of specs can be placed together (default: always); a growth that
        does not fit is not proposed. ``idle_cpus``: the runtime's CPUs that sat idle over the
        window (None: unknown, so no growth into idle time). ``queue_sizes``: the highest
        max_queue each model may be given (its queue's size, :meth:`Runtime.queue_size`);
        default: no raise beyond the bound the controller lowered it from. ``held_by_others``:
        instances (threads) of the runtime's models not in ``specs`` (no objective, or no
        window yet), which count against ``capacity`` too. ``pool_cpus``: the CPUs of the shared
        pool (None: not known, ``capacity`` stands for them). ``other_specs``: the specs of those
        models, where known (their shared instances hold the pool's units and threads too; unknown,
        ``held_by_others`` counts as shared and in the highest class). ``load_held``: whether the
        load held over the windows a move made now would be judged against (no model's arrival
        rate in this window moved by more than MIX_MOVED from the ones before it): a batching
        move waits while it does not, since its trial could not judge it (see :meth:`verdict`).
        ``outside_cpus``: the shared pool's CPUs other processes kept busy over the window (see
        :attr:`outside_cpus`; None: unknown)."""
        fits = fits or (lambda _specs: True)
        at_risk: list[tuple[float, float, str]] = []
        dwelling: list[tuple[float, float, str]] = []  # at risk this window, streak reset by a move
        idle: list[str] = []
        for name, w in windows.items():
            slo = self.slos.get(name)
            if slo is None or name not in specs:
                continue
            # A stalled model (requests wait, none completes) and one whose running call is
            # already past the SLO are at risk whatever the completed requests' latency says:
            # they have none, or only the quick ones; neither is ever idle.
            late_call = w.oldest_call_ms > self.risk * slo
            # Windows in a row with requests waiting and none completed: at risk once they last
            # the SLO's risk share (3 s calls against a 10 s SLO in 1 s windows are not; 10 such
            # windows are), never idle.
            self._stalled_s[name] = self._stalled_s.get(name, 0.0) + w.seconds if w.stuck else 0.0
            stalled = self._stalled_s[name] * 1e3 > self.risk * slo
            risky = (w.objective_ms > self.risk * slo or w.refused > 0 or w.busy > self.hot or stalled
                     or late_call)
            calm = w.used < self.idle and w.queued <= w.instances and self._roomy(name, w)
            self._risk_streak[name] = self._risk_streak.get(name, 0) + 1 if risky else 0
            self._idle_streak[name] = self._idle_streak.get(name, 0) + 1 if calm else 0
            self._roomy_streak[name] = self._roomy_streak.get(name, 0) + 1 if self._roomy(name, w) else 0
            need = (w.unserved / w.seconds if w.seconds > 0 else 0.0, w.objective_ms / slo + w.busy, name)
            if self._risk_streak[name] >= self.confirm:
                # The model that leaves the most arrivals unserved within its SLO gains first
                # (what a move can win), then the one nearest its SLO and busiest.
                at_risk.append(need)
            elif risky and not self._dwelled(name, now_s):
                # A move reset its streak, and its trial's windows count none: it may still be
                # the neediest, which its dwell (below) holds the others back for.
                dwelling.append(need)
            elif self._idle_streak[name] >= self.confirm and self._dwelled(name, now_s):
                idle.append(name)
        moves: list[Move] = []
        # Idle models with a lowered admission get it back first (cheap, never hurts them).
        for name in idle:
            spec = specs[name]
            full = self._full_queue.get(name, spec.max_queue)
            if spec.max_queue < full and self._open(name, "raise", now_s):
                moves.append(self._move(now_s, name, dataclasses.replace(spec, max_queue=full),
                                        f"max_queue {spec.max_queue} -> {full}", RESTORED))
        if not at_risk:
            return moves
        *_, name = max(at_risk + dwelling)
        if not self._dwelled(name, now_s):
            # The model that needs it most moved within dwell_s: what could be taken for it
            # waits for it rather than going to a model that needs it less.
            return self._hold(moves, now_s, name, f"in its dwell since its move at {self._last_move[name]:.1f} s")
        # The neediest first; one that nothing can help this window (held for another reason
        # than its dwell: no room, a move undone lately, instances that cannot change) does not
        # hold back the next one at risk. A model whose admission was just restored gives
        # nothing this window: one apply names each model once.
        donors = [d for d in idle if d not in {m.model for m in moves}]
        for _, _, name in sorted(at_risk, reverse=True):
            if not self._dwelled(name, now_s):
                continue
            got = self._attempt(name, windows, specs, now_s, fits, idle_cpus, queue_sizes, held_by_others, donors,
                                pool_cpus, other_specs, {m.model for m in moves}, load_held, outside_cpus)
            if isinstance(got, str):
                self._hold(moves, now_s, name, got)
                continue
            return [*moves, *got]
        return moves

    def _attempt(self, name: str, windows: Mapping[str, Window], specs: Mapping[str, ModelSpec], now_s: float,
                 fits: Callable[[Mapping[str, ModelSpec]], bool], idle_cpus: float | None,
                 queue_sizes: Mapping[str, int] | None, held_by_others: int, idle: list[str],
                 pool_cpus: int | None = None, other_specs: Mapping[str, ModelSpec] | None = None,
                 taken: frozenset[str] | set[str] = frozenset(), load_held: bool = True,
                 outside_cpus: float | None = None) -> list[Move] | str:
        """The moves that serve model ``name`` (at risk) more this window, its own first, or why
        none can (see :meth:`decide`)."""
        w, spec = windows[name], specs[name]
        slo = self.slos[name]
        why = (f"SLO at risk: p{self.percentiles.get(name, 99.0):g} {w.objective_ms:.1f} ms of {slo:g} ms, "
               f"busy {w.busy:.0%}, {w.refused} refused, {w.rate:.0f} req/s needs ~{w.needed(self.target)} "
               "instance(s)"
               + (f"; stalled: {w.queued} queued, none completed in {w.seconds:.1f} s" if w.stuck else "")
               + (f"; a call running {w.oldest_call_ms:.0f} ms" if w.oldest_call_ms > self.risk * slo else ""))
        used = held_by_others + sum(_units(s) for s in specs.values())
        grown = _grown(spec)
        more = _units(grown) - _units(spec)
        # Room to grow: free capacity, or idle time in the shared pool for a saturated shared model.
        room = "; free capacity" if used + more <= self.capacity else None
        if (room is None and spec.isolation == "shared" and w.busy > self.hot and idle_cpus is not None
                and idle_cpus >= self.headroom and used + more <= self.oversubscribe * self.capacity):
            room = f"; {idle_cpus:.1f} of the pool's CPUs sat idle"
        movable = _movable(spec)
        starves = self._starves(specs, {name: grown}, pool_cpus, other_specs, held_by_others)
        can_grow = movable and self._open(name, "grow", now_s)
        if can_grow and room is not None and not starves and fits({**specs, name: grown}):
            return [self._move(now_s, name, grown, _change(spec, grown), why + room)]
        # Why nothing below moves it, for held(): each way of serving it more, and what stops it.
        if not movable:
            blocked = ["its instances cannot change while it serves (process, GPU or burst instances)"]
        elif not can_grow:
            blocked = ["another instance was undone lately"]
        elif room is None:
            blocked = [f"no free capacity ({used} of {self.capacity} instances held"
                       + (f", {idle_cpus:.1f} pool CPUs idle" if idle_cpus is not None else "") + ")"]
        elif starves:
            blocked = [starves]
        else:
            blocked = ["another instance does not fit"]
        donors = sorted((windows[d].used, d) for d in idle
                        if d != name and _movable(specs[d]) and _shrunk(specs[d], self.release) is not None
                        ) if can_grow else []
        if movable:
            if can_grow:  # (else said above: no donor is asked)
                blocked.append("no idle model to take from" if not donors else "no idle model's capacity fits")
        for _, d in donors:
            ds = specs[d]
            shrunk = _shrunk(ds, self.release)
            assert shrunk is not None
            if not fits({**specs, d: shrunk, name: grown}) or self._starves(
                    specs, {d: shrunk, name: grown}, pool_cpus, other_specs, held_by_others):
                continue
            gives = "its core to the shared pool" if shrunk.isolation != ds.isolation else "an instance"
            return [
                    self._move(now_s, d, shrunk, _change(ds, shrunk),
                               f"idle (used {windows[d].used:.0%}): gives {gives} to {name!r}"),
                    self._move(now_s, name, grown, _change(spec, grown), why + f"; taken from {d!r}")]
        if can_grow and self.release and spec.isolation == "shared" and w.refused > 0 and w.busy > self.hot:
            # No model idles, but one with a core of its own uses under UNDERUSED of it with
            # latency to spare while this pool model turns requests away: the core serves more in
            # the pool (the model keeps serving there, beside the others).
            for used_d, d in self._underused(name, windows, specs, now_s, taken):
                ds = specs[d]
                shrunk = _shrunk(ds, True)
                if shrunk is None or not fits({**specs, d: shrunk, name: grown}):
                    continue
                gives = "its core" if shrunk.isolation == "shared" else "a core"
                return [
                        self._move(now_s, d, shrunk, _change(ds, shrunk),
                                   f"underused (used {used_d:.0%}) with latency to spare: gives {gives} to the "
                                   f"shared pool for {name!r}"),
                        self._move(now_s, name, grown, _change(spec, grown), why + f"; taken from {d!r}")]
        if (movable and (can_grow or (spec.threads or 1) == 1) and self._open(name, "swap", now_s) and self.release
                and spec.isolation == "shared" and w.refused > 0 and w.busy > self.hot):
            # Nor one with cores, but a pool neighbour whose threads' CPU time fits in one
            # instance fewer with latency to spare: its instance (a thread competing for the
            # pool's CPUs) serves more as one of this model's. One thread for another adds none
            # to the pool, so an instance more undone lately (a thread added) does not hold it;
            # undone, it holds this model's swaps (from any donor) for tabu_s.
            for cpus, d in self._spare(name, windows, specs, now_s, taken):
                ds = specs[d]
                shrunk = _shrunk(ds)
                if shrunk is None or not fits({**specs, d: shrunk, name: grown}):
                    continue
                # This model gave 'd' an instance lately and now needs one back: on a saturated
                # pool every thread uses a third of a CPU, so each of the two reads as spare
                # whenever it has latency to spare, and they would hand the instance back and
                # forth. It takes it back once; its own giving is held for tabu_s.
                gave = self._gave.get(name)
                if gave is not None and gave[0] == d and now_s - gave[1] < self.tabu_s:
                    self._tabu[(name, "shrink")] = now_s + self.tabu_s
                    self._tabu_load.pop((name, "shrink"), None)  # no load lifts this hold
                self._gave[d] = (name, now_s)
                return [
                        self._move(now_s, d, shrunk, _change(ds, shrunk),
                                   f"{SPARE}its threads used {cpus:.2f} CPUs, with latency to spare: gives an "
                                   f"instance to {name!r}"),
                        self._move(now_s, name, grown, _change(spec, grown), why + f"; taken from {d!r}")]
        own = _core_count(spec)
        if (movable and own is not None and (spec.threads or 1) == 1 and self.release and w.refused > 0
                and w.busy > self.hot and self._open(name, "shrink", now_s)):
            # Cores of its own, all busy, requests turned away, and no core to take: it joins the
            # "os" pool with its cores and one instance more, a share of every pool CPU, while
            # the pool's models have latency to spare (the trial undoes it when they then serve
            # less).
            joined = self._joined(name, own, windows, specs, held_by_others, pool_cpus, other_specs)
            if isinstance(joined, str):
                blocked.append(joined)
            elif fits({**specs, name: joined[0]}):
                return [self._move(now_s, name, joined[0],
                                   f"cores {own} -> the shared pool, instances {spec.instances} -> {own + 1}",
                                   why + f"; no core to take, and the pool's models have latency to spare "
                                   f"({joined[1]}): joins the pool with its cores")]
        can_batch = movable and self._open(name, "batch", now_s)
        b = spec.batching
        batch_move: tuple[ModelSpec, str, str] | None = None  # the new spec, what changed, the reason
        if not movable:
            pass  # said above
        elif not can_batch:
            blocked.append("a batching move was undone lately")
        elif b is None:
            if self.max_batch <= 1:
                blocked.append("batching is off (max_batch 1)")
            elif name not in self.batchable:
                blocked.append("batching is off and the model is not batchable (Controller(batchable=...))")
            elif (saves := self._saves(name, spec, 1, self.max_batch)) is not None and saves < BATCH_SAVES:
                blocked.append(f"its cost model says a batch of {self.max_batch} saves {saves:.1%} a request")
            else:
                batch_move = (dataclasses.replace(spec, batching=Batching(self.max_batch, self.batch_delay_ms)),
                              f"batching off -> {self.max_batch}", why + "; no capacity to take: batch" + _saving(saves))
        elif w.busy <= self.hot or w.mean_batch < FULL_BATCHES * b.max_size:
            blocked.append(f"calls not full (mean batch {w.mean_batch:.1f} of {b.max_size}, busy {w.busy:.0%})")
        elif b.max_size * 2 > self.max_batch_size or b.max_size * 2 in self._batch_tried.get(name, ()):
            blocked.append(f"batch {b.max_size * 2} beyond max_batch_size or tried")
        elif (saves := self._saves(name, spec, b.max_size, b.max_size * 2)) is not None and saves < BATCH_SAVES:
            blocked.append(f"its cost model says batch {b.max_size * 2} saves {saves:.1%} a request against "
                           f"{b.max_size}")
        else:
            # Every call already full: a bigger batch serves more per instance (the call's fixed
            # cost shared by more requests). Tried once per size: a size that did not help is
            # not tried again, and admission comes next.
            batch_move = (dataclasses.replace(spec, batching=dataclasses.replace(b, max_size=b.max_size * 2)),
                          f"batch {b.max_size} -> {b.max_size * 2}",
                          why + f"; no capacity to take, calls full (mean batch {w.mean_batch:.1f}): bigger batches"
                          + _saving(saves))
        if batch_move is not None and not load_held:
            # Its trial needs the load that judges it to hold (a doubled batch that hurt was
            # kept when it was made while the mix shifted): the model waits for a window that
            # does, rather than take a move that comes after batching in this window.
            blocked.append("the load is moving: a batching move waits for it to hold (its trial could not judge it)")
            return why + "; held: " + ", ".join(blocked)
        if batch_move is not None:
            new_spec, change, reason = batch_move
            if b is not None:
                self._batch_tried.setdefault(name, set()).add(b.max_size * 2)
            return [self._move(now_s, name, new_spec, change, reason)]
        # Admission: queue as many as the instances can serve within the SLO, and never less
        # than one full batch (below it every call is smaller, so the model serves less). Lowered
        # only while the latency itself is at risk: refusing requests that would meet their
        # SLO only loses goodput. Not lowered for admission by deadline, which already refuses
        # each request that would miss (with a margin learned from late completions): a blunter
        # bound on top of it would refuse requests that admission found in time. Raised when
        # the model refuses while its latency has room (a bound planned for a lower rate).
        # Both moves go towards the same figure, so they cannot flap.
        batch = spec.batching.max_size if spec.batching is not None else 1
        allowed = max(batch, int(slo / 1e3 / max(w.cost_s, 1e-6) * spec.instances * 0.5))
        if w.objective_ms > self.risk * slo:  # late
            if spec.admission == "deadline":
                blocked.append("admission by deadline already refuses what would miss")
            elif allowed >= spec.max_queue:
                blocked.append(f"max_queue {spec.max_queue} already at most what the SLO allows ({allowed})")
            elif not self._open(name, "lower", now_s):
                blocked.append("a lowered bound was undone lately")
            else:
                self._full_queue.setdefault(name, spec.max_queue)
                lowered = dataclasses.replace(spec, max_queue=allowed)
                return [self._move(now_s, name, lowered, f"max_queue {spec.max_queue} -> {allowed}",
                                           why + "; no capacity to take: refuse what would miss the SLO")]
        else:
            size = (queue_sizes or {}).get(name, self._full_queue.get(name, spec.max_queue))
            raised = min(allowed, RAISE_AT_MOST * spec.max_queue, size)
            if w.refused == 0:
                blocked.append("its latency has room and it refuses nothing")
            elif raised <= spec.max_queue:
                blocked.append(f"max_queue {spec.max_queue} already admits what the SLO allows ({raised})")
            elif raised < spec.max_queue + math.ceil(RAISE_AT_LEAST * spec.max_queue):
                blocked.append(f"a raise to {raised} would admit too few more")
            elif not self._open(name, "raise", now_s):
                blocked.append("a raised bound was undone lately")
            else:
                wider = dataclasses.replace(spec, max_queue=raised)
                return [self._move(now_s, name, wider, f"max_queue {spec.max_queue} -> {raised}",
                                           why + "; latency has room: admit what the SLO allows")]
        # A share of a saturated "os" pool: the OS divides the pool's CPUs between the threads
        # that can run, so one more instance of a shared model that turns requests away gets it
        # more of them, out of the pool's other models: after the moves that cost no other
        # model anything. Taken only from neighbours whose latency
        # has room to spare (see _roomy_neighbours); the trial undoes it when they then serve less.
        if movable and can_grow and self.release and spec.isolation == "shared" and w.refused > 0 \
                and w.busy > self.hot:
            # The pool's busy threads: this model's instances whole, each neighbour's by the
            # share of them it used, the shared threads of models without an objective whole
            # (all of held_by_others where their specs are not known); against oversubscribe x
            # the pool's CPUs (x capacity where the pool is not known). The neighbours must keep
            # SHARE_WORTH busy threads between them: else the pool's CPUs are this model's
            # already, and another instance of it only adds a thread.
            neighbours, outside = self._pool_threads(name, windows, specs, held_by_others, other_specs)
            busy_units = _units(spec) + neighbours + outside + sum(
                _units(s) for n, s in specs.items() if s.isolation == "shared" and n != name and n not in windows)
            most = self.oversubscribe * (pool_cpus if pool_cpus is not None else self.capacity)
            roomy = self._roomy_neighbours(name, windows, specs)
            if roomy is None:
                blocked.append("no neighbour in the pool has latency to spare")
            elif neighbours + outside < SHARE_WORTH:
                blocked.append(f"its neighbours in the pool keep {neighbours + outside:.1f} threads busy: no share "
                               "to take")
            elif busy_units + more > most:
                blocked.append(f"{busy_units:.1f} busy threads in the pool: one more instance passes {most:g} "
                               "(oversubscribe x its CPUs)")
            elif (w.pool_cpus is not None and (per_thread := w.pool_cpus / _units(spec)) < self.target
                  and (outside_cpus is None or outside_cpus < self.headroom)):
                # Neighbours that keep up with their load use the CPU time their load needs
                # however many threads this model runs: it gets the rest already, and a thread
                # more gets it a share only while they wait (their latency, not its throughput).
                # Only while its threads each run most of a CPU is it short of threads, or while
                # other processes keep `headroom` of the pool's CPUs busy: the OS shares the
                # CPUs out by thread, and a thread more takes its share from them.
                elsewhere = f"{outside_cpus:.2f}" if outside_cpus is not None else "an unknown share"
                blocked.append(f"its {_units(spec)} threads used {per_thread:.2f} of a CPU each (under "
                               f"{self.target:g}) and other processes kept {elsewhere} of the pool's CPUs busy: "
                               "no sign that a thread more would get it more CPU time")
            elif not fits({**specs, name: grown}):
                blocked.append("another instance does not fit")
            else:
                return [self._move(now_s, name, grown, _change(spec, grown),
                                   why + f"; the pool is saturated and its other models have latency to spare "
                                   f"({roomy}): a larger share of it")]
        if (self.classes and movable and can_grow and starves and spec.isolation == "shared" and w.refused > 0
                and w.busy > self.hot):
            # A scheduled pool whose classes below this model would starve were it to hold one
            # more unit above them: instead it joins the highest class below its own where
            # nobody starves, with the instance more, and shares the units with that class by
            # weight (taking what its members leave) instead of holding a unit above them.
            # Nobody at all: a class whose models starve already would be starved the more
            # by its two instances above them.
            shared = [(specs[n].priority_class or 0) for n in specs
                      if n != name and specs[n].isolation == "shared" and n in self.slos]
            own_class = spec.priority_class or 0
            lower = sorted({c for c in shared if c < own_class}, reverse=True)
            roomy = self._roomy_neighbours(name, windows, specs)
            if not lower:
                pass  # said above (starves): no class to join
            elif roomy is None:
                blocked.append("no neighbour in the pool has latency to spare to share a class with")
            else:
                for c in lower:
                    classed = dataclasses.replace(grown, priority_class=c)
                    if self._starves(specs, {name: classed}, pool_cpus, other_specs, held_by_others, anew=False):
                        continue
                    if not fits({**specs, name: classed}):
                        break
                    # Like a larger share of an "os" pool, it needs no free capacity: it
                    # takes its units from the class it joins, by weight, and the trial
                    # undoes it when they then serve less.
                    return [self._move(now_s, name, classed, _change(spec, classed),
                                       why + f"; one more unit above the classes below would starve them, and "
                                       f"its neighbours have latency to spare ({roomy}): joins class {c} and "
                                       "shares the pool with it")]
                blocked.append(f"no class below {own_class} to join with an instance more leaves every model a unit")
        return why + "; held: " + ", ".join(blocked)

    def _starves(self, specs: Mapping[str, ModelSpec], changed: Mapping[str, ModelSpec], pool_cpus: int | None,
                 other_specs: Mapping[str, ModelSpec] | None = None, held_by_others: int = 0,
                 anew: bool = True) -> str:
        """Why the move to ``changed`` (model -> new spec) would starve a model of a scheduled
        pool, or "". A unit goes to the highest class waiting, so a model with an objective
        gets one only when the shared instances of the classes above it idle: none while they
        hold every unit and are saturated, which is when growth is asked for. A move that leaves
        some such model in that state where it was not before is refused (one that was already
        there is not this move's doing). Models outside ``specs`` count by ``other_specs``, or,
        unknown, as ``held_by_others`` threads in the highest class. With ``anew`` False, any
        model left in that state counts, whether or not it was so before."""
        if self.release:
            return ""
        others = dict(other_specs or {})
        unknown = 0 if other_specs is not None else held_by_others

        def starved(now: Mapping[str, ModelSpec]) -> tuple[set[str], dict[str, tuple[int, int, int]]]:
            every = {**others, **now}
            units = pool_cpus if pool_cpus is not None else self.capacity
            if pool_cpus is not None:
                # Cores a model takes from the pool or gives it back in the move.
                units += sum((_own_cores(specs[n]) if n in specs else 0) - _own_cores(s) for n, s in now.items()
                             if n in changed)
            shared = [(s.priority_class or 0, _units(s)) for s in every.values() if s.isolation == "shared"]
            out, why = set(), {}
            for n, s in now.items():
                if n not in self.slos or s.isolation != "shared":
                    continue
                cls = s.priority_class or 0
                above = unknown + sum(u for c, u in shared if c > cls)
                if above >= units:
                    out.add(n)
                    why[n] = (cls, above, units)
            return out, why

        before, _ = starved(specs) if anew else (set(), {})
        after, why = starved({**specs, **changed})
        new = sorted(after - before)
        if not new:
            return ""
        cls, above, units = why[new[0]]
        return (f"the move would leave no unit of the scheduled pool to {', '.join(new)} (class {cls}): the classes "
                f"above it would hold {above} of its {units}")

    def _pool_threads(self, name: str, windows: Mapping[str, Window], specs: Mapping[str, ModelSpec],
                      held_by_others: int, other_specs: Mapping[str, ModelSpec] | None) -> tuple[float, float]:
        """The shared pool's busy threads besides model ``name``'s: (its neighbours with a window,
        each instance by the share of it they used; the shared threads of models outside
        ``specs``, whole: all of ``held_by_others`` where their specs are not known)."""
        neighbours = sum(_units(s) * min(1.0, windows[n].used) for n, s in specs.items()
                         if s.isolation == "shared" and n != name and n in windows)
        outside = (held_by_others if other_specs is None else
                   sum(_units(s) for s in other_specs.values() if s.isolation == "shared"))
        return neighbours, outside

    def _joined(self, name: str, own: int, windows: Mapping[str, Window], specs: Mapping[str, ModelSpec],
                held_by_others: int, pool_cpus: int | None, other_specs: Mapping[str, ModelSpec] | None
                ) -> tuple[ModelSpec, str] | str:
        """Model ``name``'s spec in the shared pool with its ``own`` cores given to it and one
        instance more, and its pool neighbours in words; or why it may not join (neighbours
        without latency to spare, or the pool's busy threads past ``oversubscribe`` x its CPUs
        once the cores join it)."""
        roomy = self._roomy_neighbours(name, windows, specs)
        if roomy is None:
            return "no neighbour in the pool has latency to spare to join"
        neighbours, outside = self._pool_threads(name, windows, specs, held_by_others, other_specs)
        busy = neighbours + outside + own + 1
        most = self.oversubscribe * (pool_cpus + own if pool_cpus is not None else self.capacity)
        if busy > most:
            return f"joining the pool would make {busy:.1f} busy threads there, past {most:g}"
        try:
            spec = dataclasses.replace(specs[name], isolation="shared", cores=None, instances=own + 1, threads=1)
        except QuotaError as e:  # a setting only a model with cores of its own may have
            return f"it cannot serve from the pool ({e})"
        return spec, roomy

    def _underused(self, name: str, windows: Mapping[str, Window], specs: Mapping[str, ModelSpec], now_s: float,
                   taken: frozenset[str] | set[str] = frozenset()) -> list[tuple[float, str]]:
        """(used, model) of the models with a count of cores of their own, other than ``name``
        and those in ``taken`` (moved this window already), that use less than UNDERUSED of them
        with latency to spare (see :meth:`_roomy`) for ``confirm`` windows, out of their dwell
        and not given a core back lately, and that keep their load under ``target`` on the
        cores left (or serve from the pool, given their last); least used first."""
        out = []
        for d, s in specs.items():
            cores = _core_count(s)
            if d == name or d in taken or cores is None or not _movable(s) or d not in windows or d not in self.slos:
                continue
            u = windows[d].used
            if u >= UNDERUSED or not self._may_give(d, now_s):
                continue
            if cores > 1 and u * cores / (cores - 1) >= self.target:
                continue  # the cores left would run it past the target utilisation
            out.append((u, d))
        return sorted(out)

    def _spare(self, name: str, windows: Mapping[str, Window], specs: Mapping[str, ModelSpec], now_s: float,
               taken: frozenset[str] | set[str] = frozenset()) -> list[tuple[float, str]]:
        """(CPUs used, model) of the shared-pool models other than ``name`` and those in
        ``taken`` with more than one instance of one thread whose threads' CPU time in the window keeps one
        instance fewer under ``target``, with latency to spare (see :meth:`_roomy`) for
        ``confirm`` windows, out of their dwell and not given an instance back lately; least
        used first. Their calls' wall time, stretched while their threads wait for the pool's
        CPUs, says nothing of this."""
        out = []
        for d, s in specs.items():
            cpus = windows[d].pool_cpus if d in windows else None
            if (d == name or d in taken or d not in self.slos or cpus is None or s.isolation != "shared"
                    or not _movable(s) or s.instances < 2 or (s.threads or 1) != 1):
                continue
            if cpus / (s.instances - 1) >= self.target or not self._may_give(d, now_s):
                continue
            out.append((cpus, d))
        return sorted(out)

    def _may_give(self, donor: str, now_s: float) -> bool:
        """Whether model ``donor`` may give capacity it does not need: latency to spare for
        ``confirm`` windows in a row, out of its dwell, and not given some back lately."""
        return (self._roomy_streak.get(donor, 0) >= self.confirm and self._dwelled(donor, now_s)
                and self._open(donor, "shrink", now_s))

    def _roomy(self, name: str, w: Window) -> bool:
        """Whether model ``name``'s latency has room to spare in window ``w``: its objective's
        latency under half its SLO, nothing refused, nothing stalled, no call running half its SLO."""
        slo = self.slos[name]
        return w.objective_ms < 0.5 * slo and w.refused == 0 and not w.stuck and w.oldest_call_ms < 0.5 * slo

    def _roomy_neighbours(self, name: str, windows: Mapping[str, Window], specs: Mapping[str, ModelSpec]
                          ) -> str | None:
        """The other shared-pool models with an objective, in words, when every one of them has
        latency to spare (:meth:`_roomy`); None when one has not, or there is none."""
        parts = []
        for n, s in sorted(specs.items()):
            if n == name or s.isolation != "shared" or n not in windows or n not in self.slos:
                continue
            if not self._roomy(n, windows[n]):
                return None
            parts.append(f"{n} p{self.percentiles.get(n, 99.0):g} {windows[n].objective_ms:.1f} of {self.slos[n]:g} ms")
        return ", ".join(parts) or None

    def _hold(self, moves: list[Move], now_s: float, name: str, reason: str) -> list[Move]:
        """Records that ``name``, at risk this window, got no move and why
        (:attr:`held`); returns ``moves`` (the other models' moves of the window)."""
        count = self.held[name][1] + 1 if name in self.held else 1
        self.held[name] = (round(now_s, 3), count, reason)
        if name in self.counts:  # (decide() alone, in tests, may name models without an SLO)
            self.counts[name]["held"] += 1
        return moves

    def longest_miss(self, since_s: float = 0.0) -> tuple[float, str | None]:
        """The longest run of consecutive windows ending after ``since_s`` (seconds since the
        start) in which some model's p99 exceeded its SLO, in seconds, and the model that
        missed longest in it; (0.0, None) when none missed."""
        best: tuple[float, str | None] = (0.0, None)
        run_s = 0.0
        missed: dict[str, float] = {}
        for at_s, windows in self.history:
            if at_s <= since_s:
                continue
            missing = {n: w.seconds for n, w in windows.items()
                       if n in self.slos and w.completed > 0 and w.objective_ms > self.slos[n]}
            if not missing:
                run_s, missed = 0.0, {}
                continue
            run_s += max(w.seconds for w in windows.values())
            for n, secs in missing.items():
                missed[n] = missed.get(n, 0.0) + secs
            if run_s > best[0]:
                best = (run_s, max(missed, key=lambda n: missed[n]))
        return best

    def elapsed_s(self) -> float:
        """Seconds since the controller was made (the clock of ``Move.at_s``)."""
        return self.clock() - self._t0

    def _fits(self, specs: Mapping[str, ModelSpec]) -> bool:
        """Whether the runtime's models, with ``specs`` replacing theirs, can be placed."""
        from .placement import plan

        quotas = {n: self.rt.spec(n).quota for n in self.rt.models}
        quotas.update({n: s.quota for n, s in specs.items()})
        try:
            plan(list(quotas.values()), self.rt.topology)
        except (ApportionError, ValueError):
            return False
        return True

    def _cpu_s(self) -> tuple[dict[str, float], float | None]:
        """One reading of CPU seconds so far, from one :meth:`Runtime.cpu_seconds` (a /proc read
        per thread): each model with an objective's (a worker process's time is not counted),
        and this process's less those of its models with cores of their own, whose threads run
        outside the shared pool: what it ran in the pool, at most (its other threads may run
        anywhere). ({}, None) where /proc cannot be read; the second None where a model runs in
        worker processes (their time is not this process's)."""
        if not THREAD_TIMES:
            return {}, None
        cpu = self.rt.cpu_seconds()
        models = {n: secs for n, secs in cpu.items() if n in self.slos}
        specs = {n: self.rt.spec(n) for n in self.rt.models}
        if any(s.process for s in specs.values()):
            return models, None
        return models, time.process_time() - sum(cpu.get(n, 0.0) for n, s in specs.items()
                                                 if s.isolation == "exclusive")

    def _pool_busy_s(self) -> tuple[frozenset[int], float | None]:
        """The shared pool's CPUs now and their busy seconds so far (/proc/stat; None where
        unreadable). Only they count: a shared model's instances cannot run on the cores of
        exclusive models, however idle those sit."""
        pool = frozenset(self.rt.plan().shared_pool)
        return pool, cpus_busy_s(pool)

    def _saves(self, name: str, spec: ModelSpec, batch: int, bigger: int) -> float | None:
        """The share of a request's instance time a batch of ``bigger`` saves against ``batch``
        by model ``name``'s cost model on its threads (None: no cost model for it, or one fitted
        without two batch sizes, which says nothing about batching)."""
        cost = self.costs.get(name)
        if cost is None or not cost.batchable:
            return None
        t = spec.threads or 1
        return 1.0 - cost.core_ms(t, bigger) / cost.core_ms(t, batch)

    def _dwelled(self, name: str, now_s: float) -> bool:
        last = self._last_move.get(name)
        return last is None or now_s - last >= self.dwell_s

    def _open(self, name: str, kind: str, now_s: float) -> bool:
        """Whether a move of ``kind`` for ``name`` may be tried (not undone within ``tabu_s``)."""
        return now_s >= self._tabu.get((name, kind), -math.inf)

    def _move(self, now_s: float, name: str, spec: ModelSpec, change: str, reason: str) -> Move:
        self._last_move[name] = now_s
        self._risk_streak[name] = 0
        self._idle_streak[name] = 0
        self._roomy_streak[name] = 0
        return Move(round(now_s, 3), name, change, reason, spec)

    # -- running ---------------------------------------------------------------------------------
    def step(self) -> list[Move]:
        """Reads one window (since the previous step), decides and applies the moves. Returns
        the moves made. The first call only takes the starting reading."""
        now = self.clock()
        stats = self.rt.stats()
        last, last_at = self._last, self._last_at
        self._last, self._last_at = stats, now
        if last is None:
            self._pool, self._busy_s = self._pool_busy_s()
            self._last_cpu, self._own = self._cpu_s()
            return []
        # A model removed and added again since the last reading has no window yet, and starts
        # afresh: what the controller kept for the one before it (its dwell, tabus, the bound
        # it lowered, batch sizes tried) is not about this one.
        for n in self.slos:
            if n in stats and not (n in last and same_model(last[n], stats[n])):
                self._forget(n)
        windows = {n: Window.between(last[n], stats[n], now - last_at, self.slos[n], self.percentiles[n])
                   for n in self.slos if n in stats and n in last and same_model(last[n], stats[n])}
        specs = {n: self.rt.spec(n) for n in windows}
        (cpu, own), last_cpu = self._cpu_s(), self._last_cpu
        self._last_cpu = cpu
        for n, w in windows.items():
            if n in cpu and n in last_cpu:
                # A model with CPUs of its own: how much of them it used (Window.used); one on
                # the shared pool: its share of the pool (a process model's time is not read).
                used = max(0.0, cpu[n] - last_cpu[n])
                if specs[n].isolation == "exclusive":
                    windows[n] = dataclasses.replace(w, cpu_s=used)
                elif specs[n].isolation == "shared":
                    windows[n] = dataclasses.replace(w, pool_cpu_s=used)
        self.windows = windows
        self.history.append((now - self._t0, windows))
        self.lift_stale()
        # The pool's idle CPUs over this window, read every window (a trial's too: else the
        # first window after it divided the whole trial's busy time by one window's length).
        pool, busy_s = self._pool_busy_s()
        self.idle_cpus = self.outside_cpus = None
        if busy_s is not None and self._busy_s is not None and pool == self._pool and now > last_at:
            self.idle_cpus = max(0.0, len(pool) - (busy_s - self._busy_s) / (now - last_at))
            if own is not None and self._own is not None:
                self.outside_cpus = max(0.0, (busy_s - self._busy_s - (own - self._own)) / (now - last_at))
        self._pool, self._busy_s, self._own = pool, busy_s, own
        if self._trial is not None:
            undo = self.verdict(windows, now - self._t0)
            if undo is None:
                return []  # still judging the last move: nothing else moves meanwhile
            if undo:
                return undo if self._apply(undo, now, f"undoing {[u.change for u in undo]}: ") else []
        other_specs = {n: self.rt.spec(n) for n in self.rt.models if n not in windows}
        others = sum(_units(s) for s in other_specs.values())
        # What decide() notes of the moves it proposes (a dwell, a swap given, a take-back's
        # hold) stands only for moves that are made: otherwise the state before it comes back.
        before_decide = (dict(self._last_move), dict(self._gave), dict(self._tabu), dict(self._tabu_load))
        moves = self.decide(windows, specs, now - self._t0, self._fits, self.idle_cpus,
                            {n: self.rt.queue_size(n) for n in windows}, held_by_others=others,
                            pool_cpus=len(pool) if pool else None, other_specs=other_specs,
                            load_held=self.load_held(), outside_cpus=self.outside_cpus)
        if not moves:
            return []
        if self._stop.is_set():  # stopped while it decided: nothing starts now
            self._last_move, self._gave, self._tabu, self._tabu_load = before_decide
            return []
        if not self._apply(moves, now):
            # Nothing moved: no dwell starts, and the same kind of move for the same models is
            # not tried again for tabu_s (it would fail again, and hold the others every window).
            self._last_move, self._gave, self._tabu, self._tabu_load = before_decide
            self._close([(m, specs[m.model]) for m in moves], now - self._t0 + self.tabu_s)
            return []
        self.trial(moves, specs, [w for _, w in list(self.history)[-self.judge:]])
        return moves

    def load_held(self) -> bool:
        """Whether the last window of :attr:`history` kept the load of the ones before it among
        the ``judge`` windows a move made now is judged against (see :meth:`trial`; with
        ``judge`` 1, of the window before it: a load that moved within this window shows
        there): no model's arrival rate in it moved by more than MIX_MOVED from theirs. True
        with no window before it (nothing says the load moved)."""
        last = [w for _, w in list(self.history)[-max(self.judge, 2):]]
        return len(last) < 2 or not _mix_moved(last[:-1], last[-1:])

    def trial(self, moves: list[Move], specs: Mapping[str, ModelSpec],
              history: list[Mapping[str, Window]]) -> None:
        """Opens the trial of ``moves`` (just applied; ``specs``: every model's spec before them),
        judged against the last ``judge`` windows of ``history`` (oldest first)."""
        self._trial = _Trial(moves=[(m, specs[m.model]) for m in moves], before=list(history[-self.judge:]))

    def verdict(self, windows: Mapping[str, Window], now_s: float) -> list[Move] | None:
        """Adds a window to the open trial (call once per window while one is open): None while
        the trial goes on; then the trial closes and this returns the moves that undo it (the
        moved models' old specs; each kind of move undone is not tried for that model for
        ``tabu_s``, or until the load moves: :meth:`lift_stale`), or an empty list when it stays:
        it served as large a share of the arrivals as before it (within ``tolerance``, or within
        how far that share moved from window to window before it, counting windows with
        SPREAD_MIN_ARRIVALS arrivals or more), or the load itself moved (some model's arrival
        rate by more than MIX_MOVED), which says nothing about the move. Pure, like
        :meth:`decide`: applying the undo is the caller's."""
        trial = self._trial
        if trial is None:
            return []
        trial.after.append(windows)
        if len(trial.after) < self.judge:
            return None
        self._trial = None
        broke = _failing_since(trial.before, trial.after, {m.model for m, _ in trial.moves})
        # A moved model that works off its backlog serves its old requests late, however much
        # faster: the move is judged by the other models (did it take from them?).
        drained = _drained(trial)
        judged_before, judged_after = _judged(trial, drained)
        before, after = _served(judged_before), _served(judged_after)
        # How far the share moved from window to window before the move, without it: a fall
        # within that spread cannot tell the move's doing from the host's (other processes'
        # bursts) or from a load still settling (a queue filling after a shift).
        shares = [x for ws in judged_before if sum(w.arrivals for w in ws.values()) >= SPREAD_MIN_ARRIVALS
                  and (x := _served([ws])) is not None]
        spread = max(shares) - min(shares) if shares else 0.0
        if broke is None and (before is None or after is None or after >= before * (1 - self.tolerance)
                              or before - after <= spread or _mix_moved(trial.before, trial.after)):
            return []
        # A moved model failing its requests is undone whatever the load did: fast failures
        # raise a closed loop's arrival rate, which read as the load having moved.
        why = broke or (f"served {after:.1%} of arrivals within SLO after it against {before:.1%} before"
                        + (f" (leaving out {', '.join(map(repr, sorted(drained)))} while it worked off a "
                           "backlog)" if drained else ""))
        # An idle model's admission restored in the same step is not what is judged: it stays.
        undone = [(m, old) for m, old in trial.moves if m.reason != RESTORED]
        # A hold is lifted when the load moves (lift_stale), but not one for failures: failing
        # fast moved a closed loop's rate, which the undo moves back.
        self._close(undone, now_s + self.tabu_s, load=trial.after if broke is None else None)
        for m, _ in undone:
            if m.reason.startswith(SPARE):
                self._gave.pop(m.model, None)  # the swap is gone: nothing given to take back
        return [dataclasses.replace(self._move(now_s, m.model, old, f"undone: {m.change}", why), undo=True)
                for m, old in undone]

    def _close(self, moves: list[tuple[Move, ModelSpec]], until_s: float,
               load: list[Mapping[str, Window]] | None = None) -> None:
        """Holds each kind of move in ``moves`` (each with its model's spec before it), undone or
        refused, for its model until ``until_s``; a swap's receivers' swaps too. ``load``: the
        windows of the verdict that undid them (see :meth:`lift_stale`); None for a refusal,
        which no load lifts."""
        keys = [(m.model, _kind(old, m.spec)) for m, old in moves]
        keys += [(name, "swap") for name in _swap_receivers([m for m, _ in moves])]
        for key in keys:
            self._tabu[key] = until_s
            if load is None:
                self._tabu_load.pop(key, None)
            else:
                self._tabu_load[key] = list(load)

    def lift_stale(self) -> list[tuple[str, str]]:
        """Lifts each hold a trial's verdict set (a move undone: see :meth:`verdict`) whose load
        has moved since: some model's arrival rate over the last ``judge`` windows of
        :attr:`history` differs by more than MIX_MOVED, and by more than LIFT_SIGMAS standard
        deviations of Poisson arrivals, from its rate over the windows that judged the move.
        That verdict was about another load, as a trial across a shift says nothing about its
        move: after the mix shifts, a move undone before it is tried again at once (a hold kept
        would keep the model's capacity where the old mix wanted it for ``tabu_s``). A hold set
        by a refused move stays (the runtime would refuse it again), and so does one set by a
        verdict on failures (the undo itself moves a closed loop's rate back). Returns the
        (model, kind) holds lifted; :meth:`step` calls it every window."""
        recent = list(self.history)[-self.judge:]
        now = [w for _, w in recent]
        lifted = []
        for key, load in list(self._tabu_load.items()):
            if key not in self._tabu or (recent and self._tabu[key] <= recent[-1][0]):
                del self._tabu_load[key]  # the hold is over, or was dropped with its model
            elif now and _mix_moved(load, now, LIFT_SIGMAS):
                del self._tabu[key], self._tabu_load[key]
                lifted.append(key)
        return lifted

    def _apply(self, moves: list[Move], now: float, failing: str = "") -> bool:
        """Applies ``moves`` to the runtime and records them; a failure is kept in ``errors``
        (prefixed with ``failing``) and nothing is recorded. Returns whether they applied."""
        try:
            self.rt.apply([m.spec for m in moves])
        except (ApportionError, ValueError, RuntimeError) as e:
            what = failing or "; ".join(f"{m.model}: {m.change}" for m in moves) + ": "
            self._error(f"{now - self._t0:.1f}s: {what}{type(e).__name__}: {e}")
            return False
        self._record(moves)
        return True

    def _record(self, moves: list[Move]) -> None:
        self.moves.extend(moves)
        del self.moves[:-MOVES_KEPT]
        for m in moves:
            counts = self.counts.setdefault(m.model, {"moves": 0, "undone": 0, "held": 0})
            counts["moves"] += 1
            counts["undone"] += m.undo
        # The window after a move mixes old and new: start the next one from here.
        self._last, self._last_at = self.rt.stats(), self.clock()
        self._pool, self._busy_s = self._pool_busy_s()
        self._last_cpu, self._own = self._cpu_s()  # the CPU time too, or the next window's would span the move
        if self._log is not None:
            for m in moves:
                try:
                    self._log(m)
                except Exception as e:  # noqa: BLE001 - the caller's logger: the moves stand, the failure is kept
                    self._error(f"{m.at_s:.1f}s: the log callback raised on {m.model!r}'s move: "
                                       f"{type(e).__name__}: {e}")

    def _error(self, text: str) -> None:
        self.error_count += 1
        self.errors.append(text)
        del self.errors[:-ERRORS_KEPT]
        if self._on_error is not None:
            try:
                self._on_error(text)
            except Exception:  # noqa: BLE001, S110 - the caller's reporter: the error is kept in errors
                pass

    def _forget(self, name: str) -> None:
        """Drops what the controller kept about model ``name`` (a new model by that name)."""
        for kept in (self._last_move, self._full_queue, self._batch_tried, self.held, self._gave):
            kept.pop(name, None)
        for donor in [d for d, (receiver, _) in self._gave.items() if receiver == name]:
            del self._gave[donor]  # given to the model before it
        self._risk_streak[name] = self._idle_streak[name] = self._roomy_streak[name] = 0
        self._stalled_s.pop(name, None)
        for key in [k for k in self._tabu if k[0] == name]:
            del self._tabu[key]
        for key in [k for k in self._tabu_load if k[0] == name]:
            del self._tabu_load[key]
        if self._trial is not None and any(m.model == name for m, _ in self._trial.moves):
            self._trial = None  # its old specs are another model's

    def start(self) -> Controller:
        """Runs ``step()`` every ``window_s`` on a daemon thread until ``stop()`` (again after a
        ``stop()``, from a fresh reading: the first window does not span the pause, and a move
        still being judged stays as it is; a second ``start()`` while it runs does nothing).
        Raises RuntimeClosed for a closed runtime, ApportionError for one not started yet."""
        if self.rt.closed:
            raise RuntimeClosed("Controller.start(): the runtime is closed")
        if not self.rt.started:
            # Its windows would read no model's work, and its moves re-plan models not built.
            raise ApportionError("Controller.start(): the runtime is not started; call rt.start() first")
        other = getattr(self.rt, "_controller", None)
        if other is not None and other is not self and other.stats()["running"]:
            # Both would read the same windows and make the same move, each on its own.
            raise ApportionError("Controller.start(): another controller already runs on this runtime; stop it first")
        if self._thread is None or not self._thread.is_alive():
            self.rt._controller = self
            self._last, self._trial = None, None
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="apportion-controller", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            if self.rt.closed:
                return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed window is reported, the next one tried
                if self.rt.closed:
                    return
                self._error(f"{self.elapsed_s():.1f}s: {type(e).__name__}: {e}")
            if self._stop.wait(self.window_s):
                return

    def stop(self, wait: bool = True) -> None:
        """Stops the thread (a step in progress finishes first; from the controller's own
        thread, such as a ``log`` callback, it stops after that step). With ``wait=False`` it
        returns at once: a move in progress (new instances starting) goes on, and no other
        starts after it (a server that must drain now cannot wait for a factory)."""
        self._stop.set()
        thread = self._thread  # once: stop() may be called from two threads at a time
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()
            if self._thread is thread:
                self._thread = None

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """The controller's state: running or not, the last windows, the streaks, every move
        with its reason (the last MOVES_KEPT), the models held at risk without a move and why
        (:attr:`held`), the counts per model (:attr:`counts`), and the errors of moves that
        failed (the last ERRORS_KEPT, and ``error_count`` of all). Safe to call from any thread
        while the controller runs (``/metrics`` does)."""
        # Read while the controller's thread may change each of these: every container is
        # copied at once (one C call under the GIL) before it is iterated.
        thread, trial = self._thread, self._trial
        return {
            "running": thread is not None and thread.is_alive(),
            "windows": dict(self.windows),
            "idle_cpus": self.idle_cpus,
            "outside_cpus": self.outside_cpus,
            "at_risk_streak": dict(self._risk_streak),
            "idle_streak": dict(self._idle_streak),
            "moves": list(self.moves),
            "judging": [m.change for m, _ in list(trial.moves)] if trial is not None else [],
            "on_trial": sorted({m.model for m, _ in list(trial.moves)}) if trial is not None else [],
            "tabu": {f"{n} {k}": until for (n, k), until in dict(self._tabu).items()},
            "held": dict(self.held),
            "counts": {n: dict(c) for n, c in dict(self.counts).items()},
            "errors": list(self.errors),
            "error_count": self.error_count,
        }

