"""KServe v2 over HTTP, spoken by the real tritonclient (and raw HTTP for what it cannot send
wrong) against a Server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("uvicorn")
th = pytest.importorskip("tritonclient.http")
httpx = pytest.importorskip("httpx")
from tritonclient.utils import InferenceServerException, triton_to_np_dtype  # noqa: E402

import apportion as ap  # noqa: E402
from apportion.serve import Server, Signature, TensorSpec, asgi  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_models import Gate, Served, http_response, served, signatures  # noqa: E402,F401 (served: a fixture)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(served: Served) -> Iterator[Any]:
    c = new_client(served)
    yield c
    c.close()


def new_client(served: Served) -> Any:
    return th.InferenceServerClient(served.http, network_timeout=60.0)


def vec(name: str, values: Any, datatype: str = "FP32", binary: bool = True) -> Any:
    arr = np.asarray(values)
    if datatype != "BYTES":
        arr = arr.astype(triton_to_np_dtype(datatype))
    i = th.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr, binary_data=binary)
    return i


def as_bytes(arr: np.ndarray) -> list[bytes]:
    # tritonclient reads JSON BYTES data back as str, binary as bytes
    return [v.encode() if isinstance(v, str) else v for v in arr.tolist()]


def error_of(fn: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value


# -- health and metadata -------------------------------------------------------------------------
def test_health_and_metadata(client: Any, served: Served) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("echo") and client.is_model_ready("torch")
    md = client.get_server_metadata()
    assert md["name"] == "apportion" and md["version"] == ap.__version__
    assert "binary_tensor_data" in md["extensions"]
    mm = client.get_model_metadata("multi")
    assert mm["name"] == "multi" and mm["versions"] == ["1"]
    assert mm["inputs"] == [{"name": "a", "datatype": "INT32", "shape": [-1]},
                            {"name": "b", "datatype": "FP32", "shape": [-1]}]
    assert mm["outputs"][1] == {"name": "tag", "datatype": "BYTES", "shape": [1]}
    assert client.get_model_metadata("echo", model_version="1")["name"] == "echo"
    e = error_of(lambda: client.get_model_metadata("nope"))
    assert e.status() == "404" and "unknown model 'nope'" in e.message()
    assert not client.is_model_ready("nope")
    e = error_of(lambda: client.get_model_metadata("echo", model_version="7"))
    assert e.status() == "404" and "no version '7'" in e.message()


def test_unknown_endpoint_and_method_are_json_errors(served: Served) -> None:
    with httpx.Client(base_url=f"http://{served.http}") as h:
        r = h.get("/v3/anything")
        assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
        r = h.post("/v2/health/ready")
        assert r.status_code == 405 and "takes GET" in r.json()["error"]
        r = h.get("/v2/models/echo/infer")
        assert r.status_code == 405 and "takes POST" in r.json()["error"]
        r = h.head("/v2/models/echo/infer")
        assert r.status_code == 405 and r.content == b""


def test_head_answers_as_get_without_a_body(served: Served) -> None:
    with httpx.Client(base_url=f"http://{served.http}") as h:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/echo/ready", "/v2/models/echo", "/v2"):
            get, head = h.get(path), h.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"" and head.headers["content-length"] == str(len(get.content)), path
        get, head = h.get("/v2/models/nope/ready"), h.head("/v2/models/nope/ready")
        assert head.status_code == get.status_code == 404 and head.content == b""


def test_a_model_still_warming_up_is_not_ready_until_it_can_serve() -> None:
    # add_model on a serving runtime registers the model before its warm-up ends: /ready said
    # 200 then, and a request admitted in that moment waited the whole warm-up.
    import threading

    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x)
    rt.start()
    release = threading.Event()

    def warmup() -> Any:
        assert release.wait(30)
        return np.ones(2, np.float32)

    sigs = {"echo": signatures()["echo"], "late": signatures()["echo"]}
    with Server(rt, sigs, http_port=0, grpc_port=None) as server:
        c = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        adder = threading.Thread(target=rt.add_model, args=("late",), kwargs={"model": lambda x: x, "warmup": warmup})
        adder.start()
        deadline = time.monotonic() + 10
        while "late" not in rt.models:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not rt.serving("late") and not c.is_model_ready("late") and not c.is_server_ready()
        assert rt.serving("echo") and c.is_model_ready("echo")
        release.set()
        adder.join(30)
        assert rt.serving("late") and c.is_model_ready("late") and c.is_server_ready()
        c.close()
    rt.close()
    assert not rt.serving("echo") and not rt.serving("nope")


def test_models_that_did_not_start_are_not_ready() -> None:
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x)
    rt.start()
    sigs = {**{k: v for k, v in signatures().items() if k == "echo"},
            "ghost": signatures()["echo"]}  # declared, but its add_model failed / never ran
    with Server(rt, sigs, http_port=0, grpc_port=None) as server:
        c = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        assert c.is_server_live()
        assert c.is_model_ready("echo")
        assert not c.is_model_ready("ghost")
        assert not c.is_server_ready()
        e = error_of(lambda: c.infer("ghost", [vec("x", np.ones(2, np.float32))]))
        assert e.status() == "503" and "model 'ghost' is not ready" in e.message()
        c.close()
    rt.close()


# -- inference -----------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_json_and_binary(client: Any, binary_in: bool, binary_out: bool) -> None:
    x = np.arange(5, dtype=np.float32)
    r = client.infer("echo", [vec("x", x, binary=binary_in)], request_id="r-7",
                     outputs=[th.InferRequestedOutput("y", binary_data=binary_out)])
    np.testing.assert_array_equal(r.as_numpy("y"), x * 2)
    assert r.get_response()["id"] == "r-7"
    assert ("data" in r.get_output("y")) is (not binary_out)


def test_versioned_paths(client: Any) -> None:
    x = np.arange(3, dtype=np.float32)
    r = client.infer("echo", [vec("x", x)], model_version="1")
    np.testing.assert_array_equal(r.as_numpy("y"), x * 2)
    assert client.is_model_ready("echo", model_version="1")
    e = error_of(lambda: client.infer("echo", [vec("x", x)], model_version="3"))
    assert e.status() == "404" and "no version '3'" in e.message()


def test_infer_default_outputs_are_binary(client: Any) -> None:
    r = client.infer("echo", [vec("x", [1.5, 2.5], binary=False)])
    assert r.get_output("y")["parameters"]["binary_data_size"] == 8
    np.testing.assert_array_equal(r.as_numpy("y"), np.array([3, 5], np.float32))


@pytest.mark.parametrize("binary", [True, False])
def test_several_inputs_and_outputs(client: Any, binary: bool) -> None:
    a = np.array([1, 2, 3], np.int32)
    b = np.array([0.5, 0.5, 0.5], np.float32)
    r = client.infer("multi", [vec("a", a, "INT32", binary), vec("b", b, binary=binary)],
                     outputs=[th.InferRequestedOutput("sum", binary_data=binary),
                              th.InferRequestedOutput("tag", binary_data=binary)])
    np.testing.assert_array_equal(r.as_numpy("sum"), a + b)
    assert as_bytes(r.as_numpy("tag")) == [b"n=3"]


def test_only_the_requested_outputs(client: Any) -> None:
    r = client.infer("multi", [vec("a", np.array([1], np.int32), "INT32"), vec("b", [1.0], "FP32")],
                     outputs=[th.InferRequestedOutput("tag")])
    assert r.as_numpy("sum") is None and r.as_numpy("tag").tolist() == [b"n=1"]


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(client: Any, binary: bool) -> None:
    s = np.array([b"ab", b"", "héllo".encode()], dtype=object)
    r = client.infer("upper", [vec("s", s, "BYTES", binary)],
                     outputs=[th.InferRequestedOutput("u", binary_data=binary)])
    assert as_bytes(r.as_numpy("u")) == [b"AB", b"", "HéLLO".encode()]


@pytest.mark.parametrize("binary", [True, False])
def test_torch_model_gets_tensors(client: Any, binary: bool) -> None:
    pytest.importorskip("torch")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    r = client.infer("torch", [vec("x", x, binary=binary)])
    np.testing.assert_array_equal(r.as_numpy("y"), np.stack([x.sum(1), x.max(1)], 1))


def test_batching_model_serves_each_request_its_own_row(served: Served) -> None:
    n = 16

    def one(k: int) -> np.ndarray:
        c = new_client(served)
        try:
            x = np.full(4, k, np.float32)
            return c.infer("batched", [vec("x", x)]).as_numpy("y")
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(n)))
    for k, y in enumerate(outs):
        np.testing.assert_array_equal(y, np.full(4, 10 * k, np.float32))
    assert sum(served.batched.sizes) >= n and max(served.batched.sizes) > 1


# -- timeouts, priorities, queue full ------------------------------------------------------------
def _blocked(served: Served) -> tuple[ThreadPoolExecutor, Any]:
    return served.block(lambda k: new_client(served).infer("gate", [vec("x", [k])]))


def test_a_queued_request_whose_client_hangs_up_is_cancelled(served: Served) -> None:
    # Clients that gave up (closed their connection) while their requests were queued: the
    # requests still ran, and held queue slots live clients were refused for (gRPC cancelled).
    import socket

    pool, first = _blocked(served)
    socks = []
    gone = answered(served).get(("gate", "http", "disconnected"), 0.0)
    try:
        before = served.rt.stats()["gate"]
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [7.0]}]}).encode()
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", served.server.http_port), timeout=60)
            s.sendall(b"POST /v2/models/gate/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
                      + body)
            socks.append(s)
        served.wait_queued(2)
        for s in socks:
            s.close()
        for _ in range(3000):  # watched from WATCH_AFTER_S on; cancelled once the hang-up is seen
            if served.rt.stats()["gate"].cancelled - before.cancelled == 2:
                break
            time.sleep(0.01)
        after = served.rt.stats()["gate"]
        assert after.cancelled - before.cancelled == 2 and after.queued == 0
    finally:
        served.gate.release.set()
        pool.shutdown()
    assert first.result().as_numpy("y").tolist() == [-1.0]  # the running one completes
    assert 7.0 not in served.gate.order, "a request whose client left never ran"
    # Counted as what it was on /metrics (not as the server's unavailability).
    for _ in range(3000):  # counted once its handler has seen the cancellation
        if answered(served).get(("gate", "http", "disconnected"), 0.0) - gone == 2:
            break
        time.sleep(0.01)
    assert answered(served).get(("gate", "http", "disconnected"), 0.0) - gone == 2
    # A client that stays is answered as before.
    assert new_client(served).infer("gate", [vec("x", [2.0])]).as_numpy("y").tolist() == [2.0]


def test_a_running_request_whose_client_hangs_up_counts_as_disconnected(served: Served) -> None:
    # It ran to its end and counted "ok", though its answer went to a closed connection (gRPC
    # counted the same case "disconnected").
    import socket

    served.gate.reset()
    before = answered(served)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [5.0]}]}).encode()
    s = socket.create_connection(("127.0.0.1", served.server.http_port), timeout=60)
    try:
        s.sendall(b"POST /v2/models/gate/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert served.gate.entered.wait(30)
    finally:
        s.close()
    time.sleep(1.0)  # watched from WATCH_AFTER_S (0.05 s) on: the hang-up is seen while the call runs
    served.gate.release.set()
    key = ("gate", "http", "disconnected")
    for _ in range(3000):
        if answered(served).get(key, 0.0) - before.get(key, 0.0) == 1:
            break
        time.sleep(0.01)
    after = answered(served)
    assert {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)} == {key: 1}
    assert served.gate.order == [5.0], "it ran"


def test_timeout_in_microseconds_is_504(served: Served) -> None:
    pool, first = _blocked(served)
    try:
        late = pool.submit(lambda: new_client(served).infer("gate", [vec("x", [1.0])], timeout=20_000))
        served.wait_queued(1)
        time.sleep(0.1)  # past the 20 ms deadline while the instance is still busy
    finally:
        served.gate.release.set()
        pool.shutdown()
    e = late.exception()
    assert isinstance(e, InferenceServerException) and e.status() == "504"
    assert "gate" in e.message()
    np.testing.assert_array_equal(first.result().as_numpy("y"), [-1.0])
    assert served.gate.order == [-1.0]  # the expired request never ran


def test_priorities_map_to_levels(served: Served) -> None:
    pool, first = _blocked(served)
    try:
        futs = []
        # v2 priority 1 is the highest level (apportion's 0), 2 the next; 0 (or none) is the
        # model's default, apportion's level 0: served with priority 1 in submission order
        for k, prio in ((1.0, 2), (2.0, 0), (3.0, 1)):
            futs.append(pool.submit(lambda k=k, prio=prio: new_client(served).infer(
                "gate", [vec("x", [k])], priority=prio)))
            served.wait_queued(len(futs))
    finally:
        served.gate.release.set()
        pool.shutdown()
    for f in futs:
        assert f.result().as_numpy("y").shape == (1,)
    first.result()
    assert served.gate.order == [-1.0, 2.0, 3.0, 1.0]


def test_priority_beyond_the_models_levels_is_400(client: Any) -> None:
    e = error_of(lambda: client.infer("gate", [vec("x", [1.0])], priority=9))
    assert e.status() == "400" and "priority" in e.message()
    assert "'priority' is 9" in e.message() and "send 1 (the highest) to 2, or 0" in e.message()
    e = error_of(lambda: client.infer("echo", [vec("x", [1.0])], priority=2))
    assert e.status() == "400" and "has 1 priority level: send 1, or 0 for the default" in e.message()


def test_content_encoding_identity_in_any_case_and_empty_versions(served: Served) -> None:
    x = np.array([1.5], np.float32)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": x.tolist()}]}).encode()
    for coding in ("identity", "IDENTITY", "Identity"):
        r = _raw(served, "/v2/models/echo/infer", body, {"Content-Encoding": coding})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [3.0]
    r = _raw(served, "/v2/models/echo/versions//infer", body)
    assert r.status_code == 404 and "empty version" in r.json()["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient(served: Served, algorithm: str) -> None:
    # tritonclient's request_compression_algorithm: was 400 "Content-Encoding ... not supported".
    c = new_client(served)
    try:
        for binary in (True, False):
            r = c.infer("echo", [vec("x", [1.0, 2.5], binary=binary)], request_compression_algorithm=algorithm)
            assert r.as_numpy("y").tolist() == [2.0, 5.0]
    finally:
        c.close()
    x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [4.0]}]}
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    body = raw_deflate.compress(json.dumps(x).encode()) + raw_deflate.flush()
    r = _raw(served, "/v2/models/echo/infer", body, {"Content-Encoding": "deflate"})  # raw deflate, no header
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [8.0], r.text
    # A gzip body of several members (RFC 1952; gzip.decompress reads it) was refused after the
    # first; bytes after the compressed data were silently ignored.
    whole = json.dumps(x).encode()
    r = _raw(served, "/v2/models/echo/infer", gzip.compress(whole[:20]) + gzip.compress(whole[20:]),
             {"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [8.0], r.text
    r = _raw(served, "/v2/models/echo/infer", gzip.compress(whole) + b"trailing garbage", {"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "cannot be decompressed (its gzip member 2)" in r.json()["error"], r.text
    # 100,000 empty members (2 MB): each member was handed the rest of the body, a quadratic
    # copy (6 s of CPU; hours at the 64 MiB bound), inflating to nothing the size bound sees
    r = _raw(served, "/v2/models/echo/infer", gzip.compress(b"") * 100_000, {"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "holds more than 1024 members" in r.json()["error"], r.text
    r = _raw(served, "/v2/models/echo/infer", zlib.compress(whole) + b"junk", {"Content-Encoding": "deflate"})
    assert r.status_code == 400 and "4 bytes follow the end of the deflate request body's compressed data" in \
        r.json()["error"], r.text


@contextlib.contextmanager
def echo_server(**options: Any) -> Iterator[Server]:
    """A started Server (HTTP only) with ``options``, over a runtime serving one "echo" model."""
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x)
    rt.start()
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=None, **options) as s:
            yield s
    finally:
        rt.close()


def test_a_compressed_body_is_inflated_only_up_to_the_limit() -> None:
    with echo_server(max_body_bytes=65536) as s:
        x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "pad": "a" * 10**7}
        bomb = gzip.compress(json.dumps(x).encode())  # ~10 KB that inflates to 10 MB
        assert len(bomb) < 65536
        r = httpx.post(f"http://127.0.0.1:{s.http_port}/v2/models/echo/infer", content=bomb,
                       headers={"Content-Encoding": "gzip"}, timeout=60)
        assert r.status_code == 413 and "decompresses beyond the limit of 65536 bytes" in r.json()["error"]
        r = httpx.post(f"http://127.0.0.1:{s.http_port}/v2/models/echo/infer", timeout=60,
                       content=gzip.compress(json.dumps({**x, "pad": "a" * 60000}).encode()),
                       headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text  # within the limit once inflated


def test_a_body_that_stops_arriving_gets_408_after_the_body_timeout() -> None:
    # It held its connection (and what it had sent) for as long as the client kept it open.
    import socket

    with echo_server(body_timeout_s=0.3) as s:
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
            c.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"inp")
            started = time.monotonic()
            answer = http_response(c)
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"model 'echo': the request body did not arrive within 0.3 s" in answer
        assert waited < 20  # the timeout, not the client's
        # ... and the connection goes with the answer: a client that kept trickling body bytes
        # held it (and its file descriptor) for as long as it liked.
        assert b"connection: close" in answer.lower()
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
            c.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
            assert http_response(c).startswith(b"HTTP/1.1 408")
            c.settimeout(10)
            try:
                c.sendall(b" ")
                closed = c.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            assert closed
        r = httpx.post(f"http://127.0.0.1:{s.http_port}/v2/models/echo/infer", timeout=30,
                       json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
        assert r.status_code == 200  # a body that arrives is read as before
        with pytest.raises(ap.QuotaError, match="body_timeout_s must be a finite number of seconds > 0"):
            Server(s.frontend.rt, {"echo": signatures()["echo"]}, body_timeout_s=0)


def test_headers_that_do_not_arrive_get_408_and_the_connection_closed() -> None:
    # uvicorn has no deadline for a request's headers: a client sending them slowly (or opening
    # a connection and sending nothing) held its connection for as long as it liked.
    import socket

    with echo_server(header_timeout_s=0.4) as s:
        for first in (b"", b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Le"):
            with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
                c.sendall(first)
                started = time.monotonic()
                answer = http_response(c)
                waited = time.monotonic() - started
                assert c.recv(1) == b""  # closed after it
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"no complete request headers within 0.4 s" in answer and waited < 20
        # A kept-alive connection: the deadline is per request, from its first byte; a request
        # whose headers arrive in time is served, however long the connection has been open.
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
            body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}'
            request = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
            for _ in range(3):
                c.sendall(request)
                assert http_response(c).startswith(b"HTTP/1.1 200")
                time.sleep(0.25)
            c.sendall(request[:20])
            assert http_response(c).startswith(b"HTTP/1.1 408")
        with pytest.raises(ap.QuotaError, match="header_timeout_s must be a finite number of seconds > 0"):
            Server(s.frontend.rt, {"echo": signatures()["echo"]}, header_timeout_s=float("inf"))


def test_a_client_that_reads_none_of_its_answer_is_dropped_after_the_write_timeout() -> None:
    # Nothing bounded how long an answer waited for a client that did not read it: the
    # answer (here 16 MB) and its request's task stayed in the server for as long as the
    # client kept the connection open, and any number of clients could do that at once.
    import socket

    n = 4 << 20
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [n],
                                     "parameters": {"binary_data_size": 4 * n}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + np.arange(n, dtype=np.float32).tobytes()
    request = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
               b"Inference-Header-Content-Length: " + str(len(header)).encode() + b"\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    with echo_server(write_timeout_s=0.5) as s:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.settimeout(30)
            c.connect(("127.0.0.1", s.http_port))
            c.sendall(request)
            time.sleep(3.0)  # reads nothing: the server's write buffer fills and stays full
            got = 0
            try:
                while chunk := c.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            assert got < 4 * n, got  # dropped before the whole answer went out
        # A client that takes its answer slowly, but takes some of it every 0.1 s, gets it all.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.settimeout(30)
            c.connect(("127.0.0.1", s.http_port))
            c.sendall(request)
            got, head, whole = 0, b"", None  # whole: the answer's length, once its headers are in
            started = time.monotonic()
            while (whole is None or got < whole) and time.monotonic() - started < 60:
                chunk = c.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
                if whole is None:
                    head += chunk
                    if b"\r\n\r\n" in head:
                        fields = head.split(b"\r\n\r\n", 1)[0].lower()
                        length = int(re.search(rb"\r\ncontent-length: (\d+)", fields).group(1))
                        whole = len(fields) + 4 + length
                time.sleep(0.1 * len(chunk) / (4 << 20) * 8)  # ~8 pauses over the answer: 0.8 s
            assert whole is not None and whole > 4 * n and got == whole, (got, whole)  # all of it
        # The server goes on serving.
        r = httpx.post(f"http://127.0.0.1:{s.http_port}/v2/models/echo/infer", timeout=30,
                       json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]})
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0]
        with pytest.raises(ap.QuotaError, match="write_timeout_s must be a finite number of seconds > 0"):
            Server(s.frontend.rt, {"echo": signatures()["echo"]}, write_timeout_s=0)


def test_late_headers_of_a_pipelined_request_do_not_cut_the_answer_before_it() -> None:
    # The deadline fired while the request before it was still being answered: the client got
    # 408 in place of that answer, and the connection closed under it.
    import socket

    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: (time.sleep(1.0), x)[1])
    rt.start()
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=None, header_timeout_s=0.4) as s:
            body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}'
            request = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
            with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
                c.sendall(request + request[:20])  # the second one's headers never complete
                got = b""
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got[:200]
            assert got.count(b"HTTP/1.1 408") == 1 and got.index(b"HTTP/1.1 408") > got.index(b"HTTP/1.1 200")
    finally:
        rt.close()


def test_request_and_output_parameters_are_read_as_the_protocol_types_them(served: Served) -> None:
    path = "/v2/models/multi/infer"
    inputs = [{"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]},
              {"name": "b", "datatype": "FP32", "shape": [2], "data": [0.5, 0.5]}]

    def post(**extra: Any) -> Any:
        return _raw(served, path, json.dumps({"inputs": inputs, **extra}).encode())

    # "false" is a string, not false: it was read as true and the answer came binary.
    r = post(parameters={"binary_data_output": "false"})
    assert r.status_code == 400 and "parameter 'binary_data_output' must be true or false" in r.json()["error"]
    r = post(outputs=[{"name": "sum", "parameters": {"binary_data": "false"}}])
    assert r.status_code == 400 and "output 'sum': parameter 'binary_data' must be true or false" in r.json()["error"]
    r = post(parameters={"binary_data_output": False}, outputs=[{"name": "sum", "parameters": {"binary_data": False}}])
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.5, 2.5]
    # The classification extension is not served: refused, not silently ignored.
    r = post(outputs=[{"name": "sum", "parameters": {"classification": 1}}])
    assert r.status_code == 400 and "classification extension is not supported" in r.json()["error"]
    # An empty list of outputs names none: every output, as when the key is absent (gRPC too).
    r = post(outputs=[])
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["sum", "tag"]
    # The id is a string: another JSON type is refused, not echoed.
    for bad in (5, {"a": 1}, None):
        r = post(id=bad)
        assert r.status_code == 400 and "'id' must be a string" in r.json()["error"], bad
    assert post(id="r-1").json()["id"] == "r-1"


def test_a_model_with_a_slash_in_its_name_is_reached_by_its_escaped_name(served: Served) -> None:
    c = new_client(served)
    try:
        # tritonclient puts the name in the path with its "/" as it is
        r = c.infer("team/echo", [vec("x", [1.0])])
        assert r.as_numpy("y").tolist() == [3.0]
        assert c.get_model_metadata("team/echo")["name"] == "team/echo" and c.is_model_ready("team/echo")
        assert c.infer("team/echo", [vec("x", [2.0])], model_version="1").as_numpy("y").tolist() == [6.0]
    finally:
        c.close()
    with httpx.Client(base_url=f"http://{served.http}") as h:
        assert h.get("/v2/models/team%2fecho/ready").status_code == 200
        r = h.get("/v2/models/team%2Fnope")
        assert r.status_code == 404 and "unknown model 'team/nope'" in r.json()["error"]
        r = h.post("/v2/models/team%2Fecho/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                                     "data": [2.0]}]})
        assert r.status_code == 200 and r.json()["model_name"] == "team/echo" and r.json()["outputs"][0]["data"] == [6.0]
        r = h.get("/v2/models/team/nope/ready")
        assert r.status_code == 404 and "unknown model 'team'" in r.json()["error"]


def test_queue_full_is_429_with_retry_after(served: Served) -> None:
    pool, first = _blocked(served)
    try:
        queued = [pool.submit(lambda k=k: new_client(served).infer("gate", [vec("x", [float(k)])]))
                  for k in range(3)]
        served.wait_queued(3)
        e = error_of(lambda: new_client(served).infer("gate", [vec("x", [9.0])]))
        assert e.status() == "429" and "gate" in e.message()
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [9.0]}]}
        r = httpx.post(f"http://{served.http}/v2/models/gate/infer", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "error" in r.json()
    finally:
        served.gate.release.set()
        pool.shutdown()
    assert all(f.result().as_numpy("y").shape == (1,) for f in queued)
    first.result()


def test_queue_full_status_503_when_configured() -> None:
    gate = Gate()
    rt = ap.Runtime()
    rt.add_model("gate", model=gate, max_queue=1)
    rt.start()
    try:
        with Server(rt, {"gate": signatures()["gate"]}, http_port=0, grpc_port=None,
                    queue_full_status=503) as server:
            url = f"http://127.0.0.1:{server.http_port}/v2/models/gate/infer"
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(httpx.post, url, json=body, timeout=60)
                assert gate.entered.wait(30)
                second = pool.submit(httpx.post, url, json=body, timeout=60)
                while rt.stats()["gate"].queued < 1:
                    time.sleep(0.01)
                r = httpx.post(url, json=body)
                gate.release.set()
                assert r.status_code == 503 and "retry-after" not in r.headers
                assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        gate.release.set()
        rt.close()


def test_bad_server_options() -> None:
    rt = ap.Runtime()
    with pytest.raises(ap.QuotaError, match="queue_full_status must be 429 or 503"):
        asgi(rt, {}, queue_full_status=500)
    with pytest.raises(ap.QuotaError, match="max_body_bytes"):
        asgi(rt, {}, max_body_bytes=0)
    with pytest.raises(ap.QuotaError, match="http_port"):
        Server(rt, {}, http_port=70000)
    with pytest.raises(ValueError, match="loop must be one of auto, uvloop, asyncio, got 'trio'"):
        Server(rt, {}, loop="trio")
    with pytest.raises(TypeError, match="model 'm': signature must be"):
        asgi(rt, {"m": "x"})  # type: ignore[dict-item]
    rt.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_each_event_loop_serves_http_and_grpc(loop: str) -> None:
    import tritonclient.grpc as tg

    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with ap.Runtime() as rt:
        rt.add_model("echo", model=lambda x: x)
        rt.start()
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=0, loop=loop) as server:
            assert server.loop == loop
            assert type(server._loop).__module__.split(".")[0] == loop  # the loop that runs
            x = np.arange(4, dtype=np.float32)
            http = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
            got = http.infer("echo", [vec("x", x)]).as_numpy("y")
            http.close()
            g = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
            gi = tg.InferInput("x", [4], "FP32")
            gi.set_data_from_numpy(x)
            got_grpc = g.infer("echo", [gi]).as_numpy("y")
            g.close()
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(got_grpc, x)


def test_auto_loop_is_uvloop_where_installed_and_asyncio_without(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = ap.Runtime()
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert Server(rt, {}).loop == "asyncio"
    else:
        assert Server(rt, {}).loop == "uvloop"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import raises
    assert Server(rt, {}).loop == "asyncio"
    with pytest.raises(ImportError, match=r"loop='uvloop' needs the uvloop package"):
        Server(rt, {}, loop="uvloop")
    rt.close()


def test_port_in_use_raises_from_start(served: Served) -> None:
    rt = ap.Runtime()
    with pytest.raises(OSError):
        Server(rt, {}, http_port=served.server.http_port, grpc_port=None).start()
    rt.close()


# -- bad requests, each with its status and message, under a good load -----------------------------
def _raw(served: Served, path: str, content: bytes, headers: Any = None) -> Any:
    return httpx.post(f"http://{served.http}{path}", content=content, headers=headers or {}, timeout=60)


def _bad_requests(served: Served, client: Any) -> None:
    def check(status: str, fn: Any, *words: str) -> None:
        e = error_of(fn)
        assert e.status() == status, (e.status(), e.message())
        for w in words:
            assert w in e.message(), (w, e.message())

    def check_raw(status: int, r: Any, *words: str) -> None:
        assert r.status_code == status, (r.status_code, r.text)
        msg = r.json()["error"]
        for w in words:
            assert w in msg, (w, msg)

    f32 = np.ones(3, np.float32)
    check("404", lambda: client.infer("nope", [vec("x", f32)]), "unknown model 'nope'")
    check("400", lambda: client.infer("echo", [vec("x", np.ones(3, np.int32), "INT32")]),
          "input 'x'", "expected datatype FP32", "INT32")
    check("400", lambda: client.infer("torch", [vec("x", np.ones((2, 3), np.float32))]),
          "input 'x'", "expected shape [-1, 4]", "[2, 3]")
    check("400", lambda: client.infer("multi", [vec("a", np.ones(2, np.int32), "INT32")]),
          "missing input 'b'", "FP32")
    check("400", lambda: client.infer("echo", [vec("z", f32)]), "no input 'z'", "['x']")
    check("400", lambda: client.infer("echo", [vec("x", f32)], outputs=[th.InferRequestedOutput("q")]),
          "no output 'q'")
    check("400", lambda: client.infer("echo", [vec("x", f32)], timeout=-5), "timeout")
    check("500", lambda: client.infer("fails", [vec("x", [42.0])]), "ValueError", "boom 42")
    check("500", lambda: client.infer("bad_output", [vec("x", f32)]), "output 'y'", "INT64", "float32")

    path = "/v2/models/echo/infer"
    check_raw(400, _raw(served, path, b'{"inputs": [}'), "malformed JSON")
    check_raw(400, _raw(served, path, b"[1, 2]"), "JSON object")
    check_raw(400, _raw(served, path, b'{"inputs": 3}'), "'inputs'")
    good = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    payload = good + np.ones(2, np.float32).tobytes()
    check_raw(400, _raw(served, path, payload, {"Inference-Header-Content-Length": str(len(payload) + 1)}),
              "Inference-Header-Content-Length")
    check_raw(400, _raw(served, path, payload, {"Inference-Header-Content-Length": "x1"}),
              "Inference-Header-Content-Length")
    check_raw(400, _raw(served, path, payload, {"Inference-Header-Content-Length": str(len(good) - 1)}),
              "malformed JSON")
    check_raw(400, _raw(served, path, payload + b"\0", {"Inference-Header-Content-Length": str(len(good))}),
              "add up to 8 bytes", "9 follow")
    check_raw(400, _raw(served, path, payload[:-1], {"Inference-Header-Content-Length": str(len(good))}),
              "input 'x'", "binary_data_size 8", "7 binary bytes")
    short = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3],
                                    "parameters": {"binary_data_size": 8}}]}).encode()
    check_raw(400, _raw(served, path, short + payload[len(good):],
                        {"Inference-Header-Content-Length": str(len(short))}),
              "input 'x'", "needs 12 bytes, got 8")
    check_raw(400, _raw(served, path, json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}).encode()),
        "input 'x'", "needs 3 elements", "has 2")
    check_raw(400, _raw(served, path, json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]}).encode()),
        "input 'x'", "not FP32 data")
    check_raw(400, _raw(served, path, json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}).encode()),
        "input 'x'", "give 'data'")
    check_raw(400, _raw(served, path, json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                    {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()),
        "input 'x' is given twice")
    check_raw(400, _raw(served, path, json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": "3", "data": [1]}]}).encode()),
        "input 'x'", "'shape'")
    check_raw(400, _raw(served, path, json.dumps(
        {"parameters": {"priority": "high"},
         "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()),
        "'priority'")
    check_raw(415, _raw(served, path, b"{}", {"Content-Encoding": "br"}), "Content-Encoding 'br' is not supported")
    # one output named twice: it was answered twice
    check_raw(400, _raw(served, path, json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
         "outputs": [{"name": "y"}, {"name": "y"}]}).encode()), "output 'y' is requested twice")
    # an id the answer could not echo (a lone surrogate): was a 500 after the model ran
    check_raw(400, _raw(served, path, b'{"id": "\\ud800", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
                                      b'"data": [1]}]}'), "the request's 'id' is not valid Unicode")
    check_raw(400, _raw(served, path, b"not gzip", {"Content-Encoding": "gzip"}), "cannot be decompressed")
    check_raw(400, _raw(served, path, gzip.compress(good)[:-12], {"Content-Encoding": "gzip"}),
              "ends before its compressed data does")
    for name in (b"Inference-Header-Content-Length", b"Content-Encoding"):  # a second copy is never ignored
        value = str(len(good)).encode() if name.startswith(b"Inference") else b"identity"
        check_raw(400, _raw(served, path, payload, [(name, value), (name, value)]),
                  f"header {name.decode().lower()!r} is given more than once")

    # what numpy, the JSON decoder or a float cannot take is the client's error too, never a 500
    check_raw(400, _raw(served, path, b"[" * 100_000), "malformed JSON")
    deep = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}]}"
    check_raw(400, _raw(served, path, deep), "input 'x'", "not FP32 data")
    check_raw(400, _raw(served, path, b'{"parameters": {"timeout": 1' + b"0" * 400 + b'}, "inputs": []}'),
              "'timeout'", "finite")
    check_raw(400, _raw(served, path, payload, [(b"Inference-Header-Content-Length", "\u00b2".encode("latin-1"))]),
              "Inference-Header-Content-Length")
    for shape, raw in (([2**63, 0], False), ([2**62, 0], True)):  # no elements, but beyond any array
        t: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": shape}
        t.update({"parameters": {"binary_data_size": 0}} if raw else {"data": []})
        head = json.dumps({"inputs": [t]}).encode()
        check_raw(400, _raw(served, "/v2/models/grid/infer", head, {"Inference-Header-Content-Length": str(len(head))}),
                  "input 'x'", "too large")
    # BYTES: a short header may declare any count; refused before anything is allocated for it
    head = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2**40],
                                   "parameters": {"binary_data_size": 0}}]}).encode()
    check_raw(400, _raw(served, "/v2/models/upper/infer", head, {"Inference-Header-Content-Length": str(len(head))}),
              "input 's'", "hold at most 0")
    check("500", lambda: client.infer("bad_bytes", [vec("x", f32)]), "output 'u'", "declared BYTES",
          "type int")


def test_bad_requests_get_their_status_while_good_load_completes_once(served: Served) -> None:
    before = served.rt.stats()["echo"]
    n_good = 300
    results: list[bool] = []

    def good_load() -> None:
        c = new_client(served)
        try:
            for k in range(n_good):
                x = np.array([k, k + 1], np.float32)
                results.append(bool(np.array_equal(c.infer("echo", [vec("x", x)]).as_numpy("y"), x * 2)))
        finally:
            c.close()

    with ThreadPoolExecutor(2) as pool:
        load = pool.submit(good_load)
        c = new_client(served)
        rounds = 0
        while not load.done() or rounds == 0:
            _bad_requests(served, c)
            rounds += 1
            if rounds >= 20:
                break
        c.close()
        load.result()
    assert results == [True] * n_good
    after = served.rt.stats()["echo"]
    assert after.submitted - before.submitted == n_good
    assert after.completed - before.completed == n_good
    assert (after.failed, after.rejected, after.expired, after.cancelled) == (
        before.failed, before.rejected, before.expired, before.cancelled)
    assert served.rt.stats()["fails"].failed >= rounds  # the 500s reached the model each round


def test_request_headers_over_the_limit_get_431_and_the_connection_closed() -> None:
    # Neither uvicorn nor httptools bounded them: a client sending headers without end grew the
    # server by 1.3 GB and held its loop (HTTP and gRPC) for seconds.
    import socket

    with echo_server(max_header_bytes=4096) as s:
        url = f"http://127.0.0.1:{s.http_port}/v2/models/echo/infer"
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
        assert httpx.post(url, json=body, headers={"x-pad": "p" * 3000}, timeout=30).status_code == 200
        for headers, path in (({"x-pad": "p" * 5000}, ""), ({f"x-{i}": "v" for i in range(600)}, ""),
                              ({}, "?" + "q" * 5000)):
            r = httpx.post(url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 431 and r.headers["connection"] == "close", r.text
            assert "the request line and headers exceed the limit of 4096 bytes" in r.text
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
            c.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nx-a: ")
            sent = 0
            try:
                while sent < 1 << 20:  # a header that never ends: cut off, not buffered
                    c.sendall(b"a" * 8192)
                    sent += 8192
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                cut = sent < 1 << 20 or http_response(c).startswith(b"HTTP/1.1 431")
            except ConnectionResetError:
                # The server closed with this client's bytes unread: the kernel answers with a
                # reset, which drops the 431 already received. Cut off all the same.
                cut = True
            assert cut
        # a body as large as it likes still arrives: the bound is the headers'
        big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [20000], "data": [1.0] * 20000}]}
        assert httpx.post(url, json=big, timeout=30).status_code == 200
        with pytest.raises(ap.QuotaError, match="max_header_bytes must be an integer >= 1024"):
            Server(s.frontend.rt, {"echo": signatures()["echo"]}, max_header_bytes=100)


def test_pipelined_headers_over_the_limit_wait_for_the_answers_before_them() -> None:
    # A 431 went out in place of the answer to the request before it on the connection (the
    # client read it as that reply), and a request that followed a complete one in the same
    # chunk was never measured at all (served with 8,000 bytes of headers under a 4096 bound).
    import socket

    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}'
    first = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: " + str(len(body)).encode()
             + b"\r\n\r\n" + body)
    oversized = b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nx-pad: " + b"p" * 8000 + b"\r\n\r\n"
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: (time.sleep(0.5), x)[1])
    rt.start()
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=None, max_header_bytes=4096) as s:
            for together in (False, True):
                with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
                    if together:
                        c.sendall(first + oversized)
                    else:
                        c.sendall(first)
                        time.sleep(0.2)  # the first is running
                        c.sendall(oversized)
                    got = b""
                    while chunk := c.recv(65536):
                        got += chunk
                assert got.startswith(b"HTTP/1.1 200"), got[:200]
                assert got.count(b"HTTP/1.1 431") == 1 and got.index(b"HTTP/1.1 431") > got.index(b'"data":[1.0]')
    finally:
        rt.close()


def test_bytes_that_are_no_http_after_a_request_wait_for_its_answer(caplog: pytest.LogCaptureFixture) -> None:
    # A valid request followed on its connection by bytes the parser refuses: the 400 went out at
    # once and closed the connection, so the valid request ran but its answer was lost (the
    # client read the 400 as its reply).
    import socket

    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}'
    first = (b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: " + str(len(body)).encode()
             + b"\r\n\r\n" + body)
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: (time.sleep(0.3), x)[1])
    rt.start()
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=None) as s:
            for garbage in (b"BREW /pot HTTP/1.1\r\n\r\n", b"\x00\x01 not http\r\n\r\n"):
                with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
                    c.sendall(first + garbage)
                    got = b""
                    while chunk := c.recv(65536):
                        got += chunk
                assert got.startswith(b"HTTP/1.1 200"), got[:300]
                assert got.count(b"HTTP/1.1 400") == 1 and got.index(b"HTTP/1.1 400") > got.index(b'"data":[1.0]')
                assert got.endswith(b"the request is not valid HTTP/1.1 (its parser refused it)"), got[-200:]
            # uvicorn's warning for each ("Invalid HTTP request received."): a few at a time.
            assert sum("Invalid HTTP request" in r.getMessage() for r in caplog.records) <= 1, caplog.records
            # A bad chunk in a request's own body: the 400 at once (it waited for the body
            # deadline, then answered 408 in its place).
            with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
                c.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\n{\"inp\r\nZZZ\r\n")
                got = b""
                while chunk := c.recv(65536):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 400 Bad Request") and len(re.findall(rb"HTTP/1\.1 \d{3}", got)) == 1, got
            # Alone on its connection: the 400 at once.
            with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as c:
                c.sendall(b"BREW /pot HTTP/1.1\r\n\r\n")
                got = b""
                while chunk := c.recv(65536):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 400 Bad Request") and b"connection: close" in got, got
    finally:
        rt.close()


def test_uvicorns_warnings_are_logged_a_few_at_a_time() -> None:
    import logging

    from apportion.serve._frontend import REPORT_EVERY_S
    from apportion.serve.server import _EveryFewSeconds

    now = [100.0]
    f = _EveryFewSeconds(clock=lambda: now[0])

    def rec(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, (), None)

    assert f.filter(rec("Invalid HTTP request received."))
    assert not any(f.filter(rec("Invalid HTTP request received.")) for _ in range(1999))
    assert f.filter(rec("Unsupported upgrade request."))  # another message: its own count
    assert f.filter(rec("Invalid HTTP request received.", logging.ERROR))  # errors always
    now[0] += REPORT_EVERY_S
    later = rec("Invalid HTTP request received.")
    assert f.filter(later)
    assert later.getMessage() == ("Invalid HTTP request received. (1999 more since the last line about it, "
                                  f"{REPORT_EVERY_S:.0f} s ago)")


def test_body_over_the_limit_is_413() -> None:
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x * 2)
    rt.start()
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=None,
                    max_body_bytes=4096) as server:
            c = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
            e = error_of(lambda: c.infer("echo", [vec("x", np.ones(2048, np.float32))]))
            assert e.status() == "413" and "4096" in e.message()
            # the server still serves, on a fresh connection and on that client's
            ok = c.infer("echo", [vec("x", np.ones(16, np.float32))]).as_numpy("y")
            np.testing.assert_array_equal(ok, np.full(16, 2, np.float32))
            c.close()
            # a chunked body (no Content-Length) is cut off as it arrives
            url = f"http://127.0.0.1:{server.http_port}/v2/models/echo/infer"
            r = httpx.post(url, content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
            assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]
            # The connection ends with the 413: the rest of that body would be read as a request.
            assert r.headers["connection"] == "close"
    finally:
        rt.close()


# -- draining ------------------------------------------------------------------------------------
def test_stop_drains_admitted_requests_and_refuses_new_ones() -> None:
    gate = Gate()
    rt = ap.Runtime()
    rt.add_model("gate", model=gate, max_queue=4)
    rt.start()
    try:
        server = Server(rt, {"gate": signatures()["gate"]}, http_port=0, grpc_port=None).start()
        url = f"127.0.0.1:{server.http_port}"
        with ThreadPoolExecutor(4) as pool:
            admitted = [pool.submit(lambda k=k: th.InferenceServerClient(url, network_timeout=60).infer(
                "gate", [vec("x", [float(k)])]).as_numpy("y")) for k in range(3)]
            while rt.stats()["gate"].submitted < 3:
                time.sleep(0.01)
            assert not server.stopping.is_set()
            stopping = pool.submit(server.stop)
            while not server.frontend.draining:
                time.sleep(0.01)
            assert server.stopping.is_set()  # from the drain's start, not its end
            c = th.InferenceServerClient(url)
            assert not c.is_server_ready() and not c.is_model_ready("gate")
            assert c.is_server_live()
            e = error_of(lambda: c.infer("gate", [vec("x", [9.0])]))
            assert e.status() == "503" and "shutting down" in e.message()
            c.close()
            assert not stopping.done()
            gate.release.set()
            stopping.result()
            assert sorted(float(f.result()[0]) for f in admitted) == [0.0, 1.0, 2.0]
        s = rt.stats()["gate"]
        assert s.submitted == s.completed == 3
        server.stop()  # idempotent
    finally:
        gate.release.set()
        rt.close()


# -- embedding -----------------------------------------------------------------------------------
def test_asgi_app_inside_fastapi() -> None:
    fastapi = pytest.importorskip("fastapi")
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x * 2)
    rt.start()
    app = fastapi.FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:  # async: a sync route would leave an idle worker thread
        return {"hello": "world"}

    app.mount("/kserve", asgi(rt, {"echo": signatures()["echo"]}))

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            assert (await h.get("/hello")).json() == {"hello": "world"}
            assert (await h.get("/kserve/v2/health/ready")).status_code == 200
            assert (await h.get("/kserve/v2/models/echo")).json()["inputs"][0]["name"] == "x"
            r = await h.post("/kserve/v2/models/echo/infer", json={
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]})
            assert r.status_code == 200
            assert r.json()["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2], "data": [2.0, 4.0]}]
            r = await h.post("/kserve/v2/models/nope/infer", json={})
            assert r.status_code == 404 and "unknown model" in r.json()["error"]

    try:
        asyncio.run(run())
    finally:
        rt.close()


def test_the_asgi_app_under_trio_fails_its_startup_and_answers_500_saying_why() -> None:
    # Under trio every infer and /metrics answered 500 "no running event loop" while health
    # and readiness answered 200 and lifespan startup succeeded: a probe saw a healthy server.
    trio = pytest.importorskip("trio")
    from apportion.serve.app import NOT_ASYNCIO

    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x * 2)
    rt.start()
    app = asgi(rt, {"echo": signatures()["echo"]})
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        inbox = [{"type": "lifespan.startup"}]

        async def receive() -> dict[str, Any]:
            return inbox.pop(0)

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            for path in ("/v2/health/ready", "/v2/models/echo", "/metrics"):
                r = await h.get(path)
                assert r.status_code == 500 and r.json()["error"] == NOT_ASYNCIO, (path, r.text)
            r = await h.post("/v2/models/echo/infer", json={
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
            assert r.status_code == 500 and "runs on an asyncio event loop" in r.json()["error"]

    try:
        trio.run(run)
        assert sent == [{"type": "lifespan.startup.failed", "message": NOT_ASYNCIO}]
        assert "trio?" in NOT_ASYNCIO and "uvicorn" in NOT_ASYNCIO
    finally:
        rt.close()


def test_metrics_route_reads_the_runtimes_counters(served: Served) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client = th.InferenceServerClient(served.http)
    for _ in range(5):
        inp = th.InferInput("x", [2], "FP32")
        inp.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
        client.infer("echo", [inp])
    r = httpx.get(f"http://{served.http}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    stats = served.rt.stats()["echo"]
    samples = {(s.name, s.labels.get("model"), s.labels.get("outcome")): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples[("apportion_requests_total", "echo", "completed")] == stats.completed >= 5
    assert samples[("apportion_requests_submitted_total", "echo", None)] == stats.submitted
    assert samples[("apportion_model_cpu_seconds_total", "echo", None)] >= 0.0  # every model has one


def answered(served: Served) -> dict[tuple[str, str, str], float]:
    """apportion_server_requests_total on the server's /metrics, by (model, protocol, status)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{served.http}/metrics").text
    return {(s.labels["model"], s.labels["protocol"], s.labels["status"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "apportion_server_requests_total"}


def test_metrics_count_what_each_front_answered_by_status(served: Served) -> None:
    # A result that did not fit the model's outputs answered 500 while the runtime counted it
    # completed, and requests refused before the runtime (bad input, unknown model) counted
    # nowhere: /metrics read all well while clients saw errors.
    tg = pytest.importorskip("tritonclient.grpc")
    before = answered(served)
    completed = served.rt.stats()["bad_output"].completed
    client, rpc = th.InferenceServerClient(served.http), tg.InferenceServerClient(served.grpc)

    def grpc_vec(values: list[float], datatype: str = "FP32") -> Any:
        i = tg.InferInput("x", [len(values)], datatype)
        i.set_data_from_numpy(np.asarray(values, dtype=triton_to_np_dtype(datatype)))
        return i

    for _ in range(3):
        client.infer("echo", [vec("x", [1.0, 2.0])])
    rpc.infer("echo", [grpc_vec([1.0])])
    assert error_of(lambda: client.infer("bad_output", [vec("x", [1.0])])).status() == "500"
    with pytest.raises(tg.InferenceServerException, match="declared INT64"):
        rpc.infer("bad_output", [grpc_vec([1.0])])
    assert error_of(lambda: client.infer("fails", [vec("x", [1.0])])).status() == "500"
    assert error_of(lambda: client.infer("echo", [vec("x", [1, 2], "INT32")])).status() == "400"
    assert error_of(lambda: client.infer("no such model", [vec("x", [1.0])])).status() == "404"
    assert httpx.get(f"http://{served.http}/v2/models/echo/infer").status_code == 405
    # Infer paths that name no served model, or an empty version, are counted too.
    assert httpx.post(f"http://{served.http}/v2/models/team/nope/infer", json={}).status_code == 404
    assert httpx.post(f"http://{served.http}/v2/models/echo/versions//infer", json={}).status_code == 404
    with pytest.raises(tg.InferenceServerException, match="unknown model"):
        rpc.infer("nor this one", [grpc_vec([1.0])])
    client.close()
    rpc.close()
    after = answered(served)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert delta == {("echo", "http", "ok"): 3, ("echo", "grpc", "ok"): 1,
                     ("bad_output", "http", "output_mismatch"): 1, ("bad_output", "grpc", "output_mismatch"): 1,
                     ("fails", "http", "model_failed"): 1, ("echo", "http", "invalid"): 1,
                     ("echo", "http", "not_allowed"): 1,
                     ("", "http", "not_found"): 2, ("", "grpc", "not_found"): 1, ("echo", "http", "not_found"): 1}, delta
    # The runtime's own count: the model's calls returned.
    assert served.rt.stats()["bad_output"].completed - completed == 2


def test_failures_are_logged_once_per_model_and_kind_per_interval_saying_how_many_were_not(
        caplog: pytest.LogCaptureFixture) -> None:
    from apportion.serve import _frontend as fe

    now = [100.0]
    failures = fe.Failures(clock=lambda: now[0])
    try:
        raise ValueError("boom")
    except ValueError as e:
        error = e
    with caplog.at_level("ERROR", logger="apportion.serve"):
        assert failures.report("a", fe.MODEL_FAILED, "model 'a' failed: ValueError: boom", error)
        assert not failures.report("a", fe.MODEL_FAILED, "model 'a' failed: ValueError: boom", error)
        now[0] += 3
        assert not failures.report("a", fe.MODEL_FAILED, "model 'a' failed: ValueError: boom", error)
        assert failures.report("b", fe.MODEL_FAILED, "model 'b' failed: KeyError: 1")  # another model
        assert failures.report("a", fe.OUTPUT_MISMATCH, "model 'a', output 'y': ...")  # another kind
        now[0] += fe.REPORT_EVERY_S
        assert failures.report("a", fe.MODEL_FAILED, "model 'a' failed: ValueError: again")
    assert [r.getMessage() for r in caplog.records] == [
        "model 'a' failed: ValueError: boom", "model 'b' failed: KeyError: 1", "model 'a', output 'y': ...",
        "model 'a' failed: ValueError: again (2 more since the last line about it, 13 s ago)"]
    assert caplog.records[0].exc_info is not None and caplog.records[0].exc_info[1] is error
    assert caplog.records[1].exc_info is None
    # At a stop, what no line counted yet is said (once).
    caplog.clear()
    with caplog.at_level("ERROR", logger="apportion.serve"):
        assert not failures.report("a", fe.MODEL_FAILED, "model 'a' failed: ValueError: boom", error)
        assert not failures.report("a", fe.MODEL_FAILED, "model 'a' failed: ValueError: boom", error)
        failures.flush()
        failures.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "model 'a': 2 more failure(s) (model_failed) since the last line about it"]


def test_a_failed_batch_says_it_was_shared(served: Served) -> None:
    # Every request of a failed batch got its batch-mates' error, with no word that it was
    # not its own.
    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(lambda _: error_of(lambda: new_client(served).infer(
            "fails_batch", [vec("x", [1.0, 2.0])])), range(4)))
    assert all(e.status() == "500" and "refused" in e.message() for e in errors)
    shared = [e.message() for e in errors if "serving a batch of" in e.message()]
    assert shared, [e.message() for e in errors]
    assert all(re.search(r"ValueError: batch of (\d) refused \(raised by one call of model 'fails_batch' serving a "
                         r"batch of \1 requests, each of which fails with it\)", m) for m in shared), shared


