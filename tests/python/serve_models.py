"""Models and signatures the serve tests share (and the drain test's child process imports)."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import apportion as ap
from apportion.serve import Server, Signature, TensorSpec


class Gate:
    """Blocks each call until released; records the order of the inputs it served."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.order: list[float] = []
        self._lock = threading.Lock()

    def reset(self) -> None:
        self.release.clear()
        self.entered.clear()
        self.order.clear()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.order.append(float(x[0]))
        self.entered.set()
        assert self.release.wait(60), "gate never released"
        return x


def fails(x: np.ndarray) -> np.ndarray:
    raise ValueError(f"boom {int(x[0])}")


def fails_batch(xs: np.ndarray) -> np.ndarray:
    raise ValueError(f"batch of {len(xs)} refused")


def torch_model(x: Any) -> Any:
    import torch

    assert isinstance(x, torch.Tensor), type(x)
    return torch.stack([x.sum(dim=1), x.max(dim=1).values], dim=1)


def multi(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"sum": inputs["a"].astype(np.float32) + inputs["b"],
            "tag": np.array([b"n=%d" % inputs["a"].size], dtype=object)}


class Batched:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        self.sizes.append(len(xs))
        time.sleep(0.002)
        return xs * 10


def signatures() -> dict[str, Signature]:
    vec = [TensorSpec("x", "FP32", [-1])]
    return {
        "echo": Signature(vec, [TensorSpec("y", "FP32", [-1])]),
        "multi": Signature([TensorSpec("a", "INT32", [-1]), TensorSpec("b", "FP32", [-1])],
                           [TensorSpec("sum", "FP32", [-1]), TensorSpec("tag", "BYTES", [1])]),
        "torch": Signature([TensorSpec("x", "FP32", [-1, 4])], [TensorSpec("y", "FP32", [-1, 2])],
                           tensor="torch"),
        "batched": Signature([TensorSpec("x", "FP32", [4])], [TensorSpec("y", "FP32", [4])]),
        "upper": Signature([TensorSpec("s", "BYTES", [-1])], [TensorSpec("u", "BYTES", [-1])]),
        "fails": Signature(vec, [TensorSpec("y", "FP32", [-1])]),
        "fails_batch": Signature([TensorSpec("x", "FP32", [2])], [TensorSpec("y", "FP32", [2])]),
        "bad_output": Signature(vec, [TensorSpec("y", "INT64", [-1])]),
        "gate": Signature(vec, [TensorSpec("y", "FP32", [-1])]),
        "grid": Signature([TensorSpec("x", "FP32", [-1, -1])], [TensorSpec("y", "FP32", [-1, -1])]),
        "bad_bytes": Signature(vec, [TensorSpec("u", "BYTES", [-1])]),
        "team/echo": Signature(vec, [TensorSpec("y", "FP32", [-1])]),  # a "/" in its name: %2F in a path
    }


def add_models(rt: ap.Runtime, gate: Gate, batched: Batched) -> None:
    rt.add_model("echo", model=lambda x: x * 2, instances=2)
    rt.add_model("multi", model=multi)
    rt.add_model("torch", model=torch_model)
    rt.add_model("batched", model=batched, batching=ap.Batching(max_size=8, max_delay_ms=20.0))
    rt.add_model("upper", model=lambda s: np.array([v.upper() for v in s], dtype=object))
    rt.add_model("fails", model=fails)
    rt.add_model("fails_batch", model=fails_batch, batching=ap.Batching(max_size=8, max_delay_ms=200.0))
    rt.add_model("bad_output", model=lambda x: x)
    rt.add_model("gate", model=gate, max_queue=3, priority_levels=2)
    rt.add_model("grid", model=lambda x: x)
    # ints in an object array: bytes(5) would be five NUL bytes on the wire
    rt.add_model("bad_bytes", model=lambda x: np.array([5, 7], dtype=object))
    rt.add_model("team/echo", model=lambda x: x * 3)


def http_response(sock: Any) -> bytes:
    """Reads one JSON-bodied HTTP response from a raw socket (until its body's closing brace,
    or until the server closes the connection)."""
    out = b""
    while b"\r\n\r\n" not in out or not out.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


class Served:
    """The models above in a started runtime behind a Server on free ports (HTTP and gRPC)."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.batched = Batched()
        self.rt = ap.Runtime()
        add_models(self.rt, self.gate, self.batched)
        self.rt.start()
        self.server = Server(self.rt, signatures(), http_port=0, grpc_port=0).start()
        self.http = f"127.0.0.1:{self.server.http_port}"
        self.grpc = f"127.0.0.1:{self.server.grpc_port}"

    def block(self, send: Callable[[float], Any]) -> tuple[ThreadPoolExecutor, Future[Any]]:
        """Occupies the gate model's one instance with ``send(-1.0)`` (a request of x=[-1]) on
        a pool; returns the pool (for more requests) and that request's future."""
        self.gate.reset()
        pool = ThreadPoolExecutor(8)
        first = pool.submit(send, -1.0)
        assert self.gate.entered.wait(30)
        return pool, first

    def wait_queued(self, n: int) -> None:
        for _ in range(3000):
            if self.rt.stats()["gate"].queued >= n:
                return
            time.sleep(0.01)
        raise AssertionError(f"never saw {n} queued requests")

    def close(self) -> None:
        self.gate.release.set()
        self.server.stop()
        self.rt.close(drain=False)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        s.close()
        # grpc.aio keeps a poller thread until its objects (some in reference cycles) are
        # collected; collect them here, so that later modules' thread counts see it gone
        gc.collect()
