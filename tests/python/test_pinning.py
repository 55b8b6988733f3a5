"""Pinning on this machine: every thread a model creates stays on its planned CPUs, and each
instance runs its framework with its own intra-op thread count.

These tests read the kernel's view (/proc/self/task/*/status) rather than trusting the plan.
They need two usable CPUs; on a machine with one they skip with that reason.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

import apportion as ap
from apportion.adapters import check_confinement, model_threads, worker_name

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"

# Big enough that torch and ONNX Runtime split the product across their intra-op threads (a
# tiny one runs inline on the calling thread and never starts a pool, which would make the
# confinement checks below vacuous).
N = 512
CALLS = 4

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs to give two models one each"
)


def _two_exclusive(rt: ap.Runtime) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The CPUs the plan gave models 'one' and 'two' (one core each, disjoint)."""
    p = rt.plan()
    one, two = p["one"].instances[0].cpus, p["two"].instances[0].cpus
    assert len(one) == len(two) == 1 and not set(one) & set(two)
    return one, two


def _assert_confined(model: str, cpus: tuple[int, ...], threads: int) -> None:
    found = model_threads(model)
    # The worker plus threads-1 pool threads: the pool was created by the worker (it carries
    # the worker's name) and no pool of another size leaked in.
    assert len(found) >= threads, (model, found)
    assert all(t.cpus == cpus for t in found), (model, cpus, found)
    assert check_confinement(model, cpus) == []


# -- torch -----------------------------------------------------------------------------------

def test_torch_thread_count_is_per_thread_once_initialised() -> None:
    """DESIGN.md fact: in a thread, get_num_threads() (initialise) then set_num_threads(n) gives
    that thread n, whatever other threads set afterwards; without the initialising call the
    thread later picks up whatever value was set last, by anyone."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    seen: dict[str, int] = {}
    # Each step runs in order across the two threads, so "afterwards" is well defined.
    first_set, second_set = threading.Event(), threading.Event()

    def worker(name: str, n: int, initialise: bool, wait_for: threading.Event | None,
               then: threading.Event) -> None:
        if wait_for is not None:
            assert wait_for.wait(30)
        if initialise:
            torch.get_num_threads()
        torch.set_num_threads(n)
        then.set()
        assert second_set.wait(30)
        x = torch.randn(N, N)
        (x @ x).sum()  # runs a parallel region with this thread's count
        seen[name] = torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        for initialise in (True, False):
            first_set.clear()
            second_set.clear()
            a = threading.Thread(target=worker, args=("a", 1, initialise, None, first_set))
            b = threading.Thread(target=worker, args=("b", 3, initialise, first_set, second_set))
            a.start()
            b.start()
            a.join(60)
            b.join(60)
            assert not a.is_alive() and not b.is_alive()
            if initialise:
                assert seen == {"a": 1, "b": 3}
            else:
                # 'a' set 1 first, 'b' set 3 later: uninitialised, 'a' reads back b's value.
                assert seen == {"a": 3, "b": 3}
    finally:
        torch.set_num_threads(before)


def _probe_factory(torch: Any) -> Any:
    class Probe(torch.nn.Module):
        """A matmul + relu that also reports the intra-op thread count its call ran with."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(N, N))

        def forward(self, x: Any) -> tuple[Any, int]:
            return torch.relu(x @ self.weight), torch.get_num_threads()

    return lambda ctx: Probe()


@needs_two_cpus
def test_two_torch_models_stay_on_their_cpus_with_their_thread_counts() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    factory = _probe_factory(torch)
    rt = ap.Runtime()
    try:
        rt.add_model("one", factory=factory, cores=1, isolation="exclusive", threads=1)
        # Two threads on one core: more than the core, so it needs the explicit consent.
        rt.add_model("two", factory=factory, cores=1, isolation="exclusive", threads=2,
                     oversubscribe=True)
        one, two = _two_exclusive(rt)
        assert rt.plan()["two"].instances[0].threads == 2
        rt.start()
        x = torch.randn(N, N)
        counts: dict[str, list[int]] = {"one": [], "two": []}
        for _ in range(CALLS):
            for name in counts:
                y, n = rt.submit(name, x).result(timeout=60)
                assert y.shape == (N, N)
                counts[name].append(n)
        assert counts == {"one": [1] * CALLS, "two": [2] * CALLS}

        _assert_confined("one", one, 1)
        _assert_confined("two", two, 2)
        # The 2-thread model really started an OpenMP pool (else confinement proves nothing);
        # the 1-thread model runs its regions inline on the worker.
        assert len(model_threads("two")) > 1
        assert len(model_threads("one")) == 1
        # Pinning is per worker: the caller's thread keeps the whole process mask.
        assert os.sched_getaffinity(0) >= set(one) | set(two)
    finally:
        rt.close(drain=False)


