"""Defects found by adversarial use of the public API, one test (or a few) each.

Crashes and hangs run in a subprocess with a timeout, so a regression fails its test instead
of killing or stalling the suite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import apportion as ap

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the worker processes inherit it and import process_models


def run_script(code: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter (with this directory importable); fails the test on a
    hang, and returns the finished process (the caller checks its exit code and output)."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    full_env.update(env or {})
    try:
        return subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s; output so far:\n{e.stdout!r}\n{e.stderr!r}")


def assert_clean(p: subprocess.CompletedProcess[str], expect: str) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert expect in p.stdout, p.stdout + p.stderr
    assert "terminate called" not in p.stderr and "Fatal Python error" not in p.stderr, p.stderr


# -- 1. submit_many while the model is removed -------------------------------------------------
def test_submit_many_from_a_generator_that_removes_the_model() -> None:
    p = run_script("""
        import apportion as ap
        rt = ap.Runtime(); rt.add_model("m", model=lambda x: x); rt.start()
        def g():
            yield 1
            rt.remove_model("m")
            yield 2
        try:
            rt.submit_many("m", g())
        except ap.ModelNotFound as e:
            print("refused:", e)
        rt.close()
    """)
    assert_clean(p, "refused: no model named 'm'")


def test_submit_many_racing_remove_model_from_another_thread() -> None:
    p = run_script("""
        import threading, time
        import apportion as ap
        rt = ap.Runtime(); rt.add_model("m", model=lambda x: x, max_queue=2**18); rt.start()
        outcome = []
        def feed():
            def g():
                for i in range(200_000):
                    yield i
            try:
                futs = rt.submit_many("m", g())
                done = sum(1 for f in futs if f.exception(30) is None or True)
                outcome.append(("admitted", done))
            except (ap.ModelNotFound, ap.RuntimeClosed) as e:
                outcome.append(("refused", type(e).__name__))
        t = threading.Thread(target=feed); t.start()
        time.sleep(0.01)
        rt.remove_model("m")
        t.join(60)
        assert not t.is_alive()
        print("outcome", outcome)
        rt.close()
    """)
    assert_clean(p, "outcome [(")


# -- 2. add_model and remove_model of one name from two threads --------------------------------
def test_close_racing_a_draining_remove_model_releases_the_model_under_the_gil() -> None:
    # close() takes the model being removed too; whichever of the two lets go of it last may
    # be close(), which runs without the GIL: the model's Python objects must still be
    # released under it (this aborted with "PyThreadState_Get ... GIL is released").
    p = run_script("""
        import threading, time
        import apportion as ap
        for i in range(60):
            rt = ap.Runtime()
            def make():
                held = [object() for _ in range(10)]  # freed only with the model
                def model(x):
                    time.sleep(0.02)
                    return x + len(held)
                return model
            rt.add_model("m", model=make()); rt.start()
            f = rt.submit("m", 1)
            time.sleep(0.002)
            t = threading.Thread(target=rt.remove_model, args=("m",), kwargs={"drain": True})
            t.start()
            time.sleep(0.002)
            rt.close(drain=False)
            t.join(30)
            assert not t.is_alive()
            assert f.cancelled() or f.result(5) == 11  # cancelled if it had not begun
        print("60 races survived")
    """)
    assert_clean(p, "60 races survived")


def test_add_and_remove_of_one_name_from_two_threads() -> None:
    p = run_script("""
        import threading, time
        import apportion as ap
        rt = ap.Runtime(); rt.start()
        stop = time.monotonic() + 3.0
        errors, counts = [], {"added": 0, "removed": 0}
        def adder():
            while time.monotonic() < stop:
                try:
                    rt.add_model("m", model=lambda x: x)
                    counts["added"] += 1
                except ValueError as e:
                    if "already registered" not in str(e):
                        errors.append(repr(e))
                except Exception as e:
                    errors.append(repr(e))
        def remover():
            while time.monotonic() < stop:
                try:
                    rt.remove_model("m")
                    counts["removed"] += 1
                except ap.ModelNotFound:
                    pass
                except Exception as e:
                    errors.append(repr(e))
        ts = [threading.Thread(target=adder), threading.Thread(target=remover)]
        for t in ts: t.start()
        for t in ts: t.join()
        assert not errors, errors
        assert counts["added"] - counts["removed"] == len(rt.models), (counts, rt.models)
        print("ok", counts)
        rt.close()
    """)
    assert_clean(p, "ok {")


# -- 3. the last reference to an open Runtime dropped in one of its own workers ----------------
def test_runtime_dropped_in_its_own_worker_by_a_done_callback() -> None:
    p = run_script("""
        import threading, time
        import apportion as ap
        started = threading.Event()
        class Service:
            def __init__(self):
                self.rt = ap.Runtime()
                self.rt.add_model("m", model=self.model)
                self.rt.start()
            @staticmethod
            def model(x):
                started.set(); time.sleep(0.2); return x
            def on_done(self, fut):
                pass
        svc = Service()
        fut = svc.rt.submit("m", 1)
        fut.add_done_callback(svc.on_done)
        started.wait(10)
        del svc  # the callback's bound method holds the last reference
        print("result", fut.result(10))
        time.sleep(0.5)
        print("done")
    """)
    assert_clean(p, "result 1\ndone")


def test_runtime_dropped_on_its_deadline_timer_by_an_expired_requests_callback() -> None:
    # The expired request is completed by the model's timer thread, not a worker: dropping the
    # last reference there joined that thread from itself (std::terminate, "Resource deadlock
    # avoided", exit 134).
    p = run_script("""
        import time
        import apportion as ap
        def setup():
            rt = ap.Runtime()
            rt.add_model("slow", model=lambda x: time.sleep(0.2) or x)
            rt.start()
            a = rt.submit("slow", 1)  # holds the only instance for 200 ms
            b = rt.submit("slow", 2, timeout_ms=20)  # expires on the timer
            b.add_done_callback(lambda f, rt=rt: print("callback", f.exception().__class__.__name__, flush=True))
            return a  # the callback holds the runtime's last reference
        a = setup()
        print("result", a.result(10))
        time.sleep(0.5)
        print("done")
    """)
    assert_clean(p, "callback DeadlineExceeded\nresult 1\ndone")


def test_close_or_remove_from_an_expired_requests_callback_is_refused_and_changes_nothing() -> None:
    p = run_script("""
        import threading, time
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("slow", model=lambda x: time.sleep(0.2) or x)
        rt.start()
        seen = []
        done = threading.Event()
        def on_expired(f):
            for call in (lambda: rt.remove_model("slow"), lambda: rt.close(), lambda: rt.close(drain=False)):
                try:
                    call()
                    seen.append("no error")
                except ap.ApportionError as e:
                    seen.append(str(e))
            done.set()
        a = rt.submit("slow", 1)
        rt.submit("slow", 2, timeout_ms=20).add_done_callback(on_expired)
        assert done.wait(10)
        for msg in seen:
            print(msg)
        print("models", rt.models, "closed", rt.closed, "after", rt.submit("slow", 3).result(10))
        rt.close()
    """)
    assert_clean(p, "\n".join([
        "remove_model() called from the deadline timer of model 'slow' of this runtime would wait for "
        "itself; call it from outside the model",
        "close() called from the deadline timer of model 'slow' of this runtime would wait for itself; "
        "call it from outside the model",
        "close() called from the deadline timer of model 'slow' of this runtime would wait for itself; "
        "call it from outside the model",
        "models ['slow'] closed False after 3"]))


def test_a_wait_for_the_models_own_request_from_its_deadline_timer_is_refused() -> None:
    # A done-callback run by the timer waited for another request of the model, which only the
    # timer would expire (the one instance held): that request expired after 2.98 s, not at its
    # 100 ms deadline (and with a worker stuck for good, never).
    p = run_script("""
        import threading, time
        import apportion as ap
        gate = threading.Event()
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: gate.wait(3) if x == "block" else x)
        rt.add_model("other", model=lambda x: x)
        rt.start()
        rt.submit("m", "block"); time.sleep(0.05)  # the only worker is busy for up to 3 s
        later = rt.submit("m", "later", timeout_ms=150)
        seen = []
        def waits(f):
            for call in (lambda: later.exception(), lambda: later.result(5), lambda: rt.call("m", 1)):
                try:
                    call()
                    seen.append("no error")
                except ap.ApportionError as e:
                    seen.append(type(e).__name__ + ": " + str(e))
            seen.append("other model " + str(rt.call("other", 7)))  # another model's: waited for, fine
        rt.submit("m", 1, timeout_ms=20).add_done_callback(waits)
        t0 = time.monotonic()
        try:
            later.result(10)
        except ap.DeadlineExceeded:
            print("expired in time", time.monotonic() - t0 < 1.0)
        gate.set()
        for line in seen:
            print(line)
        rt.close()
    """)
    own = ("ApportionError: model 'm': a done-callback run by the model's deadline timer waits for a request to "
           "the same model, which only that timer may expire (every deadline of the model would wait "
           "meanwhile); call another model, or submit without waiting (add_done_callback)")
    assert_clean(p, "\n".join(["expired in time True", own, own, own, "other model 7"]))


def test_a_batching_model_that_changes_the_list_it_returned_cannot_crash_the_process() -> None:
    # The results were read from the model's own list while done-callbacks ran between them:
    # a callback (or another instance returning the same list) that shrank it made the loop
    # read past its end (SIGSEGV). The results are taken from a copy.
    p = run_script("""
        import apportion as ap
        out = []
        def model(xs):
            out[:] = list(xs)
            return out
        rt = ap.Runtime()
        rt.add_model("m", model=model, batching=ap.Batching(max_size=4, max_delay_ms=100))
        rt.start()
        fs = rt.submit_many("m", [1, 2, 3, 4])
        fs[0].add_done_callback(lambda f: out.clear())
        print("results", [f.result(5) for f in fs])
        rt.close()
    """)
    assert_clean(p, "results [1, 2, 3, 4]")


def test_runtime_in_a_cycle_collected_during_a_model_call() -> None:
    p = run_script("""
        import gc, time
        import apportion as ap
        gc.disable()
        def model(x):
            gc.collect()  # collects the runtime below, inside its own worker
            return x
        rt = ap.Runtime(); rt.add_model("m", model=model); rt.start()
        rt.cycle = rt
        fut = rt.submit("m", 7)
        del rt
        print("result", fut.result(10))
        time.sleep(0.3)
        print("done")
    """)
    assert_clean(p, "result 7\ndone")


# -- 4. a process model's child still in its factory -------------------------------------------
def test_close_without_drain_stops_a_child_still_in_its_factory() -> None:
    p = run_script("""
        import threading, time
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:sleepy_factory", isolation="process", watchdog_s=1.0)
        errors = []
        def start():
            try:
                rt.start()
            except Exception as e:
                errors.append(e)
        t = threading.Thread(target=start); t.start()
        time.sleep(2.0)  # the child is importing and sleeping in its factory
        t0 = time.monotonic()
        rt.close(drain=False)
        t.join(10)
        assert not t.is_alive()
        print(f"closed in {time.monotonic() - t0:.1f} s:", type(errors[0]).__name__, errors[0])
    """, timeout=60)
    assert_clean(p, "closed in")
    assert "WorkerCrashed" in p.stdout and "while it built the model" in p.stdout


def test_interpreter_exit_stops_a_child_still_in_its_factory() -> None:
    p = run_script("""
        import sys, threading, time
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:sleepy_factory", isolation="process")
        def start():
            try:
                rt.start()
            except ap.WorkerCrashed as e:
                print("start ended:", e, flush=True)
        threading.Thread(target=start).start()  # not a daemon: exit waits for it
        time.sleep(2.0)
        print("exiting", flush=True)
        sys.exit(0)
    """, timeout=60)
    assert_clean(p, "exiting")
    assert "the interpreter is exiting" in p.stdout


def test_start_timeout_bounds_a_child_start() -> None:
    rt = ap.Runtime()
    try:
        rt.add_model("p", factory="process_models:sleepy_factory", isolation="process", start_timeout_s=1.5)
        with pytest.raises(ap.WorkerCrashed, match=r"model 'p' instance 0: .*did not start within 1.5 s "
                                                   r"\(start_timeout_s\)"):
            rt.start()
    finally:
        rt.close(drain=False)


def test_start_timeout_is_validated() -> None:
    rt = ap.Runtime()
    with pytest.raises(ap.QuotaError, match=r"model 'p', field 'start_timeout_s': give a positive"):
        rt.add_model("p", factory="process_models:echo", isolation="process", start_timeout_s=0)
    with pytest.raises(ap.QuotaError, match=r"model 't', field 'start_timeout_s': .*isolation=\"process\" only"):
        rt.add_model("t", model=print, start_timeout_s=5)
    rt.close()


# -- 5. close() or remove_model() inside a done-callback run by a cancellation ------------------
def test_close_and_remove_in_callbacks_run_by_close_without_drain() -> None:
    p = run_script("""
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: x)
        rt.add_model("n", model=lambda x: x)
        seen = []
        def close_again(fut):
            rt.close()
            seen.append("close returned")
        def remove(fut):
            try:
                rt.remove_model("n")
            except ap.ApportionError as e:
                seen.append("remove refused: " + str(e))
        a = rt.submit("m", 1)   # queued before start(): cancelled by close(drain=False)
        b = rt.submit("n", 2)
        a.add_done_callback(close_again)
        b.add_done_callback(remove)
        rt.close(drain=False)
        assert a.cancelled() and b.cancelled()
        print(seen)
    """, timeout=30)
    assert_clean(p, "close returned")
    assert "remove refused: remove_model() called from a done-callback" in p.stdout


def test_close_in_a_callback_at_interpreter_exit() -> None:
    p = run_script("""
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: x)
        f = rt.submit("m", 1)  # never started: the exit handler cancels it
        f.add_done_callback(lambda fut: rt.close())
        print("exiting")
    """, timeout=30)
    assert_clean(p, "exiting")


# -- 6. StopIteration from a model awaited through infer ---------------------------------------
def test_infer_of_a_model_raising_stop_iteration(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: next(iter(())))
    rt.start()

    async def main() -> BaseException:
        with pytest.raises(RuntimeError, match="model 'm' raised StopIteration") as info:
            await asyncio.wait_for(rt.infer("m", 1), 10)
        return info.value

    err = asyncio.run(main())
    assert isinstance(err.__cause__, StopIteration)
    assert rt.stats()["m"].failed == 1


def test_awaiting_the_future_of_a_model_raising_stop_iteration(rt: ap.Runtime) -> None:
    # `await fut` went through asyncio.wrap_future, whose callback cannot set StopIteration on
    # an asyncio future: the awaiting task waited for ever.
    rt.add_model("m", model=lambda x: next(iter(())))
    rt.start()

    async def main() -> BaseException:
        with pytest.raises(RuntimeError, match="raised StopIteration") as info:
            await asyncio.wait_for(_awaited(rt.submit("m", 1)), 10)
        return info.value

    err = asyncio.run(main())
    assert isinstance(err.__cause__, StopIteration)


async def _awaited(f: Any) -> Any:
    return await f


# -- 7. a model that waits for its own model ---------------------------------------------------
def test_a_model_calling_its_own_model_is_refused(rt: ap.Runtime) -> None:
    def model(x: int) -> Any:
        return rt.call("m", x - 1) if x > 0 else 0

    rt.add_model("m", model=model)
    rt.start()
    with pytest.raises(ap.ApportionError, match=r"model 'm': a worker of the model waits for a request "
                                                r"to the same model"):
        rt.call("m", 1)
    assert rt.call("m", 0) == 0  # not stuck


async def _awaited(f: Any) -> Any:
    return await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(_await_future(f))), 5)


async def _await_future(f: Any) -> Any:
    return await f


def test_a_model_awaiting_rt_infer_on_its_own_model_is_refused(rt: ap.Runtime) -> None:
    # asyncio.run(rt.infer("m", ...)) inside m hung for ever, and close() after it too.
    def model(x: int) -> Any:
        return asyncio.run(rt.infer("m", x - 1)) if x > 0 else 0

    rt.add_model("m", model=model)
    rt.start()
    with pytest.raises(ap.ApportionError, match=r"model 'm': a worker of the model waits for a request "
                                                r"to the same model"):
        rt.call("m", 1, timeout_ms=10_000)
    assert rt.call("m", 0) == 0  # not stuck
    # rt.infer's own request is refused before it is admitted: nobody would read it. The two
    # admitted are the outer call (failed with the refusal) and the last one.
    s = rt.stats()["m"]
    assert (s.submitted, s.failed, s.completed, s.cancelled) == (2, 1, 1, 0)


WAITS_ON = {
    # `await fut` on a loop run inside the model hung (with rt.infer too: the same path).
    "await": lambda f: asyncio.run(_awaited(f)),
    "ap.wait": lambda f: ap.wait([f], timeout=5),
    "ap.as_completed": lambda f: list(ap.as_completed([f], timeout=5)),
    "cf.wait": lambda f: cf.wait([f], timeout=5),
    "cf.as_completed": lambda f: list(cf.as_completed([f], timeout=5)),
}


@pytest.mark.parametrize("how", list(WAITS_ON))
def test_every_wait_on_its_own_models_request_is_refused_inside_the_model(rt: ap.Runtime, how: str) -> None:
    # As result() and call(): with one instance only the waiting worker could complete it.
    waits: list[Any] = []

    def model(x: str) -> Any:
        if x != "outer":
            return x
        other = rt.submit("m", "inner")
        t0 = time.monotonic()
        try:
            WAITS_ON[how](other)
        except ap.ApportionError as e:
            waits.append((str(e), time.monotonic() - t0))
        else:
            waits.append(("waited", time.monotonic() - t0))
        return x

    rt.add_model("m", model=model)
    rt.add_model("other", model=lambda x: x)
    rt.start()
    assert rt.call("m", "outer") == "outer"
    (message, seconds), = waits
    assert "model 'm': a worker of the model waits for a request to the same model" in message
    assert seconds < 4  # refused at once, not after the wait's own timeout
    # Waiting on another model's request from inside a model stays allowed.
    def relay(x: Any) -> Any:
        return WAITS_ON[how](rt.submit("other", x)) and x

    rt.add_model("relay", model=relay)
    assert rt.call("relay", 5) == 5


def test_a_done_callback_waiting_on_its_models_request_is_refused(rt: ap.Runtime, gate: Any) -> None:
    rt.add_model("m", model=gate)
    rt.start()
    first = rt.submit("m", "first")
    assert gate.entered.wait(10)
    second = rt.submit("m", "second")
    seen: list[BaseException] = []

    def wait_for_second(fut: Any) -> None:
        try:
            second.result()
        except ap.ApportionError as e:
            seen.append(e)

    first.add_done_callback(wait_for_second)
    gate.release.set()
    assert first.result(10) == "first" and second.result(10) == "second"
    assert len(seen) == 1 and "model 'm'" in str(seen[0])


def test_exit_does_not_hang_after_a_model_waited_on_itself() -> None:
    p = run_script("""
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: rt.call("m", x))
        rt.start()
        try:
            rt.call("m", 1)
        except ap.ApportionError as e:
            print("refused:", e)
    """, timeout=30)
    assert_clean(p, "refused: model 'm'")


# -- 8. /dev/shm segments when the parent dies while a child builds its model -------------------
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_shm_segment_outlives_a_parent_killed_during_start(sig: int) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]), APPORTION_TEST_FACTORY_S="30")
    code = textwrap.dedent("""
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:sleepy_factory", isolation="process")
        print("starting", flush=True)
        rt.start()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "starting\n"
        prefix = f"apportion-{proc.pid}-"
        deadline = time.monotonic() + 20
        while not any(n.startswith(prefix) for n in os.listdir("/dev/shm")) and time.monotonic() < deadline:
            time.sleep(0.01)  # the segment exists from the moment the child is started
        time.sleep(3.0)  # the child has mapped it and is in its 30 s factory
        proc.send_signal(sig)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert left == [], f"leaked after {signal.Signals(sig).name}: {left}"


