"""LitServe serving bench/peers/models.py behind a v2 adapter (LitServe's own protocol is a
request body per route): POST /v2/models/{m}/infer is each model's LitAPI route, and
GET /v2/models/{m} answers the model's v2 metadata.

The route takes both of the client's encodings. LitServe hands the API what FastAPI parsed from
the body (the JSON document for a JSON body, the raw bytes for the binary tensor data
extension's ``application/octet-stream`` body) and not the request's headers, so a binary
body's JSON part is found by parsing it (:func:`v2json.split_binary`) rather than from the
``Inference-Header-Content-Length`` header. A binary request gets a binary answer with that
header set.

    python serve_litserve.py PORT '{"mlp256": {"instances": 2, "batch": 1, "delay_ms": 0}}'
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Body, Response

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

    def decode_request(self, request: Any) -> tuple[np.ndarray, bool]:
        """The input and whether the answer goes back as binary data."""
        if isinstance(request, bytes):
            return v2json.decode_body(request, v2json.split_binary(request))
        return v2json.decode(request), False

    def batch(self, inputs: list[tuple[np.ndarray, bool]]) -> tuple[np.ndarray, list[bool]]:
        return np.concatenate([x for x, _ in inputs]), [b for _, b in inputs]

    def predict(self, x: tuple[Any, Any]) -> tuple[Any, Any]:
        return self.run(x[0]), x[1]

    def unbatch(self, output: tuple[np.ndarray, list[bool]]) -> list[tuple[np.ndarray, bool]]:
        y, binary = output
        return [(y[i:i + 1], b) for i, b in enumerate(binary)]

    def encode_response(self, output: tuple[np.ndarray, bool]) -> Response:
        y, binary = output
        if not binary:
            return Response(v2json.dumps(v2json.encode(self.name, y)), media_type="application/json")
        body, head = v2json.encode_binary(self.name, y)
        return Response(body, media_type="application/octet-stream", headers={v2json.HEADER: str(head)})


# A body of any type: FastAPI parses a JSON body and passes any other as bytes (unannotated,
# LitServe would parse every body as JSON). Set as an object, not as the string this module's
# annotations are, since FastAPI resolves the annotation in LitServe's module.
V2API.decode_request.__annotations__["request"] = Annotated[Any, Body()]


def main(port: int, config: dict[str, dict[str, Any]]) -> None:
    apis = [V2API(n, int(c.get("batch", 1)), float(c.get("delay_ms", 0.0))) for n, c in config.items()]
    workers = [int(c.get("instances", 1)) for c in config.values()]
    server = ls.LitServer(apis, accelerator="cpu", devices=1,
                          workers_per_device=workers if len(workers) > 1 else workers[0])
    for api, c in zip(apis, config.values()):
        if "timeout_ms" in c:  # LitServe answers 504 to a request that waited longer than this
            api.request_timeout = float(c["timeout_ms"]) / 1000.0
    for name in config:
        meta = models.signature(name)
        server.app.add_api_route(f"/v2/models/{name}", lambda meta=meta: meta, methods=["GET"])
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
