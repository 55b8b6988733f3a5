"""When the OS refuses a thread (no memory for its stack, a pids limit): start(), add_model() and
apply() fail naming the model and the limit, leave nothing half started, and every request
completes. Each case runs in a child process whose address space is capped just above what it
uses (RLIMIT_AS applies to root too), so that only a few more thread stacks fit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

PRELUDE = """
import json, resource, sys, time
from concurrent.futures import CancelledError
import apportion as ap

def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

def cap(extra_mib):
    # Soft limit only: lift() raises it back (to the hard limit) for the part after the failure.
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (extra_mib << 20), hard))

def lift():
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))

out = {}
"""


def run(body: str) -> dict:
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_start_fails_the_models_whose_threads_were_refused_and_cancels_their_requests() -> None:
    # start() raised a bare RuntimeError half way, left every model registered (a second
    # start() did nothing), and requests to models with no worker waited for ever.
    out = run("""
        rt = ap.Runtime()
        for i in range(40):
            rt.add_model(f"m{i}", model=lambda x: x, instances=4)
        queued = {f"m{i}": rt.submit(f"m{i}", i) for i in range(40)}
        cap(48)
        try:
            rt.start()
            out["raised"] = None
        except ap.ApportionError as e:
            out["raised"] = str(e)
            out["notes"] = list(getattr(e, "__notes__", []))
        lift()
        out["left"] = rt.models
        outcomes = {}
        for name, f in queued.items():
            try:
                outcomes[name] = f.result(timeout=10)
            except CancelledError:
                outcomes[name] = "cancelled"
        out["outcomes"] = outcomes
        t = time.monotonic()
        rt.close()
        out["close_s"] = time.monotonic() - t
    """)
    assert out["raised"] is not None and "the OS refused the thread of instance" in out["raised"]
    assert "could not start" in out["raised"] and "ulimit" in out["raised"]
    left = set(out["left"])
    failed = {f"m{i}" for i in range(40)} - left
    assert failed and len(out["notes"]) == len(failed) - 1  # the first is the error, the others notes
    assert all("failed to start too and was removed" in n for n in out["notes"])
    # Every request completed once: served (a failed model's workers that did start serve
    # until it is stopped) or cancelled, never left waiting; a model left serves its own.
    assert set(out["outcomes"]) == {f"m{i}" for i in range(40)}
    for name, outcome in out["outcomes"].items():
        assert outcome in (("cancelled", int(name[1:])) if name in failed else (int(name[1:]),)), (name, outcome)
    assert "cancelled" in out["outcomes"].values()
    assert out["close_s"] < 10


def test_a_move_whose_new_threads_are_refused_leaves_the_old_placement_serving() -> None:
    # apply() raised half way and the new workers it had started waited at their gate for
    # ever: close() then never returned.
    out = run("""
        def plus_one(x):
            return x + 1

        rt = ap.Runtime()
        rt.add_model("base", model=plus_one, instances=1)
        rt.start()
        cap(48)
        try:
            rt.apply([ap.ModelSpec("base", model=plus_one, instances=100)])
            out["raised"] = None
        except ap.ApportionError as e:
            out["raised"] = str(e)
        lift()
        out["served"] = rt.call("base", 1, timeout_ms=5000)
        out["instances"] = rt.stats()["base"].instances
        t = time.monotonic()
        rt.close(drain=False)
        out["close_s"] = time.monotonic() - t
    """)
    assert out["raised"] is not None and "model 'base' could not start: the OS refused the thread" in out["raised"]
    assert out["served"] == 2 and out["instances"] == 1
    assert out["close_s"] < 10


def test_add_model_whose_threads_are_refused_leaves_nothing_registered() -> None:
    # It raised, yet the model stayed registered, serving with fewer workers than asked, and
    # could not be added again ("already registered").
    out = run("""
        rt = ap.Runtime()
        rt.add_model("base", model=lambda x: x, instances=1)
        rt.start()
        cap(48)
        try:
            rt.add_model("new", model=lambda x: x * 3, instances=100)
            out["raised"] = None
        except ap.ApportionError as e:
            out["raised"] = str(e)
        out["models"] = rt.models
        lift()
        rt.add_model("new", model=lambda x: x * 3, instances=2)
        out["again"] = rt.call("new", 2, timeout_ms=5000)
        rt.close()
    """)
    assert out["raised"] is not None and "model 'new' could not start" in out["raised"]
    assert out["models"] == ["base"] and out["again"] == 6


def test_a_draining_close_from_the_main_thread_closes_inline_when_no_thread_is_left() -> None:
    # From the main thread close(drain=True) waits on a thread of its own (so that Ctrl-C
    # interrupts the wait); when the OS refused it, close raised and left the runtime open.
    out = run("""
        import threading
        rt = ap.Runtime()
        rt.add_model("base", model=lambda x: x, instances=1)
        rt.start()
        f = rt.submit("base", 5)
        cap(0)
        hogs = []
        try:  # take every stack that still fits
            for _ in range(200):
                t = threading.Thread(target=time.sleep, args=(30,), daemon=True)
                t.start()
                hogs.append(t)
        except RuntimeError:
            pass
        rt.close()
        lift()
        out["closed"] = rt.closed
        out["result"] = f.result(timeout=10)
    """)
    assert out == {"closed": True, "result": 5}


def test_a_queue_that_does_not_fit_in_memory_names_its_model() -> None:
    # The queue's cells are allocated when the model is added: std::bad_alloc read as a bare
    # MemoryError('std::bad_alloc').
    out = run("""
        rt = ap.Runtime()
        cap(64)
        try:
            rt.add_model("ranker", model=lambda x: x, max_queue=2**20)  # ~128 MiB of cells
            out["raised"] = None
        except MemoryError as e:
            out["raised"] = str(e)
        lift()
        out["models"] = rt.models
        rt.add_model("ranker", model=lambda x: x, max_queue=2**20)
        rt.start()
        out["served"] = rt.call("ranker", 7)
        rt.close()
    """)
    assert out["raised"] is not None and out["raised"].startswith("model 'ranker': no memory for its queue (max_queue=1048576")
    assert out["models"] == [] and out["served"] == 7
