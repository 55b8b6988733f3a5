"""Triton Inference Server through nvidia-pytriton serving bench/peers/models.py: Triton's own
v2 HTTP and gRPC fronts, the models as PyTriton Python callables (one per instance), torch at
one thread. With "batch" > 1 a model gets Triton's dynamic batcher (max_batch_size = batch,
the request's leading dim as the batch dim). With "timeout_ms" and "max_queue" (the demo's
models) it gets Triton's queue policy: at most max_queue requests waiting (more refused at
once), a request whose timeout passes while it waits refused (REJECT); the request's own
timeout applies where it is shorter.

    python serve_pytriton.py PORT '{"mlp256": {"instances": 2, "batch": 1, "delay_ms": 0}}'
    (HTTP on PORT, gRPC on PORT+1, metrics on PORT+2)
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
from pytriton.triton import Triton, TritonConfig

import models


def infer_func(name: str) -> Any:
    run = models.runner(name)

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        return [{"y": y} for y in models.run_each(run, [r["x"] for r in requests])]

    return infer


def main(port: int, config: dict[str, dict[str, Any]]) -> None:
    import torch

    torch.set_num_threads(1)
    tc = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=port + 1,
                      metrics_port=port + 2, log_verbose=0)
    with Triton(config=tc) as triton:
        for name, c in config.items():
            x, y = models.SHAPES[name]
            batch = int(c.get("batch", 1))
            policy = None
            if "timeout_ms" in c:
                # Triton's queue policy: requests over the bound refused at once, a request whose
                # timeout (its own, or the SLO) passes while it waits answered at once (REJECT).
                policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True,
                                     default_timeout_microseconds=int(float(c["timeout_ms"]) * 1000),
                                     max_queue_size=int(c["max_queue"]))
            # The queue policy is the dynamic batcher's: a model with one needs the batcher even
            # at batch 1 (max_batch_size 1: the request's leading dim is the batch dim).
            batched = batch > 1 or policy is not None
            mc = (ModelConfig(max_batch_size=batch,
                              batcher=DynamicBatcher(max_queue_delay_microseconds=int(float(c.get("delay_ms", 0)) * 1000),
                                                     default_queue_policy=policy))
                  if batched else ModelConfig(batching=False))
            triton.bind(model_name=name, infer_func=[infer_func(name) for _ in range(int(c.get("instances", 1)))],
                        inputs=[Tensor(name="x", dtype=np.float32, shape=x[1:] if batched else (-1, *x[1:]))],
                        outputs=[Tensor(name="y", dtype=np.float32, shape=y[1:] if batched else (-1, *y[1:]))],
                        config=mc, strict=False)
        triton.serve()


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
