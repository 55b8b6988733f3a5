"""LitServe serving bench/peers/models.py behind a v2 JSON adapter (LitServe's own protocol
is a JSON body per route): POST /v2/models/{m}/infer is each model's LitAPI route, and
GET /v2/models/{m} answers the model's v2 metadata.

    python serve_litserve.py PORT '{"mlp256": {"instances": 2, "batch": 1, "delay_ms": 0}}'
"""

from __future__ import annotations

import json
import sys
from typing import Any

import litserve as ls
import numpy as np

import models
import v2json


class V2API(ls.LitAPI):
    def __init__(self, name: str, batch: int, delay_ms: float) -> None:
        super().__init__(api_path=f"/v2/models/{name}/infer", max_batch_size=batch,
                         batch_timeout=delay_ms / 1000.0)
        self.name = name

    def setup(self, device: Any) -> None:
        import torch

        torch.set_num_threads(1)  # one thread per worker (replica)
        self.run = models.runner(self.name)

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe passes the JSON body
        return v2json.decode(request)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return [output[i:i + 1] for i in range(len(output))]

    def encode_response(self, y: np.ndarray) -> dict[str, Any]:
        return v2json.encode(self.name, y)


def main(port: int, config: dict[str, dict[str, Any]]) -> None:
    apis = [V2API(n, int(c.get("batch", 1)), float(c.get("delay_ms", 0.0))) for n, c in config.items()]
    workers = [int(c.get("instances", 1)) for c in config.values()]
    server = ls.LitServer(apis, accelerator="cpu", devices=1,
                          workers_per_device=workers if len(workers) > 1 else workers[0])
    for name in config:
        meta = models.signature(name)
        server.app.add_api_route(f"/v2/models/{name}", lambda meta=meta: meta, methods=["GET"])
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
