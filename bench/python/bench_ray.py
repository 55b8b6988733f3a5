"""apportion on Ray against plain Ray Serve, on a local two-node Ray cluster, in one run.

- ``plan``: :func:`apportion.ray.plan` for 1,000 models (1-4 cores, two replicas each) on 100
  nodes of 64 cores: seconds per plan (median of 5).
- ``round trip``: a no-op model, 300 sequential calls per round, rounds alternating: through
  ``apportion.ray.Cluster.call`` (one actor per node, Ray actor call) and through a plain Serve
  deployment's handle (``handle.remote(x).result()``). p50/p99 and the ratio of p50s.
- ``goodput``: the demo's three torch models (``apportion.demo``: mlp, conv, encoder; its
  shares and p99 SLOs) under one open-loop Poisson load, each request counted as good when it
  completed within its model's SLO; per model and in total, requests/s. Both sides get the same
  two worker nodes of 2 CPUs each (Ray's logical count) and one intra-op thread per model:

  * ``serve``: one plain Serve deployment per model (``num_cpus=1``, so Ray sets its OMP
    threads to 1; the model in ``torch.inference_mode``), placed by Ray, called through handles;
  * ``apportion``: one :class:`apportion.ray.Cluster` of the same models (one core each,
    exclusive, one thread; ``timeout_ms`` = SLO; warm-up with the model's input), planned onto
    the nodes, called with ``Cluster.infer``;
  * ``apportion+batch``: the same with the runtime's batching (``max_size=8``).

  One driver coroutine sends every request (the same generator, seed and inputs for each side).

This machine has 2 CPUs, so both worker nodes' CPU sets are "0-1": the nodes share the real
cores, and the driver, the Ray daemons and the models all run on them. The figures compare the
two sides in one run; they are not a cluster's absolute numbers.

    python bench/python/bench_ray.py [--seconds 20] [--rate R] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1 (read when ray is imported)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, str(HERE))

MODELS = ("mlp", "conv", "encoder")


def noop(ctx: Any = None) -> Any:
    return lambda x: x


# -- plan ------------------------------------------------------------------------------------------
def bench_plan() -> float:
    import apportion as ap
    from apportion.ray import Node, plan

    specs = [ap.ModelSpec(f"m{i:04d}", factory="bench_ray:noop", cores=1 + i % 4, isolation="exclusive")
             for i in range(1000)]
    nodes = [Node(f"n{i:03d}", 64) for i in range(100)]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        plan(specs, nodes, replicas=2)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- the cluster -----------------------------------------------------------------------------------
def start_cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    store = 200 * 2**20
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store,
                                                      "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=2, labels={"apportion-cpus": "0-1"}, object_store_memory=store)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    return c


def serve_start() -> None:
    from ray import serve

    serve.start(proxy_location="Disabled", logging_config={"log_level": "ERROR"})


class ServeModel:
    """A plain Serve replica of one demo model, as a Serve user writes it."""

    def __init__(self, name: str) -> None:
        import torch

        from apportion import demo

        self.model = getattr(demo, f"build_{name}")()
        self.model.eval()
        self.torch = torch

    def __call__(self, x: Any) -> Any:
        with self.torch.inference_mode():
            return self.model(x)


class ServeNoop:
    def __call__(self, x: Any) -> Any:
        return x


def serve_handles(names: tuple[str, ...]) -> dict[str, Any]:
    from ray import serve

    out = {}
    for n in names:
        cls = ServeNoop if n == "noop" else ServeModel
        app = serve.deployment(cls, name=n, ray_actor_options={"num_cpus": 1}).bind(*(() if n == "noop" else (n,)))
        out[n] = serve.run(app, name=n, route_prefix=None)
    return out


def serve_stop() -> None:
    from ray import serve

    serve.shutdown()


def apportion_cluster(batch: bool) -> Any:
    import apportion as ap
    from apportion.demo import SLO_MS
    from apportion.ray import Cluster

    specs = [ap.ModelSpec(n, factory=f"apportion.demo:build_{n}", cores=1, isolation="exclusive", threads=1,
                          max_queue=64, timeout_ms=SLO_MS[n], warmup=f"apportion.demo:{n}_input",
                          batching=ap.Batching(max_size=8, max_delay_ms=0.0) if batch else None)
             for n in MODELS]
    return Cluster(specs)


# -- round trips -------------------------------------------------------------------------------------
def round_trips(call: Any, n: int) -> list[float]:
    for _ in range(20):
        call()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_round_trip(rounds: int, n: int) -> dict[str, list[float]]:
    import apportion as ap
    from apportion.ray import Cluster

    got: dict[str, list[float]] = {"apportion": [], "serve": []}
    for _ in range(rounds):
        with Cluster([ap.ModelSpec("noop", factory="bench_ray:noop")]) as c:
            got["apportion"] += round_trips(lambda: c.call("noop", 1), n)
        serve_start()
        h = serve_handles(("noop",))["noop"]
        got["serve"] += round_trips(lambda: h.remote(1).result(), n)
        serve_stop()
    return got


# -- goodput ----------------------------------------------------------------------------------------
async def open_loop(send: Any, rate: float, seconds: float, seed: int) -> dict[str, tuple[int, int]]:
    """Poisson arrivals at ``rate``; returns (sent, good) per model."""
    from apportion.demo import SHARES, SLO_MS, conv_input, encoder_input, mlp_input

    inputs = {"mlp": mlp_input(), "conv": conv_input(), "encoder": encoder_input()}
    rng = random.Random(seed)
    names = list(SHARES)
    weights = [SHARES[n] for n in names]
    counts = {n: [0, 0] for n in names}
    loop = asyncio.get_running_loop()

    async def one(name: str) -> None:
        t = time.perf_counter()
        try:
            await send(name, inputs[name])
        except Exception:  # noqa: BLE001 - a failed request is simply not good
            return
        if (time.perf_counter() - t) * 1000.0 <= SLO_MS[name]:
            counts[name][1] += 1

    tasks = []
    start = loop.time()
    at = start
    while True:
        at += rng.expovariate(rate)
        if at - start > seconds:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        name = rng.choices(names, weights)[0]
        counts[name][0] += 1
        tasks.append(asyncio.ensure_future(one(name)))
    await asyncio.gather(*tasks)
    return {n: (s, g) for n, (s, g) in counts.items()}


def bench_goodput(rate: float, seconds: float) -> dict[str, dict[str, tuple[int, int]]]:
    from apportion.demo import SLO_MS

    out = {}
    serve_start()
    handles = serve_handles(MODELS)

    async def via_serve(name: str, x: Any) -> Any:
        return await handles[name].remote(x)

    asyncio.run(open_loop(via_serve, rate, 2.0, seed=0))  # warm-up
    out["serve"] = asyncio.run(open_loop(via_serve, rate, seconds, seed=1))
    serve_stop()
    for label, batch in (("apportion", False), ("apportion+batch", True)):
        with apportion_cluster(batch) as c:
            async def via_cluster(name: str, x: Any, c: Any = c) -> Any:
                return await c.infer(name, x, timeout_ms=SLO_MS[name])

            asyncio.run(open_loop(via_cluster, rate, 2.0, seed=0))
            out[label] = asyncio.run(open_loop(via_cluster, rate, seconds, seed=1))
    return out


def main() -> None:
    import logging

    logging.getLogger("ray").setLevel(logging.ERROR)  # Serve's router warns on a busy host
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="length of each goodput run")
    p.add_argument("--rate", type=float, default=200.0,
                   help="total requests/s offered (default 200: about a quarter of the demo's one-thread "
                        "capacity of this 2-CPU machine when quiet, well past what plain Serve handles here)")
    p.add_argument("--rounds", type=int, default=3, help="round-trip rounds per side")
    p.add_argument("--n", type=int, default=300, help="round trips per round")
    a = p.parse_args()

    from apportion.demo import SHARES, SLO_MS, single_thread_ms

    t_plan = bench_plan()
    ms = single_thread_ms()
    capacity = 2 * 1000.0 / sum(SHARES[n] * ms[n] for n in SHARES)
    rate = a.rate
    print(f"plan: 1,000 models x 2 replicas on 100 nodes: {t_plan * 1000:.1f} ms (median of 5)")
    print(f"one-thread ms per request: " + ", ".join(f"{n} {v:.2f}" for n, v in ms.items())
          + f"; 2-CPU capacity {capacity:.0f} req/s; offered {rate:g} req/s")

    cluster = start_cluster()
    try:
        rt = bench_round_trip(a.rounds, a.n)
        print(f"\nno-op round trip, {a.rounds} x {a.n} per side (us):")
        print(f"{'path':<24}{'p50':>9}{'p90':>9}{'p99':>9}")
        for k, label in (("apportion", "Cluster.call"), ("serve", "Serve handle")):
            print(f"{label:<24}{pct(rt[k], .5):>9.0f}{pct(rt[k], .9):>9.0f}{pct(rt[k], .99):>9.0f}")
        print(f"ratio of p50s (apportion / Serve): {pct(rt['apportion'], .5) / pct(rt['serve'], .5):.2f}")

        res = bench_goodput(rate, a.seconds)
        print(f"\ngoodput at the demo's SLOs, {rate:g} req/s offered for {a.seconds:g} s (req/s within SLO):")
        print(f"{'side':<18}" + "".join(f"{n + ' (' + format(SLO_MS[n], 'g') + ' ms)':>20}" for n in MODELS)
              + f"{'total':>10}{'of offered':>12}")
        totals = {}
        for side, per in res.items():
            good = sum(g for _, g in per.values())
            sent = sum(s for s, _ in per.values())
            totals[side] = good / a.seconds
            print(f"{side:<18}" + "".join(f"{per[n][1] / a.seconds:>20.1f}" for n in MODELS)
                  + f"{good / a.seconds:>10.1f}{good / max(sent, 1):>12.0%}")
        for side in ("apportion", "apportion+batch"):
            print(f"goodput ratio {side} / serve: {totals[side] / max(totals['serve'], 1e-9):.2f}")
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
