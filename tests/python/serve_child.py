"""A process that serves models with Server.serve_forever() for the signal tests: prints its
ports as one JSON line, serves until SIGTERM/SIGINT, then prints the runtime's counts."""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

import apportion as ap
from apportion.serve import Server, Signature, TensorSpec


def main(mode: str, marker: str, drain_timeout_s: float = 30.0) -> None:
    entered = threading.Event()

    def slow(x: np.ndarray) -> np.ndarray:
        if mode == "hang":
            with open(marker, "w") as f:
                f.write("entered")
            entered.set()
            time.sleep(3.0)
        else:
            time.sleep(0.002)
        return x + 1

    rt = ap.Runtime()
    rt.add_model("slow", model=slow, instances=2, max_queue=1024)
    rt.start()
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("y", "FP32", [-1])])
    server = Server(rt, {"slow": sig}, http_port=0, grpc_port=0, drain_timeout_s=drain_timeout_s)

    def report() -> None:
        if server.listening.wait(60):
            print(json.dumps({"http": server.http_port, "grpc": server.grpc_port}), flush=True)

    threading.Thread(target=report, daemon=True).start()
    server.serve_forever()
    s = rt.stats()["slow"]
    rt.close()
    print(json.dumps({"submitted": s.submitted, "completed": s.completed, "failed": s.failed,
                      "expired": s.expired, "cancelled": s.cancelled, "rejected": s.rejected}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(float, sys.argv[3:4]))