# -- ONNX Runtime ----------------------------------------------------------------------------

def _onnx_matmul_relu(np: Any) -> bytes:
    """A MatMul + Relu model built in code: x[?, N] @ W[N, N] -> relu."""
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (needed to build the model)")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((N, N)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "matmul_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by any onnxruntime from 1.16 on
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@needs_two_cpus
def test_two_onnx_models_stay_on_their_cpus_with_their_thread_counts() -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    from apportion.adapters.onnxruntime import onnx_model

    data = _onnx_matmul_relu(np)
    # The first session of a process may start a process-wide helper thread; create it here,
    # outside the models, so their thread counts are theirs alone.
    ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def factory(ctx: ap.InstanceContext) -> Any:
        model = onnx_model(data)(ctx)
        opts = model.session.get_session_options()
        return lambda x: (model(x), opts.intra_op_num_threads,
                          opts.get_session_config_entry("session.intra_op.allow_spinning"))

    rt = ap.Runtime()
    try:
        rt.add_model("one", factory=factory, cores=1, isolation="exclusive", threads=1)
        rt.add_model("two", factory=factory, cores=1, isolation="exclusive", threads=2,
                     oversubscribe=True)
        one, two = _two_exclusive(rt)
        rt.start()
        x = np.ones((N, N), np.float32)
        results: dict[str, list[Any]] = {"one": [], "two": []}
        for _ in range(CALLS):
            for name in results:
                results[name].append(rt.submit(name, x).result(timeout=60))
        for name, threads in (("one", 1), ("two", 2)):
            for y, intra, spin in results[name]:
                assert y.shape == (N, N)
                assert intra == threads
                assert spin == "1"  # exclusive cores: spinning steals from nobody
        np.testing.assert_allclose(results["one"][0][0], results["two"][0][0], rtol=1e-4, atol=1e-3)

        # ONNX Runtime's pool has intra_op_num_threads - 1 threads besides the caller.
        _assert_confined("one", one, 1)
        _assert_confined("two", two, 2)
        assert len(model_threads("one")) == 1
        assert len(model_threads("two")) == 2
    finally:
        rt.close(drain=False)


def test_onnx_session_on_shared_cores_does_not_spin() -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    from apportion.adapters.onnxruntime import onnx_model

    data = _onnx_matmul_relu(np)
    ctx = ap.InstanceContext(model="m", instance=0, instances=1, threads=1, cpus=(0,), isolation="shared")
    opts = onnx_model(data)(ctx).session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 1
    # An explicit choice wins over the isolation default.
    opts = onnx_model(data, spin=True)(ctx).session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    # A process model with cores of its own spins (its isolation reads "process"); one on the
    # shared pool does not.
    for own, want in ((True, "1"), (False, "0")):
        ctx = ap.InstanceContext(model="m", instance=0, instances=1, threads=1, cpus=(0,), isolation="process",
                                 own_cpus=own)
        opts = onnx_model(data)(ctx).session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == want


# -- refused pinning -------------------------------------------------------------------------

def _absent_cpu() -> int:
    """A CPU id present in the 128-CPU server fixture but not on this machine."""
    here = os.sched_getaffinity(0)
    for cpu in range(127, 1, -1):
        if cpu not in here and not os.path.exists(f"/sys/devices/system/cpu/cpu{cpu}"):
            return cpu
    pytest.skip("this machine has every CPU of the 128-CPU fixture")


def test_refused_pin_is_a_warning_and_the_model_still_serves() -> None:
    cpu = _absent_cpu()
    # Planning on the fixture's machine names a CPU this one lacks: pthread_setaffinity_np
    # refuses it (EINVAL), which must warn with the reason, not fail the model.
    rt = ap.Runtime(topology_root=str(FIXTURES / "server_2s128t"))
    try:
        rt.add_model("far", factory=lambda ctx: (lambda x: (x, os.sched_getaffinity(0), ctx.cpus)),
                     cores=str(cpu), isolation="exclusive")
        assert rt.plan()["far"].instances[0].cpus == (cpu,)
        with pytest.warns(ap.PinningWarning, match=rf"model 'far' instance 0: pin to CPUs {cpu} "
                          r"refused: Invalid argument \(errno 22\)") as record:
            rt.start()
        assert all(issubclass(w.category, ap.PinningWarning) for w in record)
        x, mask, planned = rt.submit("far", 7).result(timeout=30)
        # It serves, on the mask its worker inherited (this process's), and knows its plan.
        assert x == 7
        assert mask == os.sched_getaffinity(0)
        assert planned == (cpu,)
        assert model_threads("far") and all(t.cpus != (cpu,) for t in model_threads("far"))
    finally:
        rt.close(drain=False)


