"""The least of the KServe v2 protocol that the load client uses, for peers whose own protocol
is not v2 (Ray Serve, LitServe): model metadata, and an infer request's tensors to numpy and
back, as JSON tensors or with the binary tensor data extension, the client's default. Tensors
are FP32 "x" in, "y" out (bench/peers/models.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

try:  # as apportion serve parses and writes v2 JSON (install.sh installs it in each peer's venv)
    import orjson

    loads: Any = orjson.loads
    dumps: Any = orjson.dumps
except ImportError:  # pragma: no cover - a venv installed before orjson was added
    loads = json.loads

    def dumps(doc: Any) -> bytes:
        return json.dumps(doc).encode()

HEADER = "inference-header-content-length"
"""The binary extension's HTTP header: the length of the JSON part that starts the body."""


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


def decode_body(body: bytes, header_length: int | None) -> tuple[np.ndarray, bool]:
    """A request body, JSON or binary (``header_length``: the HEADER value, None for a JSON
    body), as its input "x" and whether the client asked for the output as binary data."""
    if header_length is None:
        return decode(loads(body)), False
    head = loads(body[:header_length])
    offset = header_length
    x = None
    for t in head["inputs"]:
        size = int((t.get("parameters") or {}).get("binary_data_size", 0))
        if t["name"] == "x":
            if "data" in t:
                x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            else:
                if t["datatype"] != "FP32" or size != 4 * int(np.prod(t["shape"])):
                    raise ValueError(f"input 'x': {size} bytes of {t['datatype']} for shape {t['shape']}")
                x = np.frombuffer(body, dtype=np.float32, count=size // 4, offset=offset).reshape(t["shape"])
        offset += size
    if x is None:
        raise ValueError("no input 'x'")
    wanted = (head.get("parameters") or {}).get("binary_data_output", False)
    for o in head.get("outputs") or ():
        if o.get("name") == "y" and "binary_data" in (o.get("parameters") or {}):
            wanted = o["parameters"]["binary_data"]
    return x, bool(wanted)


def split_binary(body: bytes) -> int:
    """The length of a binary-extension body's JSON part, found by parsing it (for a server
    front that passes on the body but not the HEADER that carries this length)."""
    try:  # latin-1 maps each byte to one character: the end index is the byte count
        head, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
    except ValueError as e:
        raise ValueError(f"a binary tensor body must start with a JSON object: {e}") from None
    if not isinstance(head, dict):
        raise ValueError(f"a binary tensor body must start with a JSON object, not {type(head).__name__}")
    return end


def encode_binary(model: str, y: Any) -> tuple[bytes, int]:
    """The response body with "y" as binary data, and the length of its JSON part (the
    HEADER value the response must carry)."""
    arr = np.ascontiguousarray(y, dtype=np.float32)
    head = json.dumps({"model_name": model, "model_version": "1",
                       "outputs": [{"name": "y", "datatype": "FP32", "shape": list(arr.shape),
                                    "parameters": {"binary_data_size": arr.nbytes}}]}).encode()
    return head + arr.tobytes(), len(head)