def test_signature_with_one_spec_each() -> None:
    sig = Signature(TensorSpec("x", "FP64", [2]), TensorSpec("y", "FP64", [2]))  # type: ignore[arg-type]
    assert sig.inputs == (TensorSpec("x", "FP64", (2,)),)


# -- lifecycle, from an adversarial review -----------------------------------------------------------
@contextlib.contextmanager
def gated_server(**options: Any) -> Iterator[tuple[Any, Server]]:
    """A started Server (HTTP only unless ``options`` say) over one "echo" model that is a
    serve_models.Gate: yields the gate and the server; releases, stops and closes after."""
    from serve_models import Gate

    gate = Gate()
    rt = ap.Runtime()
    rt.add_model("echo", model=gate)
    rt.start()
    server = Server(rt, {"echo": signatures()["echo"]}, **{"http_port": 0, "grpc_port": None, **options}).start()
    try:
        yield gate, server
    finally:
        gate.release.set()
        server.stop()
        rt.close()


def _post(port: int, x: float) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v2/models/echo/infer", timeout=30,
                      json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [x]}]})


def test_stop_without_drain_answers_the_running_requests_503() -> None:
    # The embedded server's loop closed with their tasks: the clients got no answer at all.
    with gated_server() as (gate, server), ThreadPoolExecutor(2) as pool:
        running = pool.submit(_post, server.http_port, 1.0)
        assert gate.entered.wait(30)
        server.stop(drain=False)
        r = running.result(30)
        assert r.status_code == 503 and "the server stopped before this request completed" in r.json()["error"]
        # Counted as the server's unavailability (not as its client leaving).
        assert server.frontend.answers() == {("echo", "http", "unavailable"): 1}


