"""Every admin call racing submissions from several threads for at least 10 s: add_model,
remove_model, submit, submit_many from generators, and close, with done-callbacks that call back
into the runtime. No crash, no hang, and every accepted request completes exactly once."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import apportion as ap

NAMES = ("a", "b", "c")
DURATION_S = 10.0

def test_admin_calls_racing_submissions_keep_exact_accounting(tally: Any) -> None:
    rt = ap.Runtime()
    rt.start()
    stop = threading.Event()
    lock = threading.Lock()
    futures: list[ap.Future] = []
    unexpected: list[BaseException] = []
    counts = {"added": 0, "removed": 0, "refused": 0, "callback_calls": 0}

    def keep(futs: list[ap.Future]) -> None:
        with lock:
            futures.extend(futs)

    def callback_into_runtime(fut: ap.Future) -> None:
        # What a done-callback may do: submit more work, read stats, try admin calls (refused
        # from a worker or from inside close, never a deadlock).
        name = random.choice(NAMES)
        try:
            keep([tally.watch(rt.submit(name, 0))])
        except (ap.ModelNotFound, ap.RuntimeClosed, ap.QueueFull):
            pass
        rt.stats()
        try:
            rt.remove_model(name)
        except (ap.ModelNotFound, ap.ApportionError):
            pass
        with lock:
            counts["callback_calls"] += 1

    def admin(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            name = rng.choice(NAMES)
            try:
                if rng.random() < 0.5:
                    rt.add_model(name, model=lambda x: x, instances=rng.randint(1, 2), max_queue=64)
                    counts["added"] += 1
                else:
                    rt.remove_model(name, drain=rng.random() < 0.5)
                    counts["removed"] += 1
            except (ap.ModelNotFound, ap.RuntimeClosed):
                pass
            except ValueError as e:
                if "already registered" not in str(e):
                    unexpected.append(e)
            except BaseException as e:  # noqa: BLE001 - collected and asserted on
                unexpected.append(e)

    def submitter(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            name = rng.choice(NAMES)
            try:
                if rng.random() < 0.3:
                    def gen() -> Any:
                        for i in range(rng.randint(1, 8)):
                            if rng.random() < 0.05:
                                try:
                                    rt.remove_model(name)  # during the iteration
                                except (ap.ModelNotFound, ap.ApportionError):
                                    pass
                            yield i
                    futs = rt.submit_many(name, gen())
                else:
                    futs = [rt.submit(name, 1)]
                for f in futs:
                    tally.watch(f)
                    if rng.random() < 0.1:
                        f.add_done_callback(callback_into_runtime)
                keep(futs)
            except (ap.ModelNotFound, ap.RuntimeClosed, ap.QueueFull):
                counts["refused"] += 1
            except BaseException as e:  # noqa: BLE001 - collected and asserted on
                unexpected.append(e)

    threads = [threading.Thread(target=admin, args=(s,)) for s in (1, 2)]
    threads += [threading.Thread(target=submitter, args=(s,)) for s in (3, 4)]
    for t in threads:
        t.start()
    time.sleep(DURATION_S)
    closer = threading.Thread(target=rt.close, kwargs={"drain": False})
    closer.start()  # closes while every thread still runs
    time.sleep(0.05)
    stop.set()
    for t in [*threads, closer]:
        t.join(60)
        assert not t.is_alive(), "a thread hung"
    rt.close()

    assert not unexpected, unexpected[:5]
    assert counts["added"] > 10 and counts["removed"] > 10, counts
    with lock:
        snapshot = list(futures)
    assert snapshot
    assert all(f.done() for f in snapshot)  # close() returned: nothing is left pending
    with tally.lock:
        assert [tally.done[id(f)] for f in snapshot] == [1] * len(snapshot)
    for f in snapshot:
        if not f.cancelled():
            assert f.exception(0) is None

