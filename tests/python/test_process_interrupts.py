"""Signals during the lifecycle calls of a runtime with process models: Ctrl-C in a draining
close() or remove_model(), a signal handler that closes the runtime while its own thread is in
a direct call (``rt.call`` to a process model), and interpreter exit after an interrupted
drain. Each case runs in a subprocess with a timeout, so a hang fails its test instead of
stalling the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# Every script starts with this: SIGINT raises KeyboardInterrupt even where the runner started
# Python with it ignored, a helper that says whether Ctrl-C interrupted a call, and one that
# checks every request was counted exactly once.
PRELUDE = """
import os, signal, sys, threading, time
import apportion as ap
signal.signal(signal.SIGINT, signal.default_int_handler)

def sigint_in(s):
    threading.Timer(s, os.kill, (os.getpid(), signal.SIGINT)).start()

def interrupted(call):
    # Runs call(); says whether Ctrl-C interrupted it.
    try:
        call()
        return "not interrupted"
    except KeyboardInterrupt:
        return "interrupted"

def accounted(rt, name):
    st = rt.stats()[name]
    return st.submitted == st.completed + st.failed + st.rejected + st.expired + st.cancelled
"""


def run_script(code: str, tmp_path: Path, timeout: float = 30.0) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]),
               APPORTION_TEST_TMP=str(tmp_path))
    script = PRELUDE + textwrap.dedent(code)
    try:
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s; output so far:\n{e.stdout!r}\n{e.stderr!r}")
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.splitlines()


def test_sigint_during_a_draining_close_leaves_it_closing_in_the_background(tmp_path: Path) -> None:
    # The worker held the instance's call lock for each queued request, and close() waited for
    # that lock before the engine's close: Ctrl-C there left the runtime open, still admitting.
    out = run_script("""
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:sleeper", isolation="process", max_queue=16)
        rt.start()
        rt.call("p", (0.0, "warm"))
        fs = [rt.submit("p", (0.3, i)) for i in range(4)]
        time.sleep(0.05)  # the first one runs
        sigint_in(0.2)
        print(interrupted(lambda: rt.close(drain=True)))
        print("closed", rt.closed)
        try:
            rt.submit("p", (0.0, "late"))
            print("admitted")
        except ap.RuntimeClosed:
            print("refused")
        rt.close()
        print([f.result(0)[1] for f in fs], accounted(rt, "p"), rt.stats()["p"].completed)
    """, tmp_path)
    assert out == ["interrupted", "closed True", "refused", "[0, 1, 2, 3] True 5"]


def test_sigint_while_close_waits_for_a_direct_call_goes_on_with_the_close(tmp_path: Path) -> None:
    # Another thread is in a direct call when close(drain=True) is interrupted: the close goes
    # on once that call returned, without another close(), and drains what was queued.
    out = run_script("""
        tmp = os.environ["APPORTION_TEST_TMP"]
        running, release = os.path.join(tmp, "running"), os.path.join(tmp, "release")
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:faulty", isolation="process", max_queue=16)
        rt.start()
        rt.call("p", "warm")
        direct = []
        t = threading.Thread(target=lambda: direct.append(rt.call("p", ("gate", running, release))))
        t.start()
        while not os.path.exists(running):
            time.sleep(0.005)
        fs = [rt.submit("p", i) for i in range(3)]  # queued behind the direct call
        sigint_in(0.2)
        print(interrupted(lambda: rt.close(drain=True)))
        open(release, "w").close()
        t.join(10)
        deadline = time.monotonic() + 10
        while not rt.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        print("closed", rt.closed, direct, [f.result(10) for f in fs])
        rt.close()
        st = rt.stats()["p"]
        print(accounted(rt, "p"), st.submitted, st.completed, st.direct)
    """, tmp_path)
    assert out == ["interrupted", "closed True ['gate'] [0, 1, 2]", "True 5 5 2"]


@pytest.mark.parametrize("busy", ["queued", "direct_call"])
def test_sigint_during_a_draining_remove_model_of_a_process_model_takes_effect_once_it_is_gone(
        tmp_path: Path, busy: str) -> None:
    # remove_model(drain=True) is not interruptible: KeyboardInterrupt comes once the model is
    # gone, whether the removal waited for the worker's queue or for a direct call in flight.
    out = run_script(f"""
        tmp = os.environ["APPORTION_TEST_TMP"]
        running, release = os.path.join(tmp, "running"), os.path.join(tmp, "release")
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:faulty", isolation="process", max_queue=16)
        rt.add_model("other", model=lambda x: x)
        rt.start()
        rt.call("p", "warm")
        direct, fs = [], []
        t = threading.Thread(target=lambda: direct.append(rt.call("p", ("gate", running, release))))
        if {busy!r} == "direct_call":
            t.start()
        else:
            fs = [rt.submit("p", ("gate", running, release))] + [rt.submit("p", i) for i in range(3)]
        while not os.path.exists(running):
            time.sleep(0.005)
        threading.Timer(0.5, lambda: open(release, "w").close()).start()
        sigint_in(0.2)
        print(interrupted(lambda: rt.remove_model("p", drain=True)))
        if t.ident is not None:  # started
            t.join(10)
        print(rt.models, direct, [f.result(0) for f in fs])
        try:
            rt.submit("p", 0)
        except ap.ModelNotFound:
            print("gone")
        print(rt.call("other", 7))
        rt.close()
    """, tmp_path)
    results = "['gate']" if busy == "direct_call" else "[]"
    futures = "[]" if busy == "direct_call" else "['gate', 0, 1, 2]"
    assert out == ["interrupted", f"['other'] {results} {futures}", "gone", "7"]


@pytest.mark.parametrize("action", ["close", "close_nodrain", "remove_model"])
def test_signal_handler_that_stops_the_model_during_its_threads_direct_call(tmp_path: Path, action: str) -> None:
    # The handler runs inside the direct call, which holds the instance's call lock; waiting
    # for that call (or for the worker, which waits for the lock to serve what was queued
    # meanwhile) hung for good. The handler now returns at once and the close or removal
    # follows once the call returned, before rt.call returns.
    out = run_script(f"""
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:sleeper", isolation="process", max_queue=16)
        rt.start()
        rt.call("p", (0.0, "warm"))
        ACTION = {action!r}

        def handler(signum, frame):
            if ACTION == "close":
                rt.close()
            elif ACTION == "close_nodrain":
                rt.close(drain=False)
            else:
                rt.remove_model("p")
            print("handler returned", flush=True)

        signal.signal(signal.SIGTERM, handler)
        fs = []
        # Queued while the direct call runs: the worker takes one and waits for the call lock.
        threading.Timer(0.1, lambda: fs.extend(rt.submit("p", (0.0, i)) for i in range(2))).start()
        threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            print("call returned", rt.call("p", (1.0, "direct"))[1])
        except ap.WorkerCrashed:
            print("call failed: WorkerCrashed")
        print("closed", rt.closed, "models", rt.models)
        print(["cancelled" if f.cancelled() else f.result(10)[1] if f.exception(10) is None
               else type(f.exception()).__name__ for f in fs], "p" not in rt.models or accounted(rt, "p"))
        rt.close()
    """, tmp_path, timeout=20)
    if action == "close":
        assert out == ["handler returned", "call returned direct", "closed True models ['p']", "[0, 1] True"]
    elif action == "close_nodrain":
        # Running calls fail (the direct call's child is killed, the request the worker held
        # finds no child to restart); the one still queued is cancelled.
        assert out == ["handler returned", "call failed: WorkerCrashed", "closed True models ['p']",
                       "['WorkerCrashed', 'cancelled'] True"]
    else:
        assert out == ["handler returned", "call returned direct", "closed False models []", "[0, 1] True"]


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_interpreter_exit_after_an_interrupted_drain_waits_for_it(tmp_path: Path, isolation: str) -> None:
    # The exit handler closed every runtime with drain=False while the interrupted close still
    # drained in the background: what was still queued was cancelled.
    log = tmp_path / "done.log"
    out = run_script(f"""
        rt = ap.Runtime()
        if {isolation!r} == "process":
            rt.add_model("m", factory="process_models:sleeper", isolation="process", max_queue=16)
        else:
            rt.add_model("m", model=lambda x: (time.sleep(x[0]), x)[1], max_queue=16)
        rt.start()
        rt.call("m", (0.0, "warm"))
        def record(f):
            with open({str(log)!r}, "a") as out:
                out.write("cancelled\\n" if f.cancelled() else f"{{f.result()[1]}}\\n")
        for i in range(4):
            rt.submit("m", (0.25, i)).add_done_callback(record)
        sigint_in(0.15)
        print(interrupted(lambda: rt.close(drain=True)) + "; exiting")
    """, tmp_path)
    assert out == ["interrupted; exiting"]
    assert sorted(log.read_text().split()) == ["0", "1", "2", "3"]


def test_sigint_in_a_direct_call_replaces_the_child_and_fails_that_request(tmp_path: Path) -> None:
    # The caller reads a direct call's reply itself: interrupted, the reply would be read by the
    # next request. As the README says, the child goes, the request counts as failed, and the
    # next call is served by a new child.
    out = run_script("""
        rt = ap.Runtime()
        rt.add_model("p", factory="process_models:sleeper", isolation="process")
        rt.start()
        first = rt.call("p", (0.0, "warm"))
        sigint_in(0.2)
        print(interrupted(lambda: rt.call("p", (1.0, "long"))))
        print("next", rt.call("p", (0.0, "next")))
        st = rt.stats()["p"]
        print("failed", st.failed, "completed", st.completed, "accounted", accounted(rt, "p"))
        rt.close()
    """, tmp_path)
    assert out[0] == "interrupted"
    assert out[1] == "next (0.0, 'next')"
    assert out[2] == "failed 1 completed 2 accounted True"
