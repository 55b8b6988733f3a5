"""Does batching cost a closed-loop client anything? A torch MLP (256-1024-1024-256, one thread
per instance, two instances) served without batching and with Batching(16, 2 ms), N closed-loop
clients calling rt.call, in one run.

    python bench/python/bench_batch_wait.py [--clients 1,8] [--seconds 3] [--rounds 1] [--label new]
        [--single-unbatched [true|false|none]]

Prints req/s and p50/p99 (ms) per configuration and the batching/no-batching throughput ratio.
The batching is ``Batching(16, 2 ms)``, whose default serves a batch of one unbatched for this
MLP (a ``torch.nn.Sequential`` of layers that treat each row alone); ``--single-unbatched
false`` gives every call a batch (the default before that rule), ``--single-unbatched`` alone
(or ``true``) sets it True.
With ``--rounds N`` each client count is measured N times, the order of the two
configurations alternating from round to round (a runtime started later in the process is not
always the one with batching), then the median ratio and p50s. Run it with two builds
(PYTHONPATH=<checkout>/python) to compare them.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import apportion as ap


def build(ctx: ap.InstanceContext):  # noqa: ANN201 - a factory
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 256)).eval()
    return net


def run(batching: ap.Batching | None, clients: int, seconds: float) -> tuple[float, float, float]:
    import torch

    rt = ap.Runtime()
    rt.add_model("mlp", factory=build, instances=2, threads=1, batching=batching, max_queue=256)
    rt.start()
    # Warmed by hand (older builds have no warmup=): both instances, batches of several sizes.
    for _ in range(3):
        for f in rt.submit_many("mlp", [torch.randn(256) for _ in range(16)]):
            f.result()
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        x = torch.randn(256)
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            rt.call("mlp", x)
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    rt.close()
    lat.sort()
    return len(lat) / elapsed, statistics.median(lat) * 1e3, lat[int(0.99 * (len(lat) - 1))] * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,8")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1, help="measurements per client count, order alternating")
    p.add_argument("--label", default="")
    p.add_argument("--single-unbatched", nargs="?", const="true", default="none", choices=("true", "false", "none"),
                   help="Batching's single_unbatched: true, false or none (the default: unbatched where the "
                        "model's layers treat each row alone)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    for n in (int(c) for c in args.clients.split(",")):
        ratios, p50s = [], []
        single = {"true": True, "false": False, "none": None}[args.single_unbatched]
        pair = (None, ap.Batching(16, 2.0, single_unbatched=single))
        for r in range(args.rounds):
            first_plain = r % 2 == 0
            got = {}
            for batching in (pair if first_plain else pair[::-1]):
                got[batching is not None] = run(batching, n, args.seconds)
            plain, batched = got[False], got[True]
            ratios.append(batched[0] / plain[0])
            p50s.append((plain[1], batched[1]))
            print(f"{args.label} clients={n}: no batching {plain[0]:7.0f} req/s p50 {plain[1]:.2f} p99 {plain[2]:.2f} ms | "
                  f"Batching(16, 2 ms) {batched[0]:7.0f} req/s p50 {batched[1]:.2f} p99 {batched[2]:.2f} ms | "
                  f"ratio {ratios[-1]:.2f}x ({'no batching' if first_plain else 'batching'} first)", flush=True)
        if args.rounds > 1:
            print(f"{args.label} clients={n}: median over {args.rounds} rounds: ratio {statistics.median(ratios):.2f}x, "
                  f"p50 {statistics.median(a for a, _ in p50s):.2f} -> {statistics.median(b for _, b in p50s):.2f} ms",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