def test_answers_during_a_drain_close_their_connection() -> None:
    # Without Connection: close, a client reused the connection for its next request and raced
    # the server closing it: no answer at all instead of 503.
    with gated_server(drain_timeout_s=30) as (gate, server), ThreadPoolExecutor(2) as pool, \
            httpx.Client(timeout=30) as client:
        url = f"http://127.0.0.1:{server.http_port}/v2/models/echo/infer"
        assert client.get(f"http://127.0.0.1:{server.http_port}/v2/health/live").status_code == 200
        assert "close" not in client.get(f"http://127.0.0.1:{server.http_port}/v2/health/live").headers.get(
            "connection", "")
        running = pool.submit(_post, server.http_port, 1.0)
        assert gate.entered.wait(30)
        stopping = pool.submit(server.stop)
        while not server.frontend.draining:
            time.sleep(0.005)
        r = client.post(url, json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]})
        assert r.status_code == 503 and r.headers["connection"] == "close"
        gate.release.set()
        assert running.result(30).status_code == 200
        stopping.result(30)


def test_a_drain_ends_within_its_timeout_whatever_is_still_running() -> None:
    # The admitted requests' wait, gRPC's fixed grace and uvicorn's own graceful shutdown each
    # took up to the timeout in turn: ~2x drain_timeout_s + 1 s.
    with gated_server(grpc_port=0, drain_timeout_s=2.0) as (gate, server), ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_post, server.http_port, float(k)) for k in range(3)]
        assert gate.entered.wait(30)
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        gate.release.set()
        codes = sorted(f.result(30).status_code for f in running)
        assert took < 2.0 + 1.5, took  # the timeout, and a slow machine's margin (before: ~5 s)
        assert server.drained is False and codes == [503, 503, 503]


