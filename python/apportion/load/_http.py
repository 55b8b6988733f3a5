"""The HTTP/1.1 client under :class:`~apportion.load.RemoteTarget`: kept-alive connections on
one asyncio loop, each answer read by httptools' response parser, one request in flight per
connection.

A load generator on the machine it measures takes CPU from the server under test: on a 2-CPU
machine tritonclient's aiohttp client spent ~190 us of CPU a request, as much as the server's
own front. Here a request is one write of bytes prepared once and one parse in C, and an
answer's tensors are decoded only when asked for (:class:`RemoteResult`)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any
from urllib.parse import urljoin, urlsplit

REDIRECTS = frozenset({301, 302, 303, 307, 308})
"""Statuses that redirect a GET."""
POST_REDIRECTS = frozenset({307, 308})
"""Those a POST follows (the others would make it a GET)."""
MAX_REDIRECTS = 5

__all__ = ["HttpClient", "HttpError", "RemoteResult"]


class HttpError(Exception):
    """No answer: the connection failed or closed, or the answer was not HTTP."""


class _Unanswered(HttpError):
    """The server closed the connection before sending a byte of the answer."""


class RemoteResult:
    """A v2 infer answer over HTTP; behaves as tritonclient's ``InferResult`` (``as_numpy``,
    ``get_output``, ``get_response``, ...), which it builds from the body on first use, so a
    load that never reads its answers does not decode them."""

    __slots__ = ("_body", "_header_length", "_parsed")

    def __init__(self, body: bytes, header_length: int | None) -> None:
        self._body = body
        self._header_length = header_length
        self._parsed: Any = None

    @property
    def infer_result(self) -> Any:
        """tritonclient's ``InferResult`` of this answer."""
        if self._parsed is None:
            from tritonclient.http import InferenceServerClient

            self._parsed = InferenceServerClient.parse_response_body(self._body, header_length=self._header_length)
        return self._parsed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # own slots not set yet (a copy being made), dunder lookups
            raise AttributeError(name)
        return getattr(self.infer_result, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteResult, (self._body, self._header_length))

    def __repr__(self) -> str:
        return f"<RemoteResult {len(self._body)} bytes>"