def test_pin_warning_raised_as_error_on_a_running_runtime_leaves_the_model_registered() -> None:
    """With warnings turned into errors, add_model raises the PinningWarning after the model
    started: the model is registered, serves, and is part of the plan (no half-registered
    state between the Python and native sides)."""
    import warnings

    cpu = _absent_cpu()
    rt = ap.Runtime(topology_root=str(FIXTURES / "server_2s128t"))
    try:
        rt.start()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ap.PinningWarning)
            with pytest.raises(ap.PinningWarning, match="model 'far' instance 0: pin to CPUs"):
                rt.add_model("far", model=lambda x: x + 1, cores=str(cpu), isolation="exclusive")
        assert rt.models == ["far"]
        assert rt.plan()["far"].instances[0].cpus == (cpu,)
        assert rt.submit("far", 1).result(timeout=30) == 2
    finally:
        rt.close(drain=False)


def test_torch_adapter_reports_threads_outside_their_cpus() -> None:
    """The torch adapter's runtime check: a model whose threads are not where the plan put
    them (here: its pin was refused) warns on its first call, naming the thread and CPUs."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    cpu = _absent_cpu()
    rt = ap.Runtime(topology_root=str(FIXTURES / "server_2s128t"))
    try:
        rt.add_model("stray", model=torch.nn.Identity(), cores=str(cpu), isolation="exclusive")
        with pytest.warns(ap.PinningWarning, match="pin to CPUs"):
            rt.start()
        # The warning is raised in the worker thread; warnings are errors in this suite, so it
        # reaches the caller as the call's exception (outside pytest it is a plain warning).
        with pytest.raises(ap.PinningWarning, match=rf"of model 'stray' may run on CPUs .* outside its set {cpu}"):
            rt.submit("stray", torch.ones(2)).result(timeout=30)
        # Checked once: later calls serve normally.
        assert torch.equal(rt.submit("stray", torch.ones(2)).result(timeout=30), torch.ones(2))
    finally:
        rt.close(drain=False)


# -- which threads belong to which model -----------------------------------------------------

def test_model_threads_tells_models_apart_by_their_worker_names() -> None:
    long = "a_model_with_a_long_name"
    assert worker_name("ab", 3) == "ap:ab:3"
    assert worker_name(long, 12) == "ap:a_model_w:12"  # cut to Linux's 15 bytes, index kept
    rt = ap.Runtime()
    try:
        # "a" is a prefix of "ab": a prefix match would give model "a" the workers of "ab".
        for name, instances in (("a", 1), ("ab", 2), (long, 1)):
            rt.add_model(name, model=lambda x: threading.get_native_id(), instances=instances)
        rt.start()
        served_by = {rt.submit(name, None).result(timeout=30) for name in ("a", "ab", long)}
        found = {name: model_threads(name) for name in ("a", "ab", long)}
        assert [t.name for t in found["a"]] == ["ap:a:0"]
        assert sorted(t.name for t in found["ab"]) == ["ap:ab:0", "ap:ab:1"]
        assert [t.name for t in found[long]] == ["ap:a_model_wi:0"]
        assert model_threads("nobody") == []
        assert [t.name for t in model_threads("ab", 1)] == ["ap:ab:1"]  # one instance's alone
        assert model_threads("ab", 2) == []
        # The threads that actually ran the calls are among those found.
        assert served_by <= {t.tid for ts in found.values() for t in ts}
    finally:
        rt.close(drain=False)


def test_a_worker_name_is_cut_between_characters() -> None:
    # Cut at byte 10, "😀😀😀" (4 bytes each) left half a character: ps, py-spy and a strict
    # decode showed garbage.
    assert worker_name("😀😀😀", 0) == "ap:😀😀:0"
    assert worker_name("é" * 10, 3) == "ap:ééééé:3"  # 2 bytes each: 10 fit
    rt = ap.Runtime()
    try:
        rt.add_model("😀😀😀", model=lambda x: threading.get_native_id())
        rt.start()
        tid = rt.call("😀😀😀", None)
        (worker,) = model_threads("😀😀😀")
        assert worker.tid == tid and worker.name == "ap:😀😀:0"
        with open(f"/proc/self/task/{tid}/comm", "rb") as fh:
            assert fh.read().strip().decode("utf-8") == "ap:😀😀:0"  # strict: valid UTF-8
        # Its deadline timer is named after it too (every model's was "ap:expiry").
        names = set()
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/comm", "rb") as fh:
                names.add(fh.read().strip())
        assert "ap:😀😀:t".encode() in names and b"ap:expiry" not in names
    finally:
        rt.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs: one for each instance")
def test_torch_instances_on_cores_of_their_own_each_check_only_their_own_threads() -> None:
    # Each instance's first call checks where its threads may run. Checked against every
    # instance's threads, instance 0 found instance 1's worker outside its CPU and warned
    # (warnings are errors in this suite: the call itself failed).
    torch = pytest.importorskip("torch", reason="torch is not installed")
    rt = ap.Runtime()
    try:
        rt.add_model("pair", lambda ctx: torch.nn.Identity(), isolation="exclusive", cores=2, instances=2, threads=1)
        rt.start()
        cpus = [i.cpus for i in rt.plan()["pair"].instances]
        assert len(cpus) == 2 and not set(cpus[0]) & set(cpus[1])
        futures = [rt.submit("pair", torch.ones(2)) for _ in range(200)]
        assert all(torch.equal(f.result(timeout=30), torch.ones(2)) for f in futures)
        assert rt.stats()["pair"].completed == 200
        served = {t.name for t in model_threads("pair")}
        assert served == {"ap:pair:0", "ap:pair:1"}
        for i, own in enumerate(cpus):
            assert check_confinement("pair", own, i) == []
        assert len(check_confinement("pair", cpus[0])) == 1  # the model as a whole: instance 1 is elsewhere
    finally:
        rt.close(drain=False)


@needs_two_cpus
def test_a_torch_instance_moved_live_does_not_check_the_one_it_replaces() -> None:
    # A live move keeps instance numbers: the new instance 0 warms up on its new CPU while the
    # old instance 0 still serves on its old one, under the same thread name. The new one's
    # check took the old one's threads for its own and warned that they ran outside its set
    # (warnings are errors in this suite: the warm-up failed, and with it the move).
    torch = pytest.importorskip("torch", reason="torch is not installed")
    first, second = sorted(os.sched_getaffinity(0))[:2]
    stray_on: list[int] = []  # given a CPU: the factory starts a thread of its own there
    done = threading.Event()

    def factory(ctx: ap.InstanceContext) -> Any:
        if stray_on:
            placed = threading.Event()

            def stray() -> None:
                # Named as the instance's worker (as a thread it starts is), on a CPU of its choosing.
                with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as fh:
                    fh.write(worker_name(ctx.model, ctx.instance))
                os.sched_setaffinity(0, {stray_on[0]})
                placed.set()
                done.wait(60)

            threading.Thread(target=stray, daemon=True).start()
            assert placed.wait(30)
        return torch.nn.Identity()

    with ap.Runtime() as rt:
        rt.add_model("moved", factory, cores=str(first), isolation="exclusive", threads=1, warmup=[torch.ones(2)])
        rt.start()
        assert torch.equal(rt.submit("moved", torch.ones(2)).result(timeout=30), torch.ones(2))
        [old] = model_threads("moved", 0)
        assert old.cpus == (first,)
        # Checked against the second CPU, the instance is outside it, unless its thread is excluded.
        assert len(check_confinement("moved", (second,), 0)) == 1
        assert check_confinement("moved", (second,), 0, exclude=[old.tid]) == []
        assert rt.apply(ap.ModelSpec("moved", factory=factory, cores=str(second),
                                     isolation="exclusive", threads=1, warmup=[torch.ones(2)])) == ["moved"]
        assert torch.equal(rt.submit("moved", torch.ones(2)).result(timeout=30), torch.ones(2))
        assert rt.plan()["moved"].instances[0].cpus == (second,)
        # The new instance's threads are all on the second CPU.
        new = [t for t in model_threads("moved", 0) if t.tid != old.tid]
        assert new and all(t.cpus == (second,) for t in new)
        # Still checked after a move: a thread the factory of the next move starts, outside the
        # new instance's CPU, is the new instance's and warns (the move fails; the old serves).
        stray_on.append(second)
        try:
            with pytest.raises(ap.PinningWarning, match=rf"model 'moved' may run on CPUs {second} outside its set {first}"):
                rt.apply(ap.ModelSpec("moved", factory=factory, cores=str(first), isolation="exclusive", threads=1,
                                      warmup=[torch.ones(2)]))
        finally:
            done.set()
        assert rt.plan()["moved"].instances[0].cpus == (second,)
        assert torch.equal(rt.submit("moved", torch.ones(2)).result(timeout=30), torch.ones(2))


# -- torch thread quotas whatever the factory returns ------------------------------------------------

HERE = Path(__file__).resolve().parent


def _cpu_ns(pid: int) -> dict[int, tuple[str, int]]:
    """Per thread of process ``pid``: its name and the CPU time it has used (ns; schedstat,
    else the tick counts of stat)."""
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/comm") as fh:
                name = fh.read().strip()
            try:
                with open(f"{base}/{tid}/schedstat") as fh:
                    ns = int(fh.read().split()[0])
            except FileNotFoundError:
                with open(f"{base}/{tid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                ns = (int(fields[11]) + int(fields[12])) * 10**9 // os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError):  # exited while we looked
            continue
        out[int(tid)] = (name, ns)
    return out


def _threads_that_ran(pid: int, name: str | None, call: Any) -> tuple[Any, int]:
    """``call()``'s result and how many threads of ``pid`` (named ``name``, if given) did its
    work: used at least 5% of the CPU time all of them used while it ran. (A thread of the
    process that woke for a moment meanwhile, which a loaded machine makes likelier by
    stretching the call, ran no part of it.)"""
    before = _cpu_ns(pid)
    result = call()
    after = _cpu_ns(pid)
    used = {tid: ns - before.get(tid, (n, 0))[1] for tid, (n, ns) in after.items() if name is None or n == name}
    total = sum(max(ns, 0) for ns in used.values())
    return result, sum(1 for ns in used.values() if ns > 0 and ns >= 0.05 * total)


# (threads, cores, isolation): one CPU, two CPUs, and the planner's choice on each.
QUOTAS = [(1, 1, "exclusive"), (2, 2, "exclusive"), (None, 1, "exclusive"), (None, None, "shared")]


@needs_two_cpus
@pytest.mark.parametrize("isolation_kind", ["thread", "process"])
@pytest.mark.parametrize(("threads", "cores", "isolation"), QUOTAS)
def test_a_function_around_a_torch_model_runs_on_its_planned_threads(
        threads: int | None, cores: int | None, isolation: str, isolation_kind: str) -> None:
    """The factory returns a closure, not a module: torch still reads the instance's planned
    ``threads`` inside its calls (None: what the plan shows, not torch's process-wide
    default), and the calls run on no more threads than the instance has CPUs."""
    pytest.importorskip("torch", reason="torch is not installed")
    import sys

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # process children import process_models by path
    kw: dict[str, Any] = {"threads": threads, "cores": cores}
    if isolation_kind == "process":
        kw["isolation"] = "process"
        if cores is None:
            del kw["cores"]
    else:
        kw["isolation"] = isolation
    with ap.Runtime() as rt:
        rt.add_model("tc", factory="process_models:torch_closure", **kw)
        rt.start()
        inst = rt.plan()["tc"].instances[0]
        planned = inst.threads
        if threads is not None:
            assert planned == threads
        info = rt.submit("tc", ("info",)).result(timeout=60)
        assert info["threads"] == planned, (info, planned)
        if isolation_kind == "process":
            pid, name = info["pid"], None  # every thread of the worker process
        else:
            pid, name = os.getpid(), worker_name("tc", 0)  # the worker and the threads it made
        seen, ran = _threads_that_ran(pid, name, lambda: rt.submit("tc", ("heavy", 60)).result(timeout=120))
        assert seen == planned
        assert 1 <= ran <= len(inst.cpus), (ran, inst.cpus, planned)


def test_a_worker_name_cut_inside_a_character_reads_and_is_found() -> None:
    # "ap:" + the name + ":0" is cut to 15 bytes, here inside a 3-byte character: reading the
    # process's threads raised UnicodeDecodeError (for every caller, the confinement check too).
    from apportion import _core
    from apportion.adapters import model_threads

    name = "名前名前名前"
    with ap.Runtime() as rt:
        rt.add_model(name, model=lambda x: x)
        rt.start()
        rt.call(name, 1)
        threads = _core.thread_affinities()
        assert any(n.startswith("ap:名前名") for _, n, _ in threads)
        found = model_threads(name)
        assert len(found) == 1 and found[0].name.startswith("ap:")
