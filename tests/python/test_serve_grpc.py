"""KServe v2 over gRPC (GRPCInferenceService), spoken by the real tritonclient against a Server
on 127.0.0.1."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("uvicorn")
tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException, triton_to_np_dtype  # noqa: E402

import apportion as ap  # noqa: E402
from apportion.serve import Server  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_models import Gate, Served, served, signatures  # noqa: E402,F401 (served: a fixture)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(served: Served) -> Iterator[Any]:
    c = new_client(served)
    yield c
    c.close()


def new_client(served: Served) -> Any:
    return tg.InferenceServerClient(served.grpc)


def vec(name: str, values: Any, datatype: str = "FP32") -> Any:
    arr = np.asarray(values)
    if datatype != "BYTES":
        arr = arr.astype(triton_to_np_dtype(datatype))
    i = tg.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr)
    return i


def status_of(fn: Any, code: str, *words: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        fn()
    e = info.value
    assert e.status() == f"StatusCode.{code}", (e.status(), e.message())
    for w in words:
        assert w in e.message(), (w, e.message())


def test_health_and_metadata(client: Any, served: Served) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("echo")
    md = client.get_server_metadata(as_json=True)
    assert md["name"] == "apportion" and md["version"] == ap.__version__
    mm = client.get_model_metadata("multi", as_json=True)
    assert mm["versions"] == ["1"] and mm["platform"] == "apportion_numpy"
    assert [(t["name"], t["datatype"], t["shape"]) for t in mm["inputs"]] == [
        ("a", "INT32", ["-1"]), ("b", "FP32", ["-1"])]
    status_of(lambda: client.get_model_metadata("nope"), "NOT_FOUND", "unknown model 'nope'")
    # An unknown model or version is not ready (was NOT_FOUND; HTTP's 404 reads false too).
    assert client.is_model_ready("nope") is False and client.is_model_ready("echo", model_version="2") is False
    status_of(lambda: client.get_model_metadata("echo", model_version="2"), "NOT_FOUND", "version '2'")
    status_of(lambda: client.get_model_config("echo"), "UNIMPLEMENTED")


def test_infer_raw_contents(client: Any) -> None:
    x = np.arange(6, dtype=np.float32)
    r = client.infer("echo", [vec("x", x)], request_id="g-1")
    np.testing.assert_array_equal(r.as_numpy("y"), x * 2)
    assert r.get_response().id == "g-1" and r.get_response().model_version == "1"


def test_infer_typed_contents(served: Served) -> None:
    # Typed InferTensorContents instead of raw_input_contents (tritonclient always sends raw).
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
    import grpc

    with grpc.insecure_channel(served.grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="multi")
        a = req.inputs.add(name="a", datatype="INT32", shape=[2])
        a.contents.int_contents.extend([1, 2])
        b = req.inputs.add(name="b", datatype="FP32", shape=[2])
        b.contents.fp32_contents.extend([0.5, 1.5])
        resp = stub.ModelInfer(req, timeout=30)
        assert [o.name for o in resp.outputs] == ["sum", "tag"]
        np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], np.float32), [1.5, 3.5])
        req = pb.ModelInferRequest(model_name="echo")
        req.inputs.add(name="x", datatype="FP32", shape=[2]).contents.int64_contents.extend([1, 2])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # It read "needs 2 elements, 'data' has 0" (an HTTP word), naming neither field.
        assert ("input 'x': FP32 data travels in contents.fp32_contents (or raw_input_contents), got "
                "contents.int64_contents") in info.value.details()
        # both the right field and another: the other was ignored
        req = pb.ModelInferRequest(model_name="echo")
        x = req.inputs.add(name="x", datatype="FP32", shape=[2])
        x.contents.fp32_contents.extend([1, 2])
        x.contents.int_contents.extend([3, 4])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=30)
        assert "got contents.int_contents" in info.value.details()
        # no data at all (raw_input_contents forgotten)
        req = pb.ModelInferRequest(model_name="echo")
        req.inputs.add(name="x", datatype="FP32", shape=[2])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'x': no data: give it in raw_input_contents or contents.fp32_contents" in info.value.details()
        # ... which an empty tensor needs none of
        req = pb.ModelInferRequest(model_name="echo")
        req.inputs.add(name="x", datatype="FP32", shape=[0])
        assert stub.ModelInfer(req, timeout=30).outputs[0].shape == [0]
        # typed contents and raw_input_contents together: the protocol allows one or the other
        req = pb.ModelInferRequest(model_name="echo")
        req.inputs.add(name="x", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1, 2])
        req.raw_input_contents.append(np.array([3, 4], np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'x'" in info.value.details() and "not both" in info.value.details()
        # no elements, yet a shape no array can have; and a BYTES count the bytes cannot hold
        for model, name, datatype, shape in (("grid", "x", "FP32", [2**62, 0]), ("upper", "s", "BYTES", [2**40])):
            req = pb.ModelInferRequest(model_name=model)
            req.inputs.add(name=name, datatype=datatype, shape=shape)
            req.raw_input_contents.append(b"")
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(req, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert f"input {name!r}" in info.value.details()


def test_several_inputs_and_bytes(client: Any) -> None:
    r = client.infer("multi", [vec("a", [1, 2, 3], "INT32"), vec("b", [0.5, 0.5, 0.5])])
    np.testing.assert_array_equal(r.as_numpy("sum"), np.array([1.5, 2.5, 3.5], np.float32))
    assert r.as_numpy("tag").tolist() == [b"n=3"]
    r = client.infer("upper", [vec("s", np.array([b"ab", b"c"], dtype=object), "BYTES")])
    assert r.as_numpy("u").tolist() == [b"AB", b"C"]


def test_torch_model_gets_tensors(client: Any) -> None:
    pytest.importorskip("torch")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    r = client.infer("torch", [vec("x", x)], outputs=[tg.InferRequestedOutput("y")])
    np.testing.assert_array_equal(r.as_numpy("y"), np.stack([x.sum(1), x.max(1)], 1))


def test_batching(served: Served) -> None:
    def one(k: int) -> np.ndarray:
        c = new_client(served)
        try:
            return c.infer("batched", [vec("x", np.full(4, k))]).as_numpy("y")
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(16)))
    for k, y in enumerate(outs):
        np.testing.assert_array_equal(y, np.full(4, 10 * k, np.float32))
    assert max(served.batched.sizes) > 1


def test_deadline_queue_full_and_priority(served: Served) -> None:
    g = served.gate
    pool, first = served.block(lambda k: new_client(served).infer("gate", [vec("x", [k])]))
    try:
        # Expires at its 20 ms deadline while the instance is still busy, and frees its place
        # in the queue (max_queue=3) at once: three more fit after it.
        late = pool.submit(lambda: new_client(served).infer("gate", [vec("x", [0.0])], timeout=20_000))
        status_of(late.result, "DEADLINE_EXCEEDED", "gate")
        low = pool.submit(lambda: new_client(served).infer("gate", [vec("x", [1.0])], priority=2))
        served.wait_queued(1)
        low2 = pool.submit(lambda: new_client(served).infer("gate", [vec("x", [3.0])], priority=2))
        served.wait_queued(2)
        high = pool.submit(lambda: new_client(served).infer("gate", [vec("x", [2.0])], priority=1))
        served.wait_queued(3)
        status_of(lambda: new_client(served).infer("gate", [vec("x", [9.0])]), "RESOURCE_EXHAUSTED",
                  "gate")
    finally:
        g.release.set()
        pool.shutdown()
    for f in (first, low, low2, high):
        assert f.result().as_numpy("y").shape == (1,)
    assert g.order == [-1.0, 2.0, 1.0, 3.0]


def test_client_deadline_bounds_the_queue_wait(served: Served) -> None:
    g = served.gate
    pool, first = served.block(lambda k: new_client(served).infer("gate", [vec("x", [k])]))
    before = served.rt.stats()["gate"]
    settled = before.expired + before.cancelled
    try:
        status_of(lambda: new_client(served).infer("gate", [vec("x", [5.0])], client_timeout=0.2),
                  "DEADLINE_EXCEEDED")
        # The server's deadline for it is the client's timeout from when the request arrived,
        # a transit later than the client's own: the gate opens only once the server has
        # settled it, or a worker freed at once could still take it in time (seen in CI).
        for _ in range(1000):
            s = served.rt.stats()["gate"]
            if s.expired + s.cancelled > settled:
                break
            time.sleep(0.01)
    finally:
        g.release.set()
        pool.shutdown()
    first.result()
    for _ in range(1000):  # the abandoned request completes (expired) without running
        s = served.rt.stats()["gate"]
        if s.queued == 0 and s.submitted == s.completed + s.failed + s.rejected + s.expired + s.cancelled:
            break
        time.sleep(0.01)
    assert 5.0 not in g.order


def test_bad_requests_under_good_load(served: Served) -> None:
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

    def bad(c: Any) -> None:
        f32 = np.ones(3, np.float32)
        status_of(lambda: c.infer("nope", [vec("x", f32)]), "NOT_FOUND", "unknown model 'nope'")
        status_of(lambda: c.infer("echo", [vec("x", [1, 2], "INT32")]), "INVALID_ARGUMENT",
                  "input 'x'", "expected datatype FP32")
        status_of(lambda: c.infer("torch", [vec("x", np.ones((2, 3)))]), "INVALID_ARGUMENT",
                  "expected shape [-1, 4]")
        status_of(lambda: c.infer("multi", [vec("a", [1], "INT32")]), "INVALID_ARGUMENT",
                  "missing input 'b'")
        status_of(lambda: c.infer("echo", [vec("x", f32)], outputs=[tg.InferRequestedOutput("q")]),
                  "INVALID_ARGUMENT", "no output 'q'")
        status_of(lambda: c.infer("gate", [vec("x", f32)], priority=7), "INVALID_ARGUMENT", "priority")
        status_of(lambda: c.infer("echo", [vec("x", f32)], outputs=[tg.InferRequestedOutput("y")] * 2),
                  "INVALID_ARGUMENT", "output 'y' is requested twice")
        status_of(lambda: c.infer("fails", [vec("x", [42.0])]), "INTERNAL", "boom 42")
        status_of(lambda: c.infer("bad_output", [vec("x", f32)]), "INTERNAL", "output 'y'", "INT64")
        status_of(lambda: c.infer("bad_bytes", [vec("x", f32)]), "INTERNAL", "output 'u'", "type int")

    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(good_load)
        c = new_client(served)
        rounds = 0
        while (not load.done() or rounds == 0) and rounds < 20:
            bad(c)
            rounds += 1
        c.close()
        load.result()
    assert results == [True] * n_good
    after = served.rt.stats()["echo"]
    assert after.submitted - before.submitted == n_good == after.completed - before.completed


def test_a_long_error_message_is_cut_and_keeps_its_status(client: Any, served: Served) -> None:
    # The message names the 8,000-dim shape: whole, its trailer passed grpc's 16 KiB bound and
    # the client read RESOURCE_EXHAUSTED ("Stream removed") in place of INVALID_ARGUMENT.
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    from apportion.serve.grpc import STATUS_MESSAGE_BYTES

    r = pb.ModelInferRequest(model_name="echo")
    r.inputs.add(name="x", datatype="FP32", shape=[1] * 8000)
    r.raw_input_contents.append(b"\0" * 4)
    with grpc.insecure_channel(served.grpc) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pbg.GRPCInferenceServiceStub(channel).ModelInfer(r, timeout=30)
    e = info.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details()[:300])
    assert "model 'echo', input 'x'" in e.details() and e.details().endswith("bytes, cut)")
    assert len(e.details().encode()) <= STATUS_MESSAGE_BYTES
    # A model name of 20,000 characters: NOT_FOUND, cut likewise.
    status_of(lambda: client.infer("n" * 20_000, [vec("x", [1.0])]), "NOT_FOUND", "unknown model 'nnn", "cut)")
    # A short message is whole.
    status_of(lambda: client.infer("nope", [vec("x", [1.0])]), "NOT_FOUND", "unknown model 'nope'")


def test_a_large_request_is_converted_off_the_event_loop(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # 57 MB of BYTES was converted on the event loop: every other call and probe waited 8 s.
    # Now a request (and an answer) that costs OFF_LOOP_BYTES or more to convert is converted
    # on a worker thread, as HTTP's are; BYTES elements count PER_ELEMENT_BYTES each.
    from apportion.serve.grpc import InferenceServicer
    from apportion.serve.tensors import OFF_LOOP_BYTES, PER_ELEMENT_BYTES

    seen: list[tuple[str, bool]] = []
    decode, encode = InferenceServicer._decode, InferenceServicer._encode

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def spy_decode(self: Any, request: Any, sig: Any) -> Any:
        seen.append(("decode", on_loop()))
        return decode(self, request, sig)

    def spy_encode(request: Any, wanted: Any, outputs: Any) -> Any:
        seen.append(("encode", on_loop()))
        return encode(request, wanted, outputs)

    monkeypatch.setattr(InferenceServicer, "_decode", spy_decode)
    monkeypatch.setattr(InferenceServicer, "_encode", staticmethod(spy_encode))
    n = 300_000  # 1.5 MB on the wire, 8 bytes an element in its array: 2.4 MB by nbytes
    assert n * PER_ELEMENT_BYTES >= OFF_LOOP_BYTES > 1.5e6 / 4
    out = client.infer("upper", [vec("s", np.full(n, b"ab", dtype=object), "BYTES")]).as_numpy("u")
    assert out.shape == (n,) and out[0] == b"AB" and out[-1] == b"AB"
    assert seen == [("decode", False), ("encode", False)], seen
    seen.clear()
    small = client.infer("upper", [vec("s", np.array([b"ab"], dtype=object), "BYTES")]).as_numpy("u")
    assert list(small) == [b"AB"] and seen == [("decode", True), ("encode", True)], seen


def test_message_over_the_limit_is_resource_exhausted() -> None:
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x * 2)
    rt.start()
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=0,
                    max_body_bytes=4096) as server:
            c = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
            status_of(lambda: c.infer("echo", [vec("x", np.ones(2048))]), "RESOURCE_EXHAUSTED")
            np.testing.assert_array_equal(c.infer("echo", [vec("x", np.ones(4))]).as_numpy("y"),
                                          np.full(4, 2, np.float32))
            c.close()
    finally:
        rt.close()


def test_draining_is_unavailable() -> None:
    gate = Gate()
    rt = ap.Runtime()
    rt.add_model("gate", model=gate)
    rt.start()
    try:
        server = Server(rt, {"gate": signatures()["gate"]}, http_port=0, grpc_port=0).start()
        url = f"127.0.0.1:{server.grpc_port}"
        with ThreadPoolExecutor(2) as pool:
            admitted = pool.submit(lambda: tg.InferenceServerClient(url).infer("gate", [vec("x", [1.0])]))
            assert gate.entered.wait(30)
            stopping = pool.submit(server.stop)
            while not server.frontend.draining:
                time.sleep(0.01)
            c = tg.InferenceServerClient(url)
            assert not c.is_server_ready() and not c.is_model_ready("gate") and c.is_server_live()
            status_of(lambda: c.infer("gate", [vec("x", [2.0])]), "UNAVAILABLE", "shutting down")
            c.close()
            gate.release.set()
            np.testing.assert_array_equal(admitted.result().as_numpy("y"), [1.0])
            stopping.result()
    finally:
        gate.release.set()
        rt.close()


def test_http_and_grpc_share_one_server(served: Served) -> None:
    th = pytest.importorskip("tritonclient.http")
    h = th.InferenceServerClient(f"127.0.0.1:{served.server.http_port}")
    assert h.is_server_ready()
    h.close()


def test_calls_beyond_the_servers_bound_are_resource_exhausted_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server's own bound (MAX_CONCURRENT_CALLS), set low here: the calls beyond it are
    # refused with RESOURCE_EXHAUSTED, never cancelled (test_serve_cli: thousands under the
    # default bound, all answered).
    import threading

    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    import apportion.serve.grpc as serve_grpc

    def request(i: int) -> Any:
        r = pb.ModelInferRequest(model_name="echo")
        r.inputs.add(name="x", datatype="FP32", shape=[1])
        r.raw_input_contents.append(np.array([i], np.float32).tobytes())
        return r

    gate = threading.Event()
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: (gate.wait(30), x * 2)[1], max_queue=4096, instances=2)
    rt.start()
    monkeypatch.setattr(serve_grpc, "MAX_CONCURRENT_CALLS", 8)
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=0) as server:
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                stub = pbg.GRPCInferenceServiceStub(channel)
                calls = [stub.ModelInfer.future(request(i), timeout=60) for i in range(40)]
                time.sleep(0.5)
                gate.set()
                codes = []
                for c in calls:
                    try:
                        c.result()
                        codes.append("OK")
                    except grpc.RpcError as e:
                        codes.append(e.code().name)
            assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and codes.count("OK") >= 8, codes
    finally:
        gate.set()
        rt.close()


def test_a_connection_idle_past_the_limit_is_closed_and_the_channel_connects_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Without an idle limit every channel a client opened and left held its socket for good.
    import threading

    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    import apportion.serve.grpc as serve_grpc

    monkeypatch.setattr(serve_grpc, "IDLE_CONNECTION_MS", 300)
    rt = ap.Runtime()
    rt.add_model("echo", model=lambda x: x * 2)
    rt.start()
    try:
        with Server(rt, {"echo": signatures()["echo"]}, http_port=0, grpc_port=0) as server:
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                states: list[grpc.ChannelConnectivity] = []
                idle = threading.Event()

                def seen(state: grpc.ChannelConnectivity) -> None:
                    states.append(state)
                    if state == grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
                        idle.set()

                channel.subscribe(seen, try_to_connect=True)
                stub = pbg.GRPCInferenceServiceStub(channel)
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
                assert idle.wait(10), states  # the server closed the idle connection
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live  # and the next call connects again
                channel.unsubscribe(seen)
    finally:
        rt.close()
