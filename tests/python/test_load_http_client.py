"""load.RemoteTarget's own HTTP client against servers that answer in every way HTTP/1.1
allows and some it does not: kept-alive and closed connections, answers delimited by the
close, errors with and without a v2 body, garbage, a connection cut before its answer, more
requests than connections. The servers are scripted sockets on 127.0.0.1 (what a real v2
server answers is tested against `apportion serve` in test_load_remote.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("httptools")
pytest.importorskip("tritonclient.http")

from apportion import load  # noqa: E402

pytestmark = pytest.mark.timeout(60)

METADATA = json.dumps({"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
                       "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}]}).encode()
ANSWER = json.dumps({"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [2],
                                                      "data": [1.5, 2.5]}]}).encode()


def response(body: bytes = ANSWER, status: str = "200 OK", *, close: bool = False, length: bool = True) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
    if length:
        head += f"content-length: {len(body)}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body


@dataclass
class Answer:
    data: bytes
    close: bool = False  # close the connection after sending
    delay_s: float = 0.0


class Scripted:
    """A server on 127.0.0.1 that answers each infer request with ``infer(n)`` (n counts the
    infer requests from 0) and every metadata request with the model's metadata; counts the
    connections it accepted and how many were open at once."""

    def __init__(self, infer: Callable[[int], Answer], meta: Callable[[bytes], bytes | None] | None = None) -> None:
        self.infer = infer
        self.meta = meta  # answers a request line first, where it returns bytes
        self.lines: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = self.open = self.most_open = self.requests = 0
        self.threads: list[threading.Thread] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
                length = int({k.lower(): v for k, v in fields.items()}.get(b"content-length", b"0"))
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                line = head.split(b"\r\n", 1)[0]
                self.lines.append(line)
                special = self.meta(line) if self.meta is not None else None
                if special is not None:
                    conn.sendall(special)
                    continue
                if head.startswith(b"GET /v2/models/m "):
                    conn.sendall(response(METADATA))
                    continue
                with self.lock:
                    n = self.requests
                    self.requests += 1
                a = self.infer(n)
                time.sleep(a.delay_s)
                conn.sendall(a.data)
                if a.close:
                    return
        except OSError:
            return
        finally:
            with self.lock:
                self.open -= 1
            conn.close()

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[int], Answer]], Scripted]]:
    made: list[Scripted] = []

    def make(infer: Callable[[int], Answer], meta: Callable[[bytes], bytes | None] | None = None) -> Scripted:
        made.append(Scripted(infer, meta))
        return made[-1]

    yield make
    for s in made:
        s.close()


def call(target: load.RemoteTarget, timeout_s: float = 20.0) -> object:
    return target.submit("m", np.ones(2, np.float32)).result(timeout_s)


def test_kept_alive_connections_are_reused_and_answers_decode_when_read(scripted) -> None:
    s = scripted(lambda n: Answer(response()))
    with load.RemoteTarget(s.url, ["m"]) as target:
        results = [call(target) for _ in range(5)]
        assert s.connections == 1  # the metadata request's connection served every request
        r = results[0]
        assert r._parsed is None  # not decoded until read
        np.testing.assert_array_equal(r.as_numpy("y"), np.array([1.5, 2.5], np.float32))
        assert r.get_response()["model_name"] == "m" and "bytes" in repr(r)
        import copy
        import pickle

        for again in (pickle.loads(pickle.dumps(results[1])), copy.copy(results[2]), copy.deepcopy(results[3])):
            np.testing.assert_array_equal(again.as_numpy("y"), [1.5, 2.5])
        with pytest.raises(AttributeError):
            r._nothing_such  # noqa: B018 - private names are the result's own, not InferResult's


def test_interim_answers_are_skipped(scripted) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
    s = scripted(lambda n: Answer(early + response()))
    with load.RemoteTarget(s.url, ["m"]) as target:
        for _ in range(2):
            np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])
    assert s.connections == 1


def test_an_answer_that_closes_its_connection_is_not_reused(scripted) -> None:
    s = scripted(lambda n: Answer(response(close=True), close=True))
    with load.RemoteTarget(s.url, ["m"]) as target:
        for _ in range(3):
            np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])
    assert s.connections == 3  # the metadata's (kept: its answer did not close), then one for each later request


def test_an_answer_delimited_by_the_close_is_read_whole(scripted) -> None:
    s = scripted(lambda n: Answer(response(length=False), close=True))
    with load.RemoteTarget(s.url, ["m"]) as target:
        np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])
        np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])


def test_a_connection_the_server_closed_while_idle_is_replaced(scripted) -> None:
    s = scripted(lambda n: Answer(response(), close=True))  # closes after answering, without saying so
    with load.RemoteTarget(s.url, ["m"]) as target:
        for _ in range(3):
            time.sleep(0.1)  # the close reaches the client before its next request
            np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])


@pytest.mark.parametrize(("answer", "error", "kind", "words"), [
    (response(b'{"error": "model m: queue full"}', "429 Too Many Requests"), load.RemoteRejected, "http 429",
     "queue full"),
    (response(b'{"error": "deadline"}', "504 Gateway Timeout"), load.RemoteExpired, "http 504", "deadline"),
    (response(b'{"error": "draining"}', "503 Service Unavailable"), load.RemoteError, "http 503", "draining"),
    # One status for several outcomes: told apart by the server's words (Triton's, Ray Serve's).
    (response(b'{"error":"Exceeds maximum queue size"}', "503 Service Unavailable"), load.RemoteRejected,
     "http 503", "maximum queue"),
    (response(b'{"error":"Request timeout expired"}', "503 Service Unavailable"), load.RemoteExpired,
     "http 503", "timeout expired"),
    (response(b'{"error":"Request dropped due to backpressure (num_queued_requests=64, max_queued_requests=64)."}',
              "503 Service Unavailable"), load.RemoteRejected, "http 503", "backpressure"),
    (response(b"<html>bad gateway</html>", "502 Bad Gateway"), load.RemoteError, "http 502", "bad gateway"),
    (response(b"", "500 Internal Server Error"), load.RemoteError, "http 500", "(no message)"),
])
def test_error_answers_are_classified_with_the_servers_message(scripted, answer: bytes, error: type,
                                                                kind: str, words: str) -> None:
    s = scripted(lambda n: Answer(answer) if n == 0 else Answer(response()))
    with load.RemoteTarget(s.url, ["m"]) as target:
        with pytest.raises(error, match=None) as e:
            call(target)
        assert e.value.kind == kind and words in str(e.value)
        np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])  # the connection goes on
        assert s.connections == 1


@pytest.mark.parametrize(("answer", "words"), [
    (Answer(b"HELLO THERE\r\n\r\n"), "not valid HTTP/1.1"),
    (Answer(response()[:40], close=True), "closed the connection before its answer"),
])
def test_no_answer_is_a_connection_error_and_the_next_request_connects_again(scripted, answer: Answer,
                                                                            words: str) -> None:
    s = scripted(lambda n: answer if n == 0 else Answer(response()))
    with load.RemoteTarget(s.url, ["m"]) as target:
        with pytest.raises(load.RemoteError, match=words) as e:
            call(target)
        assert e.value.kind == "connection"
        np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])


def test_a_kept_alive_connection_closed_unanswered_is_tried_once_more_on_a_new_one(scripted) -> None:
    # A server's idle timeout can close a kept-alive connection as a request goes out on it:
    # the server read none of it, and the request goes again on a new connection, once.
    s = scripted(lambda n: Answer(b"", close=True) if n == 0 else Answer(response()))
    with load.RemoteTarget(s.url, ["m"]) as target:
        np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])
    assert s.requests == 2 and s.connections == 2
    # A server that never answers: the second try, on a fresh connection, fails the request.
    never = scripted(lambda n: Answer(b"", close=True))
    with load.RemoteTarget(never.url, ["m"]) as target:
        with pytest.raises(load.RemoteError, match="the server closed the connection before its answer") as e:
            call(target)
        assert e.value.kind == "connection"
    assert never.requests == 2


def test_close_ends_every_request_in_flight_even_one_still_connecting() -> None:
    # A server that accepts one connection and then no more (its backlog full): requests
    # beyond the first wait in connect. close() ended only those with a connection; the
    # others' futures never ended.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def serve_metadata_then_stall() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.recv(65536)
        conn.sendall(response(METADATA))

    threading.Thread(target=serve_metadata_then_stall, daemon=True).start()
    fillers = []
    try:
        target = load.RemoteTarget(f"http://127.0.0.1:{port}", ["m"], request_timeout_s=30)
        for _ in range(4):  # fill the backlog: later connects hang
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        futures = [target.submit("m", np.ones(2, np.float32)) for _ in range(6)]
        time.sleep(0.3)
        started = time.monotonic()
        target.close()
        assert time.monotonic() - started < 5
        for f in futures:
            with pytest.raises(load.RemoteError) as e:
                f.result(5)
            assert e.value.kind in ("closed", "connection")
            assert "the server closed" not in str(e.value)  # the client did
    finally:
        for f in fillers:
            f.close()
        for c in accepted:
            c.close()
        listener.close()


def test_a_200_answer_that_is_no_v2_answer_fails_the_request(scripted) -> None:
    # A proxy's error page with status 200 read as a result: counted as goodput.
    s = scripted(lambda n: Answer(response(b"<html>proxy error</html>")) if n == 0 else Answer(
        b"HTTP/1.1 200 OK\r\ninference-header-content-length: 999\r\ncontent-length: 2\r\n\r\n{}"))
    with load.RemoteTarget(s.url, ["m"]) as target:
        for _ in range(2):
            with pytest.raises(load.RemoteError, match="not a v2 inference answer") as e:
                call(target)
            assert e.value.kind == "http 200"


@pytest.mark.parametrize("bad", [0, -1, None, 1.5, True])
def test_connections_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(load.LoadError, match="connections must be an int >= 1"):
        load.RemoteTarget("http://127.0.0.1:9", ["m"], connections=bad)  # type: ignore[arg-type]


def test_a_client_timeout_drops_its_connection_and_the_late_answer(scripted) -> None:
    s = scripted(lambda n: Answer(response(), delay_s=1.0) if n == 0 else Answer(response()))
    with load.RemoteTarget(s.url, ["m"], request_timeout_s=0.3) as target:
        with pytest.raises(load.RemoteError, match="no answer within 0.3 s") as e:
            call(target)
        assert e.value.kind == "client timeout"
        # The late answer cannot be read as the next request's: that one gets its own connection.
        np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])
        assert s.connections == 2


def test_requests_beyond_the_connections_wait_for_one(scripted) -> None:
    s = scripted(lambda n: Answer(response(), delay_s=0.05))
    with load.RemoteTarget(s.url, ["m"], connections=2) as target:
        futures = [target.submit("m", np.ones(2, np.float32)) for _ in range(12)]
        for f in futures:
            np.testing.assert_array_equal(f.result(30).as_numpy("y"), [1.5, 2.5])
    assert s.most_open <= 2 and s.requests == 12


def test_metadata_that_is_not_a_v2_answer_is_refused(scripted) -> None:
    s = scripted(lambda n: Answer(response()))
    with load.RemoteTarget(s.url, ["m"]) as target:  # the real metadata first: the client works
        assert target.models == ["m"]
    bad = socket.create_server(("127.0.0.1", 0))

    def serve_once() -> None:
        conn, _ = bad.accept()
        conn.recv(65536)
        conn.sendall(response(b'["not", "metadata"]'))
        conn.close()

    threading.Thread(target=serve_once, daemon=True).start()
    try:
        with pytest.raises(load.RemoteError, match="metadata is not a v2 answer"):
            load.RemoteTarget(f"http://127.0.0.1:{bad.getsockname()[1]}", ["m"], request_timeout_s=10)
    finally:
        bad.close()


def redirect(status: str, location: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n".encode()


def test_redirects_on_the_same_server_are_followed(scripted) -> None:
    # Ray Serve answers GET /v2/models/NAME with 307 to NAME/ (its route prefix's slash).
    def meta(line: bytes) -> bytes | None:
        if line.startswith(b"GET /v2/models/m "):
            return redirect("307 Temporary Redirect", "/v2/models/m/")
        if line.startswith(b"GET /v2/models/m/ "):
            return response(METADATA)
        if line.startswith(b"POST /v2/models/m/infer "):
            return redirect("308 Permanent Redirect", "http://127.0.0.1:%d/v2/models/m/v1/infer?x=1" % port)
        return None

    s = scripted(lambda n: Answer(response()), meta)
    port = s.port
    with load.RemoteTarget(s.url, ["m"]) as target:
        np.testing.assert_array_equal(call(target).as_numpy("y"), [1.5, 2.5])
    assert [line.split(b" ")[:2] for line in s.lines] == [
        [b"GET", b"/v2/models/m"], [b"GET", b"/v2/models/m/"], [b"POST", b"/v2/models/m/infer"],
        [b"POST", b"/v2/models/m/v1/infer?x=1"]]


@pytest.mark.parametrize(("answer", "words"), [
    (redirect("307 Temporary Redirect", "http://10.0.0.9:8000/v2/models/m/infer"),
     "redirected to another server: http://10.0.0.9:8000/v2/models/m/infer; give that server's URL"),
    (redirect("307 Temporary Redirect", "https://127.0.0.1/v2/models/m/infer"), "redirected to another server"),
    (b"HTTP/1.1 307 Temporary Redirect\r\ncontent-length: 0\r\n\r\n", "without a Location"),
    (redirect("302 Found", "/elsewhere"), "http 302"),  # a POST follows 307 and 308 only
])
def test_redirects_the_client_cannot_follow_fail_the_request(scripted, answer: bytes, words: str) -> None:
    s = scripted(lambda n: Answer(answer))
    with load.RemoteTarget(s.url, ["m"]) as target:
        with pytest.raises(load.RemoteError, match=words):
            call(target)


def test_a_redirect_loop_ends_after_five_hops(scripted) -> None:
    s = scripted(lambda n: Answer(redirect("307 Temporary Redirect", "/v2/models/m/infer")))
    with load.RemoteTarget(s.url, ["m"]) as target:
        with pytest.raises(load.RemoteError, match="http 307") as e:
            call(target)
        assert e.value.kind == "http 307" and s.requests == 6
