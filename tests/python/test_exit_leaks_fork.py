"""What a long-lived process needs of the runtime: no abort when Python exits under waiting
daemon threads, nothing kept alive by a failed request or a runtime dropped inside its own
worker, no request admitted for a call the runtime refuses, and a model that forks never
serving the parent's queue from the child."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest

import apportion as ap


def run_script(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s; output so far:\n{e.stdout!r}\n{e.stderr!r}")


# --- interpreter exit under daemon threads ----------------------------------------------------

WAITERS_AT_EXIT = {
    # A daemon thread waiting on a request of a runtime never started: aborted 6 runs of 6.
    "never started, exception()": """
        import apportion as ap, threading, time
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: x)
        f = rt.submit("m", 1)
        threading.Thread(target=lambda: f.exception(), daemon=True).start()
        time.sleep(0.1)
    """,
    # Eight daemon threads in rt.call() on a model that takes 0.2 s.
    "started, call()": """
        import apportion as ap, threading, time
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: (time.sleep(0.2), x)[1])
        rt.start()
        def client():
            try:
                rt.call("m", 1)
            except BaseException:
                pass
        for _ in range(8):
            threading.Thread(target=client, daemon=True).start()
        time.sleep(0.1)
    """,
    # Daemon threads calling in a loop (one model batching) when the main thread returns.
    "calling in a loop": """
        import apportion as ap, threading, time
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: x, instances=2, max_queue=64)
        rt.add_model("b", model=lambda xs: list(xs), batching=ap.Batching(max_size=4, max_delay_ms=1),
                     max_queue=64)
        rt.start()
        stop = time.time() + 30
        def loop(name):
            n = 0
            while time.time() < stop:
                try:
                    rt.call(name, n)
                    n += 1
                except (ap.QueueFull, ap.RuntimeClosed):
                    pass
        for i in range(8):
            threading.Thread(target=loop, args=("m" if i % 2 else "b",), daemon=True).start()
        time.sleep(0.3)
    """,
}


@pytest.mark.parametrize("case", list(WAITERS_AT_EXIT))
def test_daemon_threads_waiting_when_python_exits_do_not_abort_it(case: str) -> None:
    # The GIL was taken back in gil_scoped_release's noexcept destructor: a thread woken after
    # finalization began was ended by CPython with a forced unwind through it, std::terminate
    # ("terminate called without an active exception", exit 134).
    for _ in range(3):
        out = run_script(textwrap.dedent(WAITERS_AT_EXIT[case]) + "\nprint('main exits', flush=True)\n")
        assert out.returncode == 0, out.stderr
        assert "main exits" in out.stdout and "terminate called" not in out.stderr


# --- nothing kept alive ---------------------------------------------------------------------


class Marker:
    """Stands for whatever the caller's frame holds (a request body, a runtime)."""


def boom(x: object) -> object:
    raise ValueError("model failed")


def test_a_failed_request_does_not_keep_its_callers_frame_alive() -> None:
    # result() raises the stored exception itself, so its traceback holds the caller's frame,
    # which holds the Future: a cycle through the native Future the collector never saw (a
    # server kept every failed request's input; 1 MiB each).
    rt = ap.Runtime()
    rt.add_model("m", model=boom)
    rt.add_model("b", model=lambda xs: [boom(x) for x in xs], batching=ap.Batching(max_size=4, max_delay_ms=1))
    rt.start()
    alive: weakref.WeakSet[Marker] = weakref.WeakSet()

    def by_result(model: str) -> None:
        held = Marker()
        alive.add(held)
        f = rt.submit(model, 1)
        with pytest.raises(ValueError):
            f.result()

    async def by_infer() -> None:
        held = Marker()
        alive.add(held)
        with pytest.raises(ValueError):
            await rt.infer("m", 1)

    async def by_await() -> None:
        held = Marker()
        alive.add(held)
        f = rt.submit("m", 1)
        with pytest.raises(ValueError):
            await f

    try:
        for _ in range(20):
            by_result("m")
            by_result("b")
            asyncio.run(by_infer())
            asyncio.run(by_await())
        gc.collect()
        assert len(alive) == 0
    finally:
        rt.close()


def test_a_done_future_still_answers_after_a_collection() -> None:
    # The collector sees a completed Future's value: one still referenced keeps it.
    rt = ap.Runtime()
    rt.add_model("m", model=boom)
    rt.add_model("ok", model=lambda x: [x])
    rt.start()
    try:
        bad, good = rt.submit("m", 1), rt.submit("ok", 2)
        with pytest.raises(ValueError):
            bad.result()
        assert good.result() == [2]
        gc.collect()
        with pytest.raises(ValueError, match="model failed"):
            bad.result()
        assert good.result() == [2] and isinstance(bad.exception(), ValueError)
        # A pending request's input is the engine's until completion: never collected from under it.
        gate = threading.Event()
        rt.add_model("slow", model=lambda x: (gate.wait(10), x)[1])
        pending = [rt.submit("slow", [i]) for i in range(3)]
        gc.collect()
        gate.set()
        assert [f.result(10) for f in pending] == [[0], [1], [2]]
    finally:
        rt.close()


