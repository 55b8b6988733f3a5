"""Blocking waits on a real host: Ctrl-C interrupts every one of them (not the request), an
apportion Future works with asyncio and concurrent.futures, and a forked child refuses to use
its parent's runtime instead of accepting requests nothing will serve.

Signals and forks run in a subprocess with a timeout, so a regression fails its test instead of
stalling the suite."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
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


def run_script(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    try:
        return subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s; output so far:\n{e.stdout!r}\n{e.stderr!r}")


# Each wait blocks on a 2 s call; SIGINT comes 0.3 s in. The script prints how long the wait
# took to raise KeyboardInterrupt, then checks the request still completed normally.
WAITS = {
    "result": "f.result()",
    "result_with_timeout": "f.result(timeout=30)",
    "exception": "f.exception()",
    "call": "rt.call('slow', 2.0)",
    "ap.wait": "ap.wait([f])",
    "ap.as_completed": "list(ap.as_completed([f]))",
    "cf.wait": "concurrent.futures.wait([f])",
    "draining close": "rt.close(drain=True)",
}


@pytest.mark.parametrize("wait", list(WAITS), ids=list(WAITS))
def test_sigint_interrupts_each_blocking_wait(wait: str) -> None:
    p = run_script(f"""
        import concurrent.futures, os, signal, threading, time
        import apportion as ap
        # Python leaves SIGINT alone when it starts with it ignored (a background job of a
        # non-interactive shell, as CI runners may start it): install what the shell would.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        rt = ap.Runtime(); rt.add_model("slow", model=lambda s: time.sleep(s) or s); rt.start()
        f = rt.submit("slow", 2.0)
        time.sleep(0.05)  # running
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            {WAITS[wait]}
            print("not interrupted")
        except KeyboardInterrupt:
            print(f"interrupted after {{time.monotonic() - t0:.3f}} s")
        assert f.result(10) == 2.0  # the request itself went on
        rt.close()
        print("request completed")
    """)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("interrupted after "), p.stdout + p.stderr
    assert float(lines[0].split()[2]) < 0.3 + 1.0  # long before the call ends (a second for a stalled VM)
    assert lines[-1] == "request completed"


def test_sigint_during_a_direct_call_to_a_process_model_leaves_later_calls_their_own_answers() -> None:
    # The caller talks to the child itself; interrupted after sending, it never reads the
    # reply, which the next call would otherwise take for its own.
    p = run_script("""
        import os, signal, threading, time
        import apportion as ap
        signal.signal(signal.SIGINT, signal.default_int_handler)
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:sleeper", isolation="process")
        rt.start()
        assert rt.call("p", (0.0, "warm")) == (0.0, "warm")
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            rt.call("p", (1.0, "first"))
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        time.sleep(1.0)  # the child would have answered "first" by now
        print(rt.call("p", (0.0, "second"))[1], rt.call("p", (0.0, "third"))[1])
        s = rt.stats()["p"]
        print(s.submitted, s.completed, s.failed)
        rt.close()
    """)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines() == ["interrupted", "second third", "4 3 1"], p.stdout + p.stderr


def test_sigint_during_a_draining_remove_model_leaves_the_model_removed_everywhere() -> None:
    # The drain ran to its end and KeyboardInterrupt came after it, before the runtime's own
    # bookkeeping forgot the model: spec() and plan() still had it, add_model said "already
    # registered" and remove_model "no model".
    p = run_script("""
        import os, signal, threading, time
        import apportion as ap
        signal.signal(signal.SIGINT, signal.default_int_handler)
        rt = ap.Runtime(); rt.add_model("m", model=lambda s: time.sleep(s) or s); rt.start()
        fs = [rt.submit("m", 0.3) for _ in range(3)]
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            rt.remove_model("m")
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        print(rt.models, [f.result(10) for f in fs], "m" in [m.name for m in rt.plan().models])
        try:
            rt.spec("m")
        except ap.ModelNotFound:
            print("spec: not found")
        rt.add_model("m", model=lambda x: x)
        print(rt.call("m", 7))
        rt.close()
    """)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines() == ["interrupted", "[] [0.3, 0.3, 0.3] False", "spec: not found", "7"], \
        p.stdout + p.stderr


def test_sigint_during_a_live_move_leaves_the_record_where_the_model_serves() -> None:
    # The engine's move ran to its end and KeyboardInterrupt came on its return: apply()
    # restored the old spec, so spec() and plan() said 1 instance while 2 served.
    p = run_script("""
        import dataclasses, os, signal, threading, time
        import apportion as ap
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def factory(ctx):
            time.sleep(0.6)
            return lambda x: x
        rt = ap.Runtime(); rt.add_model("m", factory=factory); rt.start()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            rt.apply(dataclasses.replace(rt.spec("m"), instances=2))
            print("not interrupted")
        except KeyboardInterrupt as e:
            print("interrupted", any("had moved when this was raised" in n for n in getattr(e, "__notes__", [])))
        print(rt.spec("m").instances, rt.stats()["m"].instances, len(rt.plan()["m"].instances), rt.call("m", 3))
        rt.close()
    """)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines() == ["interrupted True", "2 2 2 3"], p.stdout + p.stderr


def test_a_timed_wait_still_times_out_with_the_seconds_in_the_message(rt: ap.Runtime, gate: Any) -> None:
    rt.add_model("m", model=gate)
    rt.start()
    f = rt.submit("m", 1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"request to model 'm' not done within 0\.12 s"):
        f.result(0.12)
    assert 0.1 <= time.monotonic() - t0 < 2.0
    gate.release.set()
    assert f.result(10) == 1


# -- Future interop ------------------------------------------------------------------------------

def test_a_future_is_a_concurrent_futures_future_to_isinstance(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: x)
    rt.start()
    f = rt.submit("m", 1)
    assert isinstance(f, cf.Future) and type(f) is ap.Future
    assert f.result(5) == 1


def test_await_and_wrap_future(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda x: x * 2)
    rt.start()

    async def main() -> tuple[Any, Any, Any]:
        a = await rt.submit("m", 1)
        b = await asyncio.wrap_future(rt.submit("m", 2))
        c = await asyncio.gather(rt.submit("m", 3), asyncio.sleep(0, "x"))
        return a, b, c

    assert asyncio.run(main()) == (2, 4, [6, "x"])


def test_await_raises_the_models_exception(rt: ap.Runtime) -> None:
    def fail(x: Any) -> Any:
        raise KeyError(x)

    rt.add_model("m", model=fail)
    rt.start()

    async def main() -> None:
        await rt.submit("m", "k")

    with pytest.raises(KeyError, match="k"):
        asyncio.run(main())


def test_cancelling_the_awaiting_task_cancels_a_queued_request(rt: ap.Runtime, gate: Any) -> None:
    rt.add_model("m", model=gate)
    rt.start()
    blocker = rt.submit("m", 0)
    assert gate.entered.wait(10)
    queued = rt.submit("m", 1)

    async def main() -> None:
        task = asyncio.ensure_future(_await(queued))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert queued.cancelled()
    gate.release.set()
    assert blocker.result(10) == 0


async def _await(f: Any) -> Any:
    return await f


@pytest.mark.parametrize("return_when", [cf.ALL_COMPLETED, cf.FIRST_COMPLETED, cf.FIRST_EXCEPTION])
def test_stdlib_wait_takes_ours_and_its_own_mixed(rt: ap.Runtime, return_when: str) -> None:
    rt.add_model("m", model=lambda s: time.sleep(s) or s)
    rt.start()
    with cf.ThreadPoolExecutor(1) as ex:
        ours = [rt.submit("m", 0.01 * i) for i in range(4)]
        theirs = ex.submit(time.sleep, 0.02)
        done, not_done = cf.wait([*ours, theirs], timeout=10, return_when=return_when)
        assert done and done <= {*ours, theirs}
        if return_when != cf.FIRST_COMPLETED:  # nothing fails: FIRST_EXCEPTION waits for all
            assert not not_done
        assert all(f.done() for f in done)


def test_stdlib_wait_times_out_and_sees_completions_after_it(rt: ap.Runtime, gate: Any) -> None:
    rt.add_model("m", model=gate)
    rt.start()
    f = rt.submit("m", 1)
    done, not_done = cf.wait([f], timeout=0.05)
    assert not done and not_done == {f}
    gate.release.set()
    done, _ = cf.wait([f], timeout=10)
    assert done == {f}


def test_stdlib_wait_is_not_fooled_by_a_future_whose_callbacks_are_still_running(rt: ap.Runtime) -> None:
    # f is done, but a slow callback of its own holds the worker, and the notice to the
    # standard library's waiters comes after it: a wait on f and g must not count f twice
    # (once as done now, once at the notice) and return while g is pending.
    run_f, run_g, hold = threading.Event(), threading.Event(), threading.Event()
    rt.add_model("f", model=lambda x: run_f.wait(10) and x)
    rt.add_model("g", model=lambda x: run_g.wait(10) and x)
    rt.start()
    f = rt.submit("f", 1)
    f.add_done_callback(lambda _: hold.wait(10))
    cf.wait([f], timeout=0)  # the standard library's state on f, notified after the callback above
    g = rt.submit("g", 2)
    run_f.set()
    deadline = time.monotonic() + 10
    while not f.done():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with cf.ThreadPoolExecutor(1) as ex:
        waited = ex.submit(cf.wait, [f, g])
        time.sleep(0.05)
        hold.set()  # the notice reaches the wait's waiter now
        time.sleep(0.3)
        assert not waited.done() and not g.done()
        run_g.set()
        done, not_done = waited.result(10)
    assert done == {f, g} and not not_done


def test_stdlib_as_completed_yields_each_once(rt: ap.Runtime) -> None:
    rt.add_model("m", model=lambda s: time.sleep(s) or s)
    rt.start()
    with cf.ThreadPoolExecutor(1) as ex:
        fs = [rt.submit("m", 0.005 * i) for i in range(6)] + [ex.submit(lambda: "pool")]
        got = [f.result() for f in cf.as_completed(fs, timeout=10)]
    assert sorted(map(str, got)) == sorted(map(str, [0.005 * i for i in range(6)] + ["pool"]))


def test_stdlib_wait_counts_cancelled_and_failed(rt: ap.Runtime) -> None:
    go = threading.Event()

    def model(x: Any) -> Any:
        go.wait(10)
        if x == "boom":
            raise ValueError(x)
        return x

    rt.add_model("m", model=model)
    rt.start()
    first = rt.submit("m", "ok")
    failing = rt.submit("m", "boom")
    cancelled = rt.submit("m", "never")
    assert cancelled.cancel()
    go.set()
    done, not_done = cf.wait([first, failing, cancelled], timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert failing in done and cancelled in done
    assert isinstance(failing.exception(), ValueError)


@pytest.mark.parametrize("batching", [False, True], ids=["plain", "batching"])
def test_a_cancelled_request_its_caller_let_go_of_is_freed_under_the_gil(batching: bool) -> None:
    # The caller waits on a queued request with concurrent.futures (which gives the request
    # Python state of its own), cancels it and drops it: the queue's reference, which the
    # worker drops when it pops the tombstone, is the last one. Freeing the request's Python
    # objects there without the GIL aborted the process (a batching worker never holds the
    # GIL between calls; a plain one may have let go of it). In a subprocess: it is the
    # process that dies.
    p = run_script(f"""
        import concurrent.futures as cf, gc, threading
        import apportion as ap
        go = threading.Event()
        rt = ap.Runtime()
        batch = ap.Batching(4, 0.0) if {batching} else None
        rt.add_model("m", model=(lambda xs: [go.wait(10) and x for x in xs]) if batch else (lambda x: go.wait(10) and x),
                     batching=batch)
        rt.start()
        for round in range(20):
            go.clear()
            first = rt.submit("m", round)
            while rt.stats().models["m"].queued:  # running, not queued
                pass
            victims = [rt.submit("m", -i) for i in range(8)]
            cf.wait(victims, timeout=0)  # their concurrent.futures state
            assert all(v.cancel() for v in victims)
            del victims
            gc.collect()
            go.set()
            assert first.result(10) == round
        rt.close()
        print("freed", flush=True)
        """)
    assert p.returncode == 0 and p.stdout.strip() == "freed", p.stdout + p.stderr


def test_racing_completions_never_lose_a_stdlib_waiter(rt: ap.Runtime) -> None:
    # The waiter is installed while requests complete on the workers: every wait returns.
    rt.add_model("m", model=lambda x: x, instances=2)
    rt.start()
    deadline = time.monotonic() + 5
    rounds = 0
    while time.monotonic() < deadline and rounds < 2000:
        fs = [rt.submit("m", i) for i in range(4)]
        done, not_done = cf.wait(fs, timeout=5)
        assert not not_done and done == set(fs)
        rounds += 1
    assert rounds > 10


# -- fork ------------------------------------------------------------------------------------------

def test_a_forked_child_refuses_the_parents_runtime_and_exits() -> None:
    p = run_script("""
        import asyncio, os, sys, time
        import apportion as ap
        rt = ap.Runtime()
        rt.add_model("m", model=lambda x: x + 1)
        rt.add_model("p", factory="process_models:echo", isolation="process")
        rt.start()
        assert rt.call("p", 2) == 2
        pid = os.fork()
        if pid == 0:
            outcomes = []
            for what, call in [("submit", lambda: rt.submit("m", 1)), ("call", lambda: rt.call("m", 1)),
                               ("call process", lambda: rt.call("p", 1)),
                               ("infer", lambda: asyncio.run(rt.infer("m", 1))),
                               ("submit_many", lambda: rt.submit_many("m", [1, 2])),
                               ("add_model", lambda: rt.add_model("n", model=len)),
                               ("remove_model", lambda: rt.remove_model("m"))]:
                try:
                    call()
                    outcomes.append(f"{what}: accepted")
                except ap.RuntimeClosed as e:
                    ok = f"process {os.getppid()}" in str(e) and f"process {os.getpid()}" in str(e)
                    outcomes.append(f"{what}: refused{'' if ok else ' without the pids'}")
            print("; ".join(outcomes), flush=True)
            rt.close()  # does nothing here: the parent's threads and children are not ours
            new = ap.Runtime(); new.add_model("m", model=lambda x: x * 10); new.start()
            print("new runtime in the child:", new.call("m", 2), flush=True)
            sys.exit(0)  # exit handlers run: they must not wait for the parent's threads
        _, status = os.waitpid(pid, 0)
        print("child status", status)
        print("parent serves", rt.call("m", 1), rt.call("p", 5))
        rt.close()
    """, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    outcomes = out.splitlines()[0].split("; ")
    assert outcomes == [f"{what}: refused" for what in ("submit", "call", "call process", "infer", "submit_many",
                                                        "add_model", "remove_model")], out
    assert "new runtime in the child: 20" in out
    assert "child status 0" in out
    assert "parent serves 2 5" in out


# -- prompt expiry ---------------------------------------------------------------------------------

def test_a_queued_request_expires_at_its_deadline_while_the_worker_is_busy(rt: ap.Runtime, gate: Any) -> None:
    rt.add_model("m", model=gate)
    rt.start()
    blocker = rt.submit("m", "long")
    assert gate.entered.wait(10)
    t0 = time.monotonic()
    late = rt.submit("m", "late", timeout_ms=20)
    with pytest.raises(ap.DeadlineExceeded, match="deadline of 20.000 ms passed"):
        late.result(5)
    assert time.monotonic() - t0 < 0.5  # at its deadline, not when the 30 s call ends
    s = rt.stats()["m"]
    assert (s.expired, s.queued) == (1, 0)  # counted once; its slot is back (its cell waits for a worker)
    gate.release.set()
    assert blocker.result(10) == "long"
    rt.close()
    assert gate.calls == ["long"]  # never run afterwards
    s = rt.stats()["m"]
    assert (s.submitted, s.completed, s.expired, s.queued) == (2, 1, 1, 0)


def test_expired_and_cancelled_requests_give_their_queue_slots_back_at_once(rt: ap.Runtime, gate: Any) -> None:
    # A queue of 4 behind a long call: requests that expired or were cancelled there used to
    # hold their slots until the call ended, refusing new requests with QueueFull meanwhile.
    rt.add_model("m", model=gate, max_queue=4)
    rt.start()
    blocker = rt.submit("m", "long")
    assert gate.entered.wait(10)
    expiring = [rt.submit("m", i, timeout_ms=5) for i in range(3)]
    cancelled = rt.submit("m", "c")
    with pytest.raises(ap.QueueFull):
        rt.submit("m", "refused")
    assert cancelled.cancel()
    for f in expiring:
        with pytest.raises(ap.DeadlineExceeded):
            f.result(5)
    later = [rt.submit("m", f"later{i}") for i in range(4)]  # every slot is free again
    assert rt.stats()["m"].queued == 4
    gate.release.set()
    assert [f.result(10) for f in later] == [f"later{i}" for i in range(4)]
    assert blocker.result(10) == "long"
    rt.close()
    s = rt.stats()["m"]
    assert (s.submitted, s.completed, s.expired, s.cancelled, s.rejected, s.queued) == (10, 5, 3, 1, 1, 0)
    assert gate.calls == ["long"] + [f"later{i}" for i in range(4)]


def test_with_on_timeout_delay_a_late_request_still_runs(rt: ap.Runtime, gate: Any) -> None:
    rt.add_model("m", model=gate, on_timeout="delay")
    rt.start()
    blocker = rt.submit("m", "long")
    assert gate.entered.wait(10)
    late = rt.submit("m", "late", timeout_ms=20)
    time.sleep(0.1)
    assert not late.done()
    gate.release.set()
    assert late.result(10) == "late" and blocker.result(10) == "long"
    assert rt.stats()["m"].delayed == 1


def test_expiry_races_completion_and_cancellation_exactly_once(rt: ap.Runtime, tally: Any) -> None:
    # Deadlines around the service time: the timer, the workers and cancelling callers race
    # for the same requests; each completes once, and the counts add up. Every 13th request
    # has no deadline, so some complete however slowly a loaded machine serves the rest.
    rt.add_model("m", model=lambda x: time.sleep(0.0005) or x, instances=2, max_queue=4096)
    rt.start()
    futs = []
    for i in range(3000):
        timeout = None if i % 13 == 0 else 0.2 + (i % 7) * 0.5
        f = tally.watch(rt.submit("m", i, timeout_ms=timeout))
        if i % 11 == 0:
            f.cancel()
        futs.append(f)
    for f in futs:
        try:
            f.exception(30)
        except cf.CancelledError:
            pass
    rt.close()
    with tally.lock:
        assert [tally.done[id(f)] for f in futs] == [1] * len(futs)
    s = rt.stats()["m"]
    assert s.submitted == 3000 == s.completed + s.expired + s.cancelled
    assert s.expired > 0 and s.completed > 0
