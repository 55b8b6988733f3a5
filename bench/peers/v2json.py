"""The least of the KServe v2 protocol over JSON that the load client uses, for peers whose own
protocol is not v2 (Ray Serve, LitServe): model metadata, and an infer request's JSON tensors
to numpy and back. Tensors are FP32 "x" in, "y" out (bench/peers/models.py)."""

from __future__ import annotations

from typing import Any

import numpy as np


def decode(body: dict[str, Any]) -> np.ndarray:
    """The request's input "x" as an FP32 array of its declared shape."""
    for t in body["inputs"]:
        if t["name"] == "x":
            return np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
    raise ValueError("no input 'x'")


def encode(model: str, y: Any) -> dict[str, Any]:
    arr = np.asarray(y, dtype=np.float32)
    return {"model_name": model, "model_version": "1",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": list(arr.shape),
                         "data": arr.ravel().tolist()}]}