# -- 9. a process model's exception that pickles but does not unpickle ---------------------------
def test_exception_that_does_not_unpickle_arrives_as_documented(rt: ap.Runtime) -> None:
    rt.add_model("p", factory="process_models:scoring_error", isolation="process")
    rt.start()
    with pytest.raises(RuntimeError, match=r"model 'p' raised process_models.ScoringError: cannot score 3") as info:
        rt.call("p", 3)
    assert "ScoringError" in str(info.value.__cause__) and "Traceback" in str(info.value.__cause__)
    with pytest.raises(RuntimeError, match=r"model 'p' raised process_models.ScoringError"):
        rt.submit("p", 4).result(30)


# -- 10. batching results that are not ordered sequences -----------------------------------------
@pytest.mark.parametrize("result, kind", [
    (lambda xs: {str(x).upper() for x in xs}, "set"),
    (lambda xs: {x: x for x in xs}, "dict"),
    (lambda xs: "ab", "str"),
    (lambda xs: (x for x in xs), "generator"),
    (lambda xs: iter(xs), "list_iterator"),
])
def test_batching_refuses_results_without_an_order(rt: ap.Runtime, result: Any, kind: str) -> None:
    rt.add_model("m", model=result, batching=ap.Batching(max_size=8, max_delay_ms=20))
    futs = rt.submit_many("m", ["a", "b"])
    rt.start()
    for f in futs:
        with pytest.raises(ap.ApportionError, match=rf"model 'm': a batching model must return an ordered "
                                                    rf"sequence .* it returned {kind}"):
            f.result(10)