def test_requests_of_a_model_that_failed_to_start_are_not_said_to_have_lost_their_client() -> None:
    # A request queued while add_model built the model, cancelled when its warm-up failed, read
    # "the request was cancelled: its client went away".
    from apportion.serve import Signature, TensorSpec

    entered, release = threading.Event(), threading.Event()

    def factory(ctx: Any) -> Any:
        entered.set()
        release.wait(30)
        raise RuntimeError("no weights")

    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x)
    rt.start()
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("x", "FP32", [-1])])
    server = Server(rt, {"echo": signatures()["echo"], "late": sig}, http_port=0, grpc_port=None).start()
    try:
        with ThreadPoolExecutor(2) as pool:
            adding = pool.submit(rt.add_model, "late", factory=factory)
            assert entered.wait(30)
            queued = pool.submit(lambda: httpx.post(
                f"http://127.0.0.1:{server.http_port}/v2/models/late/infer", timeout=30,
                json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}))
            for _ in range(3000):
                if "late" in rt.stats() and rt.stats()["late"].queued:
                    break
                time.sleep(0.01)
            release.set()
            with pytest.raises(RuntimeError, match="no weights"):
                adding.result(30)
            r = queued.result(30)
        assert r.status_code == 503, r.text
        assert "cancelled before it ran" in r.json()["error"] and "client went away" not in r.json()["error"]
    finally:
        release.set()
        server.stop()
        rt.close()


