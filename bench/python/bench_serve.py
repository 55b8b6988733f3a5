"""Serving over the network: the no-op v2 HTTP round trip through tritonclient against
``apportion.serve.Server``, and against the least a v2 server can be, measured in the same run.

- ``apportion``: a Server (uvicorn + the v2 ASGI app) over a Runtime whose model returns its
  input; the request's FP32 tensor travels as binary data both ways (tritonclient's default).
  Also over gRPC (for reference; no baseline).
- ``echo``: a plain Starlette route on uvicorn (same HTTP implementation, httptools) that reads
  the body and sends it back with the header's "inputs" renamed "outputs": the request parses
  as its own v2 response, so the same client call is measured with no runtime, no tensor
  checks, no JSON work on the server.
- ``dispatch``: in-process ASGI calls (no socket) of GET /v2/health/ready on the v2 app and on a
  Starlette app with one route doing the same: what the framework itself costs per request,
  which is why app.py is a plain ASGI callable.

Each server runs in a process of its own (a server in the client's process would wait for the
client's GIL); rounds alternate between them; the table reports p50/p90/p99 over all rounds
and the ratio of p50s.

    PYTHONPATH=python python bench/python/bench_serve.py [--rounds 10] [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np


# -- servers (child processes) ---------------------------------------------------------------------
def serve_apportion() -> None:
    import apportion as ap
    from apportion.serve import Server, Signature, TensorSpec

    rt = ap.Runtime()
    rt.add_model("noop", model=lambda x: x)
    rt.start()
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("x", "FP32", [-1])])
    server = Server(rt, {"noop": sig}, http_port=0, grpc_port=0)
    import threading

    def report() -> None:
        server.listening.wait(60)
        print(json.dumps({"http": server.http_port, "grpc": server.grpc_port}), flush=True)

    threading.Thread(target=report, daemon=True).start()
    server.serve_forever()
    rt.close()


def echo_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        body = await request.body()
        n = int(request.headers.get("inference-header-content-length", len(body)))
        head = body[:n].replace(b'"inputs"', b'"outputs"', 1)
        return Response(head + body[n:], media_type="application/octet-stream",
                        headers={"inference-header-content-length": str(len(head))})

    async def ready(request: Request) -> Response:
        return Response(b"", media_type="application/json")

    return Starlette(routes=[Route("/v2/models/{m}/infer", infer, methods=["POST"]),
                             Route("/v2/health/ready", ready)])


def serve_echo() -> None:
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts
    print(json.dumps({"http": sock.getsockname()[1]}), flush=True)
    config = uvicorn.Config(echo_app(), lifespan="off", log_config=None, log_level="warning",
                            access_log=False, http="httptools")
    uvicorn.Server(config).run(sockets=[sock])


# -- client ----------------------------------------------------------------------------------------
def start(kind: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", kind],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def round_trips(client: Any, mod: Any, model: str, n: int) -> list[float]:
    x = np.arange(4, dtype=np.float32)
    inp = mod.InferInput("x", [4], "FP32")
    inp.set_data_from_numpy(x)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.infer(model, [inp])
        out.append(time.perf_counter() - t)
    assert np.array_equal(r.as_numpy("x"), x)
    return out


def dispatch(n: int) -> dict[str, float]:
    import apportion as ap
    from apportion.serve import asgi

    rt = ap.Runtime()
    apps = {"v2 app (plain ASGI)": asgi(rt, {}), "Starlette route": echo_app()}
    scope = {"type": "http", "method": "GET", "path": "/v2/health/ready", "headers": [],
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        pass

    async def run(app: Any) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                await app(dict(scope), receive, send)
            times.append((time.perf_counter() - t) / n)
        return min(times)

    out = {name: asyncio.run(run(app)) for name, app in apps.items()}
    rt.close()
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap_.add_argument("--rounds", type=int, default=10)
    ap_.add_argument("--n", type=int, default=200, help="round trips per server per round")
    ap_.add_argument("--child", choices=["apportion", "echo"], help=argparse.SUPPRESS)
    args = ap_.parse_args()
    if args.child == "apportion":
        return serve_apportion()
    if args.child == "echo":
        return serve_echo()

    import tritonclient.grpc as tg
    import tritonclient.http as th

    ours, ours_ports = start("apportion")
    echo, echo_ports = start("echo")
    try:
        clients = {
            "apportion HTTP": (th.InferenceServerClient(f"127.0.0.1:{ours_ports['http']}"), th, "noop"),
            "Starlette echo HTTP": (th.InferenceServerClient(f"127.0.0.1:{echo_ports['http']}"), th, "noop"),
            "apportion gRPC": (tg.InferenceServerClient(f"127.0.0.1:{ours_ports['grpc']}"), tg, "noop"),
        }
        samples: dict[str, list[float]] = {k: [] for k in clients}
        for c, mod, model in clients.values():  # warm up connections and code paths
            round_trips(c, mod, model, 50)
        for _ in range(args.rounds):
            for name, (c, mod, model) in clients.items():
                samples[name] += round_trips(c, mod, model, args.n)
    finally:
        for p in (ours, echo):
            p.terminate()
            p.wait(30)
    print(f"# no-op v2 round trip, tritonclient, {args.rounds} rounds x {args.n} "
          f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})")
    print("| server | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, xs in samples.items():
        print(f"| {name} | {pct(xs, .5):.3f} | {pct(xs, .9):.3f} | {pct(xs, .99):.3f} |")
    ratio = statistics.median(samples["apportion HTTP"]) / statistics.median(samples["Starlette echo HTTP"])
    print(f"\napportion HTTP p50 / Starlette echo p50 = {ratio:.2f}")
    d = dispatch(2000)
    print("\n| in-process ASGI dispatch, GET /v2/health/ready | µs per request |")
    print("|---|---|")
    for name, s in d.items():
        print(f"| {name} | {s * 1e6:.1f} |")


if __name__ == "__main__":
    main()