def test_batching_keeps_an_array_results_own_exception(rt: ap.Runtime) -> None:
    class Broken:
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> Any:
            raise LookupError("the model's own failure")

    rt.add_model("m", model=lambda xs: Broken(), batching=ap.Batching(max_size=8, max_delay_ms=20))
    futs = rt.submit_many("m", [1, 2])
    rt.start()
    for f in futs:
        with pytest.raises(LookupError, match="the model's own failure"):
            f.result(10)


def test_batching_accepts_tensors_in_order(rt: ap.Runtime) -> None:
    torch = pytest.importorskip("torch")
    rt.add_model("m", model=lambda xs: torch.tensor(xs) * 10, batching=ap.Batching(max_size=8, max_delay_ms=20))
    futs = rt.submit_many("m", [1, 2, 3])
    rt.start()
    assert [int(f.result(10)) for f in futs] == [10, 20, 30]


# -- 11. the timeout message ---------------------------------------------------------------------
def test_future_timeouts_name_the_model_and_seconds(rt: ap.Runtime, gate: Any) -> None:
    rt.add_model("slow", model=gate)
    rt.start()
    fut = rt.submit("slow", 1)
    with pytest.raises(TimeoutError, match=r"^request to model 'slow' not done within 0.1 s$"):
        fut.result(0.1)
    with pytest.raises(TimeoutError, match=r"^request to model 'slow' not done within 0.05 s$"):
        fut.exception(0.05)
    gate.release.set()
    assert fut.result(10) == 1