def test_a_slow_metrics_scrape_does_not_hold_other_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    # The text was made on the event loop: with 30 models each scrape held every request and
    # probe for 55-100 ms.
    from apportion.metrics import RuntimeMetrics

    real = RuntimeMetrics.text

    def slow(self: RuntimeMetrics) -> bytes:
        time.sleep(1.0)
        return real(self)

    monkeypatch.setattr(RuntimeMetrics, "text", slow)
    with echo_server() as s, ThreadPoolExecutor(1) as pool:
        scrape = pool.submit(httpx.get, f"http://127.0.0.1:{s.http_port}/metrics", timeout=30)
        time.sleep(0.2)
        started = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{s.http_port}/v2/health/ready", timeout=30).status_code == 200
        assert time.monotonic() - started < 0.6
        assert scrape.result(30).status_code == 200


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt("ctrl-c in a model"),
                                    asyncio.CancelledError("model's own"), GeneratorExit()])
def test_a_model_raising_a_base_exception_fails_its_request_not_the_server(raised: BaseException) -> None:
    # Over gRPC a model's SystemExit left the request task and stopped the server's loop (the
    # process exited 3 under serve_forever); over HTTP uvicorn answered a plain-text 500 with an
    # "Exception in ASGI application" traceback; a CancelledError went unanswered.
    tg = pytest.importorskip("tritonclient.grpc")

    def bad(x: Any) -> Any:
        raise raised

    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("x", "FP32", [-1])])
    rt = ap.Runtime()
    rt.add_model("bad", model=bad)
    rt.add_model("ok", model=lambda x: x)
    rt.start()
    server = Server(rt, {"bad": sig, "ok": sig}, http_port=0, grpc_port=0).start()
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
        r = httpx.post(f"http://127.0.0.1:{server.http_port}/v2/models/bad/infer", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"].startswith(f"model 'bad' failed: {type(raised).__name__}")
        client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        x = tg.InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.ones(1, np.float32))
        with pytest.raises(InferenceServerException, match=f"model 'bad' failed: {type(raised).__name__}") as e:
            client.infer("bad", [x], client_timeout=20)
        assert e.value.status() == "StatusCode.INTERNAL"
        # The server goes on serving.
        assert client.infer("ok", [x], client_timeout=20).as_numpy("x").tolist() == [1.0]
        r = httpx.post(f"http://127.0.0.1:{server.http_port}/v2/models/ok/infer", json=body, timeout=30)
        assert r.status_code == 200 and server._thread.is_alive()
        client.close()
    finally:
        server.stop()
        rt.close()


