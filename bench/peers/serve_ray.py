"""Ray Serve serving bench/peers/models.py over HTTP behind a v2 JSON adapter (Ray Serve's
HTTP is whatever the deployment's FastAPI app says): one application per model at
route_prefix /v2/models/{m}, answering GET (v2 metadata) and POST /infer (JSON tensors, or
binary tensor data: the response in the form the client asked for).
Replicas run one torch thread each; batching through @serve.batch; with "max_queue" (the
demo's models) Ray Serve's max_queued_requests bounds the requests waiting for a replica (Ray
Serve has no per-request timeout on this path: a late answer counts as late).

    python serve_ray.py PORT '{"mlp256": {"instances": 2, "batch": 1, "delay_ms": 0}}' CPUS TEMP_DIR
"""



import json
import signal
import sys
import threading
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request, Response
from ray import serve

import models
import v2json


def deployment(name: str, instances: int, batch: int, delay_ms: float, max_queue: int) -> Any:
    app = FastAPI()

    # max_queued_requests (-1: no bound): Ray Serve's own bound on the requests waiting for a
    # replica; more are refused at once (503, "Request dropped due to backpressure").
    @serve.deployment(name=name, num_replicas=instances, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=64, max_queued_requests=max_queue)
    @serve.ingress(app)
    class Model:
        def __init__(self) -> None:
            import torch

            torch.set_num_threads(1)
            self.run = models.runner(name)

        @app.get("/")
        def metadata(self) -> dict[str, Any]:
            return models.signature(name)

        @serve.batch(max_batch_size=max(1, batch), batch_wait_timeout_s=delay_ms / 1000.0)
        async def batched(self, xs: list[np.ndarray]) -> list[np.ndarray]:
            y = self.run(np.concatenate(xs))
            return [y[i:i + 1] for i in range(len(xs))]

        @app.post("/infer")
        async def infer(self, request: Request) -> Any:
            length = request.headers.get(v2json.HEADER)
            x, binary = v2json.decode_body(await request.body(), None if length is None else int(length))
            y = await self.batched(x) if batch > 1 else self.run(x)
            if not binary:
                return Response(v2json.dumps(v2json.encode(name, y)), media_type="application/json")
            body, head = v2json.encode_binary(name, y)
            return Response(body, media_type="application/octet-stream", headers={v2json.HEADER: str(head)})

    return Model.bind()


def main(port: int, config: dict[str, dict[str, Any]], cpus: int, temp_dir: str) -> None:
    # address="local": a cluster of its own, never one another process on this machine started
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, c in config.items():
        serve.run(deployment(name, int(c.get("instances", 1)), int(c.get("batch", 1)),
                             float(c.get("delay_ms", 0.0)), int(c.get("max_queue", -1))),
                  name=name, route_prefix=f"/v2/models/{name}")
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    # The cluster is this process's own (address="local"): stopping it stops the applications
    # with it. serve.shutdown() first took over 30 s here, the runner's grace before SIGKILL.
    ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