# -- 12. clear errors for out-of-range arguments -----------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"threads": 10**20}, "threads"), ({"cores": 10**20}, "cores"), ({"numa": 10**20}, "numa"),
    ({"cores": [10**20]}, "cores"), ({"max_queue": 2**30}, "max_queue"),
    ({"max_queue": 2**24, "priority_levels": 4}, "max_queue"),
])
def test_huge_quotas_name_model_and_field(rt: ap.Runtime, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ap.QuotaError, match=rf"model 'm', field '{field}': .*(give|limit|needs CPU ids in)"):
        rt.add_model("m", model=print, **kwargs)
    assert rt.models == []


@pytest.mark.parametrize(("kwargs", "mib"), [
    ({"max_queue": 2**22}, 512), ({"max_queue": 2**20, "priority_levels": 4}, 512),
    ({"max_queue": 2**21, "on_timeout": "delay"}, 768),  # its delayed lane: 2**22 + 1 rounds up to 2**23
])
def test_the_queue_memory_limit_counts_the_cells_the_engine_makes(rt: ap.Runtime, kwargs: dict[str, Any],
                                                                  mib: int) -> None:
    # Each lane has 2 x max_queue cells: the limit counted max_queue, so these took 512-768 MiB
    # under a 256 MiB limit.
    with pytest.raises(ap.QuotaError, match=rf"needs {mib} MiB of queue cells .* the limit is 256 MiB"):
        rt.add_model("m", model=print, **kwargs)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_a_models_queue_takes_the_memory_the_limit_counts() -> None:
    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    rt = ap.Runtime()
    try:
        before = rss_mib()
        rt.add_model("m", model=print, max_queue=2**20)  # 2**21 cells of 64 B: 128 MiB, under the limit
        grown = rss_mib() - before
        assert 120 <= grown <= 140, grown
    finally:
        rt.close()