def test_infer_on_a_runtime_not_started_is_503_at_once() -> None:
    # The runtime queued the request until start(): the client waited for its own timeout.
    sig = Signature([TensorSpec("x", "FP32", [-1])], [TensorSpec("x", "FP32", [-1])])
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x)
    try:
        async def run() -> None:
            transport = httpx.ASGITransport(app=asgi(rt, {"echo": sig}))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/v2/models/echo/ready")).status_code == 400
                r = await asyncio.wait_for(client.post("/v2/models/echo/infer", json={"inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}), 20)
                assert r.status_code == 503
                assert r.json()["error"] == "model 'echo' is not ready: the runtime is not started"

        asyncio.run(run())
        assert rt.stats()["echo"].submitted == 0
    finally:
        rt.close()


def test_a_websocket_to_the_server_is_refused_with_403() -> None:
    # The app returned without a word: uvicorn answered 500 and logged "ASGI callable returned
    # without completing handshake"; Starlette's test client hung.
    websockets = pytest.importorskip("websockets.sync.client", reason="websockets is not installed: pip install '.[test]'")
    from websockets.exceptions import InvalidStatus

    with gated_server() as (gate, server):
        gate.release.set()
        with pytest.raises(InvalidStatus) as refused:
            websockets.connect(f"ws://127.0.0.1:{server.http_port}/v2/models/echo/infer", open_timeout=20)
        assert refused.value.response.status_code == 403
        assert httpx.get(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=20).status_code == 200


@pytest.mark.parametrize("drain", [True, False])
def test_grpc_calls_still_waiting_when_the_drain_ends_are_unavailable_not_cancelled(drain: bool) -> None:
    # gRPC's own stop cancelled them: clients read CANCELLED, which says the client gave up.
    tg = pytest.importorskip("tritonclient.grpc")
    with gated_server(grpc_port=0, drain_timeout_s=0.5) as (gate, server), ThreadPoolExecutor(4) as pool:
        def call(k: int) -> Any:
            client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
            x = tg.InferInput("x", [1], "FP32")
            x.set_data_from_numpy(np.full(1, k, np.float32))
            try:
                return client.infer("echo", [x], client_timeout=30)
            except InferenceServerException as e:
                return e
            finally:
                client.close()

        running = [pool.submit(call, k) for k in range(3)]
        assert gate.entered.wait(30)
        while server.frontend.in_flight < 3:
            time.sleep(0.005)
        server.stop(drain=drain)
        gate.release.set()
        errors = [f.result(30) for f in running]
        assert all(isinstance(e, InferenceServerException) for e in errors), errors
        assert {e.status() for e in errors} == {"StatusCode.UNAVAILABLE"}, [(e.status(), e.message()) for e in errors]
        assert all("the server stopped before this request completed" in e.message() for e in errors)


def test_json_through_orjson_reads_and_writes_what_pythons_json_did(served: Served) -> None:
    # Requests and answers are parsed and written by orjson (6x and 13x Python's json on
    # tensor-sized JSON); what orjson refuses or would write differently goes through Python's
    # json, so every answer is what it was.
    url = f"http://{served.http}/v2/models/echo/infer"

    def infer(text: str) -> Any:
        return httpx.post(url, content=text.encode(), headers={"content-type": "application/json"}, timeout=30)

    big = np.linspace(-3, 3, 20_000, dtype=np.float32)
    r = infer(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [big.size], "data": big.tolist()}]}))
    assert r.status_code == 200
    np.testing.assert_array_equal(np.asarray(r.json()["outputs"][0]["data"], np.float32), big * 2)
    # NaN and Infinity (not JSON, but what Python's json and tritonclient write) in and out.
    r = infer('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [NaN, Infinity, 1.5]}]}')
    assert r.status_code == 200 and b"[NaN,Infinity,3.0]" in r.content
    # A number literal beyond every float (Python's json read it as an infinity nobody sent): a
    # malformed request, as a finite number past FP32's range is out of range. UTF-16 JSON: as
    # Python's json reads it.
    r = infer('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e400]}]}')
    assert r.status_code == 400 and "the number 1e400 is beyond a 64-bit float" in r.json()["error"], r.text
    r = httpx.post(url, content=json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                        "data": [2.0]}]}).encode("utf-16"), timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0]
    # An integer beyond 64 bits for an integer input is refused, naming it.
    r = httpx.post(f"http://{served.http}/v2/models/multi/infer", timeout=30, json={"inputs": [
        {"name": "a", "datatype": "INT32", "shape": [1], "data": [2**64]},
        {"name": "b", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
    assert r.status_code == 400 and "input 'a'" in r.json()["error"], r.text
    # Malformed JSON still says where.
    r = infer('{"inputs": [')
    assert r.status_code == 400 and "malformed JSON request" in r.json()["error"]
