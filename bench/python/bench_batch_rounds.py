"""Closed-loop clients answered together: are their rounds served in one batch?

N clients (threads) resubmit together after a barrier, round after round, to one model whose
call takes 20 ms whatever its batch size, with Batching(16, 50 ms). A round is best served by
one call of N, dispatched as soon as the N-th request is in. After some learning rounds, this
counts the calls per round and the requests that waited for max_delay (queue wait over 40 ms),
over several fresh runtimes.

    python bench/python/bench_batch_rounds.py [--clients 4] [--trials 12] [--label new]

Run it with two builds (PYTHONPATH=<build>) to compare them.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import apportion as ap

LEARNING, ROUNDS, DELAY_MS, CALL_S = 5, 10, 50.0, 0.02


class Flat:
    """A call of any batch size takes CALL_S."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        time.sleep(CALL_S)
        return xs


def held(rt: ap.Runtime) -> int:
    h = rt.stats()["m"].queue_wait.histogram
    assert h is not None
    return sum(c for c, upper in zip(h.counts, h.upper_bounds) if upper > 0.8 * DELAY_MS * 1e6)


def trial(clients: int) -> tuple[int, int]:
    """Calls, and requests held for max_delay, in the rounds after the learning ones."""
    rt = ap.Runtime()
    model = Flat()
    rt.add_model("m", model=model, batching=ap.Batching(max_size=16, max_delay_ms=DELAY_MS))
    rt.start()
    mark: list[int] = []
    started = [0]

    def next_round() -> None:
        if started[0] == LEARNING:
            mark.extend((len(model.sizes), held(rt)))
        started[0] += 1

    go = threading.Barrier(clients, action=next_round)

    def client(i: int) -> None:
        for _ in range(LEARNING + ROUNDS):
            go.wait(30)
            rt.call("m", i, timeout_ms=10_000)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        return len(model.sizes) - mark[0], held(rt) - mark[1]
    finally:
        rt.close()


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--clients", type=int, default=4)
    ap_.add_argument("--trials", type=int, default=12)
    ap_.add_argument("--label", default="")
    a = ap_.parse_args()
    calls, waited = [], []
    for _ in range(a.trials):
        c, w = trial(a.clients)
        calls.append(c)
        waited.append(w)
    print(f"{a.label} clients={a.clients}: calls per {ROUNDS} rounds {calls} (median "
          f"{statistics.median(calls)}; best {ROUNDS}); requests that waited max_delay {waited} "
          f"(median {statistics.median(waited)} of {ROUNDS * a.clients})")


if __name__ == "__main__":
    main()