class _Connection(asyncio.Protocol):
    """One connection; one request at a time (no pipelining)."""

    def __init__(self, client: HttpClient) -> None:
        self._client = client
        self._parser = client.httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.served = 0  # answers completed on it: a reused connection's close may have crossed our request
        self._by_client = False
        self._answer_started = False
        self._answer: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._headers_done = False

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._answer_started = True
        if self._answer is None:  # nothing asked: a server that talks out of turn is not reused
            self._fail(HttpError(f"{len(data)} bytes from the server with no request in flight"))
            return
        try:
            self._parser.feed_data(data)
        except self._client.httptools.HttpParserError as e:
            self._fail(HttpError(f"the answer is not valid HTTP/1.1: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer = self._answer
        if answer is not None and not answer.done():
            if self._headers_done and b"content-length" not in self._headers and \
                    b"transfer-encoding" not in self._headers:
                self._complete(reusable=False)  # an answer delimited by the close itself
            else:
                why = f": {exc}" if exc is not None else ""
                if self._by_client:
                    answer.set_exception(HttpError("the client closed the connection before the answer"))
                elif not self._answer_started:
                    answer.set_exception(_Unanswered(f"the server closed the connection before its answer{why}"))
                else:
                    answer.set_exception(HttpError(f"the server closed the connection before its answer{why}"))
        self._answer = None
        self._client._lost(self)

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:  # interim (103 Early Hints): the answer follows
            self._headers, self._body, self._headers_done = {}, [], False
            return
        self._complete(reusable=self._parser.should_keep_alive())

    # -- used by HttpClient -----------------------------------------------------------------------
    def exchange(self, data: list[bytes]) -> asyncio.Future[tuple[int, dict[bytes, bytes], bytes]]:
        assert self.transport is not None and self._answer is None
        self._answer = answer = asyncio.get_running_loop().create_future()
        self._answer_started = False
        self.transport.writelines(data)
        return answer

    def close(self) -> None:
        self.closed = True
        self._by_client = True
        if self.transport is not None:
            self.transport.abort()  # nothing of ours is worth flushing: a request cut short

    def _complete(self, *, reusable: bool) -> None:
        answer, self._answer = self._answer, None
        status = self._parser.get_status_code()
        headers, body = self._headers, b"".join(self._body)
        self._headers, self._body, self._headers_done = {}, [], False
        self.reusable = reusable
        self.served += 1
        if answer is not None and not answer.done():
            answer.set_result((status, headers, body))

    def _fail(self, err: HttpError) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(err)
        self.close()


class HttpClient:
    """Kept-alive HTTP/1.1 connections to ``host:port``, at most ``limit`` open, each with one
    request in flight; a request beyond the limit waits for a connection. Only on the loop
    that made it."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        import httptools  # here: ``import apportion`` loads this module, and httptools is an extra's

        self.httptools = httptools
        self.host, self.port, self.limit = host, port, limit
        self.authority = (f"[{host}]" if ":" in host else host) + f":{port}"
        """``host:port`` as a Host header gives it."""
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def encode(self, method: str, path: str, body: bytes = b"", *,
               headers: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
        """The request's bytes (head, body), as :meth:`send` takes them: to encode once and
        send again and again."""
        head = [f"{method} {path} HTTP/1.1\r\nHost: {self.authority}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        return [("".join(head)).encode("latin-1"), body]

    async def request(self, method: str, path: str, body: bytes = b"", *,
                      headers: tuple[tuple[str, str], ...] = (),
                      follow: frozenset[int] = frozenset()) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers with lower-case names, body). Raises HttpError when no answer
        came; a cancelled request (a timeout around it) closes its connection."""
        return await self.send(self.encode(method, path, body, headers=headers), follow=follow)

    async def send(self, data: list[bytes], *,
                   follow: frozenset[int] = frozenset()) -> tuple[int, dict[bytes, bytes], bytes]:
        """:meth:`request` with the request's bytes given (``data``: head and body, as
        :meth:`encode` made them). An answer whose status is in ``follow`` is followed, the
        same request sent again to its Location on this server (:meth:`redirected`), at most
        MAX_REDIRECTS times; the last answer is returned."""
        for _ in range(MAX_REDIRECTS):
            answer = await self._send_once(data)
            if answer[0] not in follow:
                return answer
            data = _moved(data, self.redirected(_path(data), answer[1]))
        return await self._send_once(data)

    async def _send_once(self, data: list[bytes]) -> tuple[int, dict[bytes, bytes], bytes]:
        for attempt in range(2):
            conn = await self._acquire()
            done = False
            try:
                answer = await conn.exchange(data)
                done = True
                return answer
            except _Unanswered:
                # A kept-alive connection the server closed as the request went out (its idle
                # timeout): the server read none of it. Once more, on another connection.
                if attempt == 0 and conn.served > 0:
                    continue
                raise
            finally:
                if done and conn.reusable and not conn.closed and not self._closed:
                    self._idle.append(conn)
                    self._wake()
                else:
                    conn.close()  # cut short (a timeout, an error): its answer may still come
        raise AssertionError("unreachable")

    def redirected(self, path: str, headers: dict[bytes, bytes]) -> str:
        """The path a redirect answer to a request for ``path`` points to (its ``Location``,
        relative or on this same server); HttpError for one without a Location or to another
        server (whose URL the caller should give instead)."""
        location = headers.get(b"location")
        if not location:
            raise HttpError(f"a redirect from {path} without a Location")
        target = urlsplit(urljoin(f"http://{self.authority}{path}", location.decode("latin-1")))
        if target.scheme != "http" or (target.hostname, target.port or 80) != (self.host, self.port):
            raise HttpError(f"{path} is redirected to another server: {location.decode('latin-1')}; "
                            f"give that server's URL")
        return (target.path or "/") + (f"?{target.query}" if target.query else "")

    async def aclose(self) -> None:
        """:meth:`close`, then lets the loop finish closing each connection (a transport still
        closing when its loop stops is never released)."""
        self.close()
        for _ in range(100):
            if not any(c.transport is not None for c in self._all):
                return
            await asyncio.sleep(0)

    def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(HttpError("the client is closed"))

    # -- connections --------------------------------------------------------------------------------
    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise HttpError("the client is closed")
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
            if len(self._all) < self.limit:
                placeholder = _Connection(self)  # holds the slot while connecting
                self._all.add(placeholder)
                connected = False
                try:
                    _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
                    connected = True
                except OSError as e:
                    raise HttpError(f"cannot connect to {self.authority}: {e}") from None
                finally:
                    self._all.discard(placeholder)
                    if not connected:
                        self._wake()  # the slot is free again
                self._all.add(conn)
                if self._closed:
                    conn.close()
                    continue
                return conn
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken and cancelled at once: the next one goes instead
                raise

    def _lost(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


def _path(data: list[bytes]) -> str:
    """The path of a request's bytes (``METHOD PATH HTTP/1.1``)."""
    line = data[0][:data[0].index(b" HTTP/1.1\r\n")]
    return line[line.index(b" ") + 1:].decode("latin-1")


def _moved(data: list[bytes], path: str) -> list[bytes]:
    """The same request for ``path``."""
    head = data[0]
    method = head[:head.index(b" ")]
    return [method + b" " + path.encode("latin-1") + head[head.index(b" HTTP/1.1\r\n"):], *data[1:]]