def _maps() -> int:
    with open("/proc/self/maps") as fh:
        return sum(1 for _ in fh)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_runtimes_dropped_inside_their_own_workers_leave_no_thread_stacks() -> None:
    # Each was closed on a thread of its own that was joined only at interpreter exit: every
    # exited thread kept its stack mapped (8 MiB of address space; new threads failed after
    # ~32,000 such runtimes).
    def drop_inside_worker() -> None:
        rt = ap.Runtime()
        rt.add_model("a", model=lambda x: x)
        rt.start()
        f = rt.submit("a", 1)
        f.add_done_callback(lambda fut, rt=rt: None)  # the last reference goes in the worker
        del rt
        f.result()

    for _ in range(10):
        drop_inside_worker()
    time.sleep(0.3)
    before = _maps()
    for _ in range(150):
        drop_inside_worker()
    time.sleep(0.3)
    drop_inside_worker()  # joins those that finished
    assert _maps() - before < 30  # was +2 per runtime


def test_a_removed_models_cpu_time_is_forgotten() -> None:
    from apportion._private.cputime import CpuTracker

    tracker = CpuTracker()
    assert tracker.read({"a": [1], "b": [2]}, {1: (b"ap:a:0", 2.0), 2: (b"ap:b:0", 1.0)}) == {"a": 2.0, "b": 1.0}
    assert tracker.read({"a": [1], "b": [2]}, {1: (b"ap:a:0", 2.5)}) == {"a": 2.5, "b": 1.0}  # b's exited
    tracker.forget("b")
    tracker.forget("a")
    # Names removed for good cost nothing, and one added again starts from zero.
    assert tracker.read({"b": [3]}, {3: (b"ap:b:0", 0.25)}) == {"b": 0.25}
    assert tracker._gone == {} and set(tracker._seen) == {(3, 0)}  # (tid, start time; none given)


def test_a_model_added_again_under_its_name_starts_its_cpu_time_from_zero() -> None:
    def burn(x: object) -> object:
        end = time.thread_time() + 0.2
        while time.thread_time() < end:
            pass
        return x

    rt = ap.Runtime()
    try:
        rt.add_model("m", model=burn)
        rt.start()
        rt.call("m", 1)
        assert rt.cpu_seconds()["m"] >= 0.15
        rt.remove_model("m")
        rt.add_model("m", model=lambda x: x)
        assert rt.cpu_seconds()["m"] < 0.1  # as its request counts: a new model
        assert rt.stats()["m"].submitted == 0
    finally:
        rt.close()


# --- calls the runtime refuses admit nothing ---------------------------------------------------


def test_call_and_infer_of_its_own_model_inside_a_model_admit_nothing() -> None:
    # Refused only when waited on, the request had been admitted and ran afterwards: a model
    # calling itself once per request did so for ever (354,538 requests in 2 s).
    rt = ap.Runtime()
    runs: list[str] = []
    refused: list[str] = []

    def selfish(x: str) -> str:
        runs.append(x)
        if x == "outer":
            try:
                rt.call("m", "by call")
            except ap.ApportionError as e:
                refused.append(str(e))
            try:
                asyncio.run(rt.infer("m", "by infer"))
            except ap.ApportionError as e:
                refused.append(str(e))
        return x

    rt.add_model("m", model=selfish)
    rt.start()
    try:
        assert rt.call("m", "outer") == "outer"
        time.sleep(0.2)
        assert runs == ["outer"]
        assert len(refused) == 2 and all("a worker of the model waits for a request to the same model" in r
                                         for r in refused)
        s = rt.stats()["m"]
        assert (s.submitted, s.completed) == (1, 1)
    finally:
        rt.close()


# --- a model that forks -----------------------------------------------------------------------


