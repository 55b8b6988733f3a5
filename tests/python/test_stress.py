"""Exactly-once under stress: over 200k requests over 4 models with random model exceptions,
cancellations, expiring deadlines and a close() in the middle. Every future completes exactly
once, and the outcome counts add up to what was submitted."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

import apportion as ap

TOTAL = 300_000
CLOSE_AFTER = 200_000  # the close() lands after at least this many were submitted
MODELS = {"a": 2, "b": 1, "c": 2, "d": 1}


def model_fn(x: int) -> int:
    if x % 13 == 0:
        raise ValueError(x)
    if x % 997 == 0:
        time.sleep(0.0005)  # a slow request now and then lets queues build up and deadlines pass
    return x


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "drain"), [(1, True), (2, False), (3, True)])
def test_every_request_completes_exactly_once(seed: int, drain: bool) -> None:
    rng = random.Random(seed)
    rt = ap.Runtime()
    for name, inst in MODELS.items():
        rt.add_model(name, model=model_fn, instances=inst, max_queue=4096)
    rt.start()

    completions = bytearray(TOTAL)  # callbacks per request id: must end at exactly 1
    over = []
    futures: dict[int, ap.Future] = {}
    rejected = Counter()
    submitted_ids = Counter()
    lock = threading.Lock()
    half = threading.Event()
    next_id = iter(range(TOTAL))
    id_lock = threading.Lock()

    def on_done(i: int):
        def cb(_f):
            completions[i] += 1
            if completions[i] > 1:
                over.append(i)
        return cb

    def submitter(tid: int) -> None:
        r = random.Random(seed * 100 + tid)
        closed = False
        while not closed:
            with id_lock:
                ids = [i for _, i in zip(range(r.choice((1, 1, 8, 64))), next_id)]
            if not ids:
                return
            if ids[-1] >= CLOSE_AFTER:
                half.set()
            name = r.choice(tuple(MODELS))
            timeout = 0.05 if r.random() < 0.05 else None
            try:
                if len(ids) == 1:
                    futs = [rt.submit(name, ids[0], timeout_ms=timeout)]
                else:
                    futs = rt.submit_many(name, ids, timeout_ms=timeout)
            except ap.QueueFull:
                with lock:
                    rejected[name] += len(ids)
                    submitted_ids[name] += len(ids)
                time.sleep(0.0005)
                continue
            except ap.RuntimeClosed:
                with lock:
                    rejected[name] += len(ids)
                    submitted_ids[name] += len(ids)
                closed = True
                continue
            for i, f in zip(ids, futs):
                f.add_done_callback(on_done(i))
                if r.random() < 0.05:
                    f.cancel()
            with lock:
                futures.update(zip(ids, futs))
                submitted_ids[name] += len(ids)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    assert half.wait(120)
    rt.close(drain=drain)
    for t in threads:
        t.join(120)
        assert not t.is_alive()

    assert over == []
    outcomes = {n: Counter() for n in MODELS}
    for i, f in futures.items():
        assert f.done(), f"request {i} never completed"
        assert completions[i] == 1, f"request {i} completed {completions[i]} times"
        if f.cancelled():
            kind = "cancelled"
        else:
            exc = f.exception(0)
            kind = ("completed" if exc is None else
                    "expired" if isinstance(exc, ap.DeadlineExceeded) else
                    "failed" if isinstance(exc, ValueError) else repr(exc))
        outcomes[f.model][kind] += 1

    stats = rt.stats()
    total_submitted = 0
    for name in MODELS:
        s = stats[name]
        o = outcomes[name]
        assert s.in_flight == 0 and s.queued == 0
        assert s.submitted == submitted_ids[name]
        assert s.rejected == rejected[name]
        assert (s.completed, s.failed, s.expired, s.cancelled) == (
            o["completed"], o["failed"], o["expired"], o["cancelled"]), (name, s, o)
        assert set(o) <= {"completed", "failed", "expired", "cancelled"}
        assert s.completed + s.failed + s.rejected + s.expired + s.cancelled == s.submitted
        total_submitted += s.submitted
    assert total_submitted == sum(submitted_ids.values())
    assert len(futures) + sum(rejected.values()) == total_submitted
    # the run really exercised every path
    every = sum(outcomes.values(), Counter())
    assert total_submitted >= CLOSE_AFTER
    assert every["completed"] > 0 and every["failed"] > 0 and every["cancelled"] > 0
    assert every["expired"] > 0
