"""The v2 adapter of the peer comparison (bench/peers/v2json.py), which Ray Serve and LitServe
answer through: request bodies as tritonclient writes them (JSON and binary tensor data) are
read back exactly, and its responses parse in tritonclient as the arrays they carry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")

_PATH = Path(__file__).resolve().parents[2] / "bench" / "peers" / "v2json.py"
_spec = importlib.util.spec_from_file_location("peers_v2json", _PATH)
assert _spec is not None and _spec.loader is not None
v2json = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v2json)

Client = httpclient.InferenceServerClient


def _request(x: np.ndarray, *, binary: bool, outputs: list | None = None) -> tuple[bytes, int | None]:
    t = httpclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    body, length = Client.generate_request_body([t], outputs=outputs)
    return (body if isinstance(body, bytes) else body.encode()), length


@pytest.mark.parametrize("binary", [False, True])
def test_a_request_body_from_tritonclient_reads_back_as_its_array(binary: bool) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    body, length = _request(x, binary=binary)
    assert (length is not None) == binary
    got, wants_binary = v2json.decode_body(body, length)
    np.testing.assert_array_equal(got, x)
    assert got.dtype == np.float32 and got.shape == (2, 3, 4)
    # Without requested outputs, tritonclient asks for binary outputs when it sends binary.
    assert wants_binary == binary


def test_a_binary_request_that_asks_for_json_output_is_answered_in_json() -> None:
    x = np.ones((1, 5), dtype=np.float32)
    body, length = _request(x, binary=True, outputs=[httpclient.InferRequestedOutput("y", binary_data=False)])
    got, wants_binary = v2json.decode_body(body, length)
    np.testing.assert_array_equal(got, x)
    assert wants_binary is False


def test_a_binary_response_parses_in_tritonclient_as_the_array() -> None:
    y = (np.arange(12, dtype=np.float32) - 3.5).reshape(3, 4)
    body, length = v2json.encode_binary("mlp", y)
    result = Client.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    assert result.get_response()["model_name"] == "mlp"


def test_a_json_response_parses_in_tritonclient_as_the_array() -> None:
    y = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    result = Client.parse_response_body(json.dumps(v2json.encode("conv", y)).encode())
    np.testing.assert_array_equal(result.as_numpy("y"), y)


def test_a_binary_input_whose_size_does_not_match_its_shape_is_refused() -> None:
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                                   "parameters": {"binary_data_size": 12}}]}).encode()
    with pytest.raises(ValueError, match="input 'x': 12 bytes of FP32 for shape \\[2, 2\\]"):
        v2json.decode_body(head + b"\0" * 12, len(head))


@pytest.mark.parametrize("binary", [False, True])
def test_a_request_without_input_x_is_refused(binary: bool) -> None:
    t = httpclient.InferInput("z", [1], "FP32")
    t.set_data_from_numpy(np.zeros(1, dtype=np.float32), binary_data=binary)
    body, length = Client.generate_request_body([t])
    with pytest.raises(ValueError, match="no input 'x'"):
        v2json.decode_body(body if isinstance(body, bytes) else body.encode(), length)


def test_a_binary_body_s_json_part_is_found_without_the_header() -> None:
    # LitServe passes its API the body, not the header that carries the JSON part's length.
    # Binary data that starts with bytes a JSON reader could take ('}', digits, a quote) and
    # bytes above 0x7f must not move the split.
    x = np.frombuffer(b"}1\"\xff\x80{ " * 4 + b"\x00" * 4, dtype=np.float32).reshape(2, 4).copy()
    body, length = _request(x, binary=True)
    assert v2json.split_binary(body) == length
    got, _ = v2json.decode_body(body, v2json.split_binary(body))
    np.testing.assert_array_equal(got.view(np.uint8), x.view(np.uint8))


@pytest.mark.parametrize("body", [b"\x00\x01{}", b"[1, 2]\x00\x00"])
def test_a_body_that_does_not_start_with_a_json_object_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="a binary tensor body must start with a JSON object"):
        v2json.split_binary(body)