def forking_script(log: Path) -> str:
    """The start of a script that forks with threads running: a `log` path and a `gate`."""
    return textwrap.dedent(f"""
        import os, threading, warnings, apportion as ap
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        log = {str(log)!r}
        gate = threading.Event()
    """)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize(("child_does", "status", "said"), [
    ("return x", 1, "returned in a process it forked during its call"),
    ("raise SystemExit(3)", 3, ""),
    ("raise SystemExit(None)", 0, ""),
])
def test_a_model_that_forks_never_serves_the_parents_queue_from_the_child(
        tmp_path: Path, child_does: str, status: int, said: str) -> None:
    # In the child the worker is the only thread: back from the model it served the requests
    # queued in the parent's copy again (their side effects twice), and never exited.
    log = tmp_path / "log"
    out = run_script(forking_script(log) + textwrap.dedent(f"""
        statuses = []

        def model(x):
            with open(log, "a") as fh:
                fh.write(f"{{os.getpid()}} {{x}}\\n")
            if x == 0:
                gate.wait(10)
                pid = os.fork()
                if pid == 0:
                    {child_does}
                statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            return x

        rt = ap.Runtime()
        rt.add_model("m", model=model)
        rt.start()
        futs = [rt.submit("m", i) for i in range(5)]
        gate.set()
        print([f.result(30) for f in futs], statuses, flush=True)
        rt.close()
    """))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[0, 1, 2, 3, 4] [{status}]"
    lines = log.read_text().split()
    assert len(lines) == 10 and len({lines[i] for i in range(0, 10, 2)}) == 1  # one pid: the parent's
    assert said in out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_request_pending_at_a_fork_is_refused_in_the_child_not_waited_for() -> None:
    # In the child no worker exists to complete it: result() without a timeout waited for ever.
    out = run_script("""
        import asyncio, os, threading, time, warnings, apportion as ap
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        gate = threading.Event()
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: (gate.wait(10), x)[1])
        rt.start()
        running, queued = rt.submit("m", 1), rt.submit("m", 2)
        time.sleep(0.1)
        pid = os.fork()
        if pid == 0:
            said = []
            for how in (lambda: running.result(), lambda: queued.exception(30),
                        lambda: ap.wait([queued]), lambda: asyncio.run(rt.infer("m", 3))):
                try:
                    how()
                except ap.RuntimeClosed as e:
                    said.append(str(e))
            async def awaited():
                return await running
            try:
                asyncio.run(awaited())
            except ap.RuntimeClosed as e:
                said.append(str(e))
            os._exit(0 if len(said) == 5 and "was submitted before process" in said[0] else 7)
        gate.set()
        print(running.result(10), queued.result(10), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
        rt.close()
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "0"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_in_a_done_callback_on_a_worker_never_serves_the_parents_queue(tmp_path: Path) -> None:
    # The fork check ran only after the model's call: a done-callback (run on the worker) that
    # forked and returned left the child's worker taking the parent's next queued request.
    log = tmp_path / "log"
    out = run_script(forking_script(log) + textwrap.dedent(f"""
        children = []

        def model(x):
            if x == 1:
                gate.wait(10)
            with open(log, "a") as fh:
                fh.write(f"{{os.getpid()}} {{x}}\\n")
            return x

        def fork_and_return(f):
            pid = os.fork()
            if pid:
                children.append(pid)

        rt = ap.Runtime()
        rt.add_model("m", model=model)
        rt.start()
        first = rt.submit("m", 1)
        first.add_done_callback(fork_and_return)
        second = rt.submit("m", 2)  # queued behind the first
        gate.set()
        print(first.result(30), second.result(30), os.waitstatus_to_exitcode(os.waitpid(children[0], 0)[1]),
              flush=True)
        rt.close()
    """))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "1"]
    assert len(log.read_text().splitlines()) == 2  # each request ran once, in the parent
    assert "outside its call (a done-callback, its factory or its deadline timer)" in out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_runtime_inherited_through_fork_is_neither_live_nor_ready_and_its_app_fails_to_start() -> None:
    # gunicorn --preload: the runtime made at import in the master was inherited by every
    # worker, whose probes read live and ready while every request got 503.
    pytest.importorskip("httpx")
    out = run_script("""
        import asyncio, os, warnings, httpx, apportion as ap
        from apportion.serve import Signature, TensorSpec, asgi
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: x)
        rt.start()
        app = asgi(rt, {"m": Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("y", "FP32", [-1])])})

        async def probe():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                codes = [(await c.get(p)).status_code
                         for p in ("/v2/health/live", "/v2/health/ready", "/v2/models/m/ready")]
            sent = []
            said = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
            async def receive():
                return next(said)
            async def send(msg):
                sent.append(msg)
            await app({"type": "lifespan"}, receive, send)
            return codes, sent[0]["type"], sent[0].get("message", "")

        def report(tag):
            codes, started, message = asyncio.run(probe())
            print(tag, *codes, rt.serving("m"), started, "is a fork of it" in message, flush=True)

        report("parent")
        pid = os.fork()
        if pid == 0:
            report("child")
            os._exit(0)
        os.waitpid(pid, 0)
        rt.close()
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "parent 200 200 200 True lifespan.startup.complete False",
        "child 400 400 400 False lifespan.startup.failed True",
    ], out.stdout