@pytest.mark.parametrize("text, message", [
    (b"[models.m]\ncores = 1\n# \xff\xfe\n", "not UTF-8 text"),
    (b"[models.m]\ncores = 1\nthreads = 100000000000000000000000\n", "models.m.threads: got 1"),
    (b'[runtime]\ncpus = "0-9999999999"\n[models.m]\ncores = 1\n', "runtime.cpus: got '0-9999999999'"),
])
def test_plan_on_bad_config_files_exits_2_with_the_message(tmp_path: Path, text: bytes, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text)
    p = subprocess.run([sys.executable, "-m", "apportion", "plan", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"apportion plan: error: {path}: "), p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_config_error_is_an_apportion_error() -> None:
    assert issubclass(ap.ConfigError, ap.ApportionError) if hasattr(ap, "ConfigError") else True
    from apportion.config import ConfigError
    assert issubclass(ConfigError, ap.ApportionError) and issubclass(ConfigError, ValueError)


# -- 13. add_done_callback on a finished future --------------------------------------------------
def test_a_failing_callback_on_a_finished_future_is_reported_not_raised(
        rt: ap.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    rt.add_model("m", model=lambda x: x)
    rt.start()
    fut = rt.submit("m", 1)
    assert fut.result(10) == 1

    def bad(f: Any) -> None:
        raise KeyError("callback bug")

    fut.add_done_callback(bad)  # must not raise
    assert len(reported) == 1 and isinstance(reported[0].exc_value, KeyError)
