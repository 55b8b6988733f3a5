"""How late does a queued request learn that its deadline passed, while every instance is busy?

    python bench/python/bench_expiry.py [--n 500] [--reps 3]

One instance held in a 1 s call; N requests queued behind it with deadlines spread over
5-100 ms; each one's lateness is the time from its deadline to its done-callback (which runs
once it completed with DeadlineExceeded). Prints p50/p99/max lateness in ms per rep.
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import apportion as ap


def rep(n: int, seed: int) -> list[float]:
    release = threading.Event()
    rt = ap.Runtime()
    rt.add_model("m", model=lambda x: release.wait(5) and x, max_queue=4 * n)
    rt.start()
    blocker = rt.submit("m", 0)
    time.sleep(0.05)  # the instance is in its call
    rng = random.Random(seed)
    late: list[float] = []
    lock = threading.Lock()
    for _ in range(n):
        timeout_ms = rng.uniform(5.0, 100.0)
        due = time.perf_counter() + timeout_ms / 1000.0

        def done(f: ap.Future, due: float = due) -> None:
            t = time.perf_counter()
            if isinstance(f.exception(0), ap.DeadlineExceeded):
                with lock:
                    late.append((t - due) * 1000.0)

        rt.submit("m", 1, timeout_ms=timeout_ms).add_done_callback(done)
    time.sleep(0.3)  # every deadline has passed
    release.set()
    blocker.result(10)
    rt.close()
    return sorted(late)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    for r in range(args.reps):
        late = rep(args.n, r)
        q = lambda f: late[min(len(late) - 1, int(f * len(late)))]  # noqa: E731
        print(f"rep {r}: {len(late)}/{args.n} expired before the busy call ended; lateness ms "
              f"p50 {q(0.5):.3f} p99 {q(0.99):.3f} max {late[-1]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
