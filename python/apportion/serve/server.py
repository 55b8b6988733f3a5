"""One process serving a runtime's models over v2 HTTP (uvicorn) and gRPC (grpcio), both on
one asyncio loop, with graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import uvicorn

from .._private.checks import finite_number
from .._private.loops import LOOPS, loop_factory, loop_name
from ..errors import QuotaError
from . import _frontend as fe
from .app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, V2App
from .grpc import start_server
from .tensors import Signature

DEFAULT_HEADER_TIMEOUT_S = 60.0
"""How long an HTTP request's headers may take to arrive whole (from the connection, or from
the request's first byte on a kept-alive one) before the server answers 408 and closes."""

DEFAULT_MAX_HEADER_BYTES = 64 << 10
"""What an HTTP request's line and headers may take together: beyond it the server answers 431
and closes."""

DEFAULT_WRITE_TIMEOUT_S = 60.0
"""How long an HTTP answer may sit unsent because the client takes none of it (the
connection's write buffer stays full) before the server drops the connection."""


class _EveryFewSeconds(logging.Filter):
    """uvicorn's own warnings (bytes on a connection that are no HTTP, an upgrade it does not
    support), each message at most once per :data:`~apportion.serve._frontend.REPORT_EVERY_S`
    with a count of those held back, as the fronts' own failures are: 2,000 garbage connections
    wrote 2,000 lines."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._throttle: fe.Throttle[str] = fe.Throttle(clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        more = self._throttle.admit(str(record.msg))
        if more is None:
            return False
        if more:
            record.msg = record.getMessage() + more
            record.args = ()
        return True


_UVICORN_WARNINGS = _EveryFewSeconds()


def _close_with(status: bytes, answer: str) -> bytes:
    body = answer.encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def header_timeout_protocol(timeout_s: float, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                            write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a deadline and a size bound for each request's line
    and headers: a client that sends them slowly, or opens a connection and sends nothing, is
    answered 408 and closed after ``timeout_s`` (uvicorn has no such deadline: such connections
    stayed open for ever); one whose line and headers pass ``max_header_bytes`` is answered 431
    and closed (neither uvicorn nor httptools bounds them: one connection's headers grew the
    server by 1.3 GB and held the loop, HTTP and gRPC, for seconds). A connection whose client
    takes none of its answer for ``write_timeout_s`` (the write buffer full and not shrinking)
    is dropped: otherwise the answer, and the request's task, waited for ever, and a client
    could hold any number of large answers in the server's memory that way (one it takes
    slowly, some of it every ``write_timeout_s``, is not dropped). The deadlines share one loop
    timer each (:class:`Alarms`): a request costs dict entries, not a timer armed and
    cancelled."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    alarms = fe.Alarms(timeout_s)
    write_alarms = fe.Alarms(write_timeout_s)
    late = _close_with(b"408 Request Timeout", f"no complete request headers within {timeout_s:g} s")
    too_large = _close_with(b"431 Request Header Fields Too Large",
                            f"the request line and headers exceed the limit of {max_header_bytes} bytes")
    malformed = _close_with(b"400 Bad Request", "the request is not valid HTTP/1.1 (its parser refused it)")

    class HeaderDeadline(HttpToolsProtocol):  # type: ignore[misc]
        # Bytes received since the request began while its headers are incomplete (-1: its body
        # is being read): bounds what the parser buffers for one request's headers. A chunk that
        # ends them and begins the body counts whole; then the headers themselves are measured,
        # as they are for a request that began after another completed in the same chunk (its
        # bytes in that chunk were counted for the one before).
        _head_bytes = 0
        _completed_in_chunk = False
        _refused = False  # answered 431 or 400 (or about to be): the rest of the connection is ignored
        _refusal = too_large

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            alarms.set(self, self._headers_late)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._completed_in_chunk = False
            if self._head_bytes >= 0:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._head_bytes > max_header_bytes and not self._refused and not self.transport.is_closing():
                self._refuse()

        def _refuse(self, answer: bytes = too_large) -> None:
            self._refused = True
            self._refusal = answer
            alarms.cancel(self)
            self._answer_refusal()

        def send_400_response(self, msg: str) -> None:
            # What the parser refused (bytes that are no HTTP, after a request on the same
            # connection): uvicorn wrote its 400 and closed at once, cutting the answer to the
            # request before it (the client read the 400 as that reply).
            if self._refused:
                return
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                # In this request's own body (a bad chunk): it can never be answered, and
                # waiting for it held the 400 until the body deadline (a 408 in its place).
                self._refused, self._refusal = True, malformed
                alarms.cancel(self)
                if not self.transport.is_closing():
                    self.transport.write(malformed)
                    self.transport.close()
                return
            self._refuse(malformed)

        def _answering(self) -> bool:
            # A request before this one on the connection is not answered yet: self.cycle is
            # the last request read, queued (uvicorn's pipeline) or running.
            return self.cycle is not None and not self.cycle.response_complete

        def _answer_refusal(self) -> None:
            # After the answers to the requests before it (pipelined): a 431 now would cut the
            # one being sent and read as its reply. on_response_complete comes back here.
            if self._answering():
                return
            if not self.transport.is_closing():
                self.transport.write(self._refusal)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._refused:
                self._answer_refusal()

        def on_message_begin(self) -> None:
            if self._refused:
                return
            super().on_message_begin()
            alarms.cancel(self)  # this request's own deadline, from its first byte
            alarms.set(self, self._headers_late)

        def on_headers_complete(self) -> None:
            alarms.cancel(self)
            if self._refused:
                return
            # Measured only when what arrived could hold too much (a request of a few small
            # chunks never pays for the sum).
            if (self._head_bytes > max_header_bytes or self._completed_in_chunk) and (
                    len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > max_header_bytes):
                self._refuse()
                return
            self._head_bytes = -1
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refused:
                return
            self._head_bytes = 0  # the next request's, on a kept-alive connection
            self._completed_in_chunk = True
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            alarms.cancel(self)
            write_alarms.cancel(self)
            super().connection_lost(exc)

        _unsent = 0  # the write buffer's size when its alarm was set

        def pause_writing(self) -> None:
            super().pause_writing()
            self._unsent = self.transport.get_write_buffer_size()
            write_alarms.set(self, self._write_stalled)

        def resume_writing(self) -> None:
            write_alarms.cancel(self)
            super().resume_writing()

        def _write_stalled(self) -> None:
            unsent = self.transport.get_write_buffer_size()
            if unsent < self._unsent:  # taken slowly (a large answer, a slow link): still taken
                self._unsent = unsent
                write_alarms.set(self, self._write_stalled)
                return
            # Nothing of the answer taken for write_timeout_s: close() would wait to flush for
            # ever; abort() drops the buffer and the connection (the request's send fails).
            self.transport.abort()

        def _headers_late(self) -> None:
            if self.transport.is_closing():
                return
            if self._answering():
                # A pipelined request's headers are late while the one before it is still being
                # answered: a 408 now would cut that answer (and read as its reply). Judged again
                # a deadline later, once the connection is the late request's alone.
                alarms.set(self, self._headers_late)
                return
            self.transport.write(late)
            self.transport.close()

    return HeaderDeadline

if TYPE_CHECKING:
    import grpc

    from ..runtime import Runtime

__all__ = ["LOOPS", "Server"]

_ABORT_WAIT_S = 1.0
"""How long an abort (a second signal, ``stop(drain=False)``) waits for the HTTP server to end."""


class _Uvicorn(uvicorn.Server):
    # The Server owns the process's signals (serve_forever); uvicorn's own capture would
    # re-raise them after its shutdown.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    """Serves ``rt``'s models named in ``signatures`` over KServe v2 HTTP/REST on
    ``host:http_port`` and gRPC on ``host:grpc_port`` (0 picks a free port; ``grpc_port=None``
    serves HTTP only). The runtime is the caller's: start it before, close it after.

    ``start()``/``stop()`` run the server on a thread of its own (embedding, tests);
    ``serve_forever()`` runs it on the calling (main) thread until SIGTERM or SIGINT: readiness
    goes false, new requests get 503 (gRPC UNAVAILABLE), requests already admitted complete
    (for at most ``drain_timeout_s``), then it returns; a second signal aborts at once
    (``SystemExit(128 + signal)``; requests still running get 503, gRPC calls
    UNAVAILABLE).

    ``loop`` picks the event loop (one of ``LOOPS``): by default uvloop where it is installed
    (the ``serve`` extra installs it on Linux and macOS), which costs the server less CPU a
    request than the standard library's loop; ``self.loop`` names the one that runs."""

    def __init__(self, rt: Runtime, signatures: Mapping[str, Signature], host: str = "127.0.0.1",
                 http_port: int = 8000, grpc_port: int | None = 8001, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, queue_full_status: int = 429,
                 drain_timeout_s: float = 30.0, loop: str = "auto",
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> None:
        for field, port in (("http_port", http_port), ("grpc_port", grpc_port)):
            if port is None and field == "grpc_port":
                continue
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise QuotaError(f"Server: {field} must be a port in [0, 65535], got {port!r}", field=field)
        if not drain_timeout_s > 0:
            raise QuotaError(f"Server: drain_timeout_s must be > 0, got {drain_timeout_s!r}", field="drain_timeout_s")
        if not (finite_number(header_timeout_s) and header_timeout_s > 0):
            raise QuotaError(f"Server: header_timeout_s must be a finite number of seconds > 0, got "
                             f"{header_timeout_s!r}", field="header_timeout_s")
        self.header_timeout_s = float(header_timeout_s)
        if not (finite_number(write_timeout_s) and write_timeout_s > 0):
            raise QuotaError(f"Server: write_timeout_s must be a finite number of seconds > 0, got "
                             f"{write_timeout_s!r}", field="write_timeout_s")
        self.write_timeout_s = float(write_timeout_s)
        if isinstance(max_header_bytes, bool) or not isinstance(max_header_bytes, int) or max_header_bytes < 1024:
            raise QuotaError(f"Server: max_header_bytes must be an integer >= 1024, got {max_header_bytes!r}",
                             field="max_header_bytes")
        self.max_header_bytes = max_header_bytes
        self._loop_factory = loop_factory(loop)
        self.loop: str = loop_name(self._loop_factory)
        """The event loop that serves: ``uvloop`` or ``asyncio``."""
        self.frontend = fe.Frontend(rt, signatures)
        self.app = V2App(self.frontend, max_body_bytes=max_body_bytes,
                         queue_full_status=queue_full_status, body_timeout_s=body_timeout_s)
        self.host = host
        self.http_port: int = http_port
        """The bound HTTP port once started (the port given, or the one picked for 0)."""
        self.grpc_port: int | None = grpc_port
        """The bound gRPC port once started, or None."""
        self.drain_timeout_s = drain_timeout_s
        self.listening = threading.Event()
        """Set once both ports listen (``http_port``/``grpc_port`` then hold the bound ports);
        cleared when it begins to stop."""
        self.stopping = threading.Event()
        """Set when it begins to stop (a signal, or ``stop()``), before the drain: what runs
        beside the server for its lifetime (``apportion serve --adapt``'s controller) stops
        then, not after the drain."""
        self.drained: bool | None = None
        """After a draining stop: whether every admitted request completed within
        ``drain_timeout_s`` (None: not drained)."""
        self._max_message = max_body_bytes
        self._uv: _Uvicorn | None = None
        self._uv_task: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._drain = True

    # -- the loop's side ----------------------------------------------------------------------
    async def _open(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto given explicitly: asyncio disables Nagle only on sockets whose proto says TCP,
        # and without it every response whose body follows its headers waits for the client's
        # delayed ACK (~40 ms here).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.http_port))
        except OSError:
            sock.close()
            raise
        self.http_port = sock.getsockname()[1]
        # proxy_headers off: the app reads neither the client's address nor the scheme, and
        # uvicorn's middleware for them parsed every request's peer address on the loop
        # (~15% of the loop's Python time under load, bench/RESULTS.md).
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, log_level="warning",
                                access_log=False, proxy_headers=False,
                                http=header_timeout_protocol(self.header_timeout_s, self.max_header_bytes,
                                                             self.write_timeout_s),
                                # uvicorn annotates an int; it hands the value to asyncio.timeout (a float)
                                timeout_graceful_shutdown=self.drain_timeout_s)  # type: ignore[arg-type]
        # uvicorn's logger: its warnings few at a time (added once; a filter is kept in a list).
        uv_log = logging.getLogger("uvicorn.error")
        if _UVICORN_WARNINGS not in uv_log.filters:
            uv_log.addFilter(_UVICORN_WARNINGS)
        self._uv = _Uvicorn(config)
        self._uv_task = asyncio.create_task(self._uv.serve(sockets=[sock]))
        while not self._uv.started:
            if self._uv_task.done():
                self._uv_task.result()
                raise OSError(f"HTTP: uvicorn stopped before serving on {self.host}:{self.http_port}")
            await asyncio.sleep(0.005)
        if self.grpc_port is not None:
            self._grpc, self.grpc_port = await start_server(self.frontend, self.host, self.grpc_port,
                                                            self._max_message)
        self.listening.set()

    async def _close(self, drain: bool) -> None:
        self.listening.clear()
        self.stopping.set()
        loop = asyncio.get_running_loop()
        # One deadline for the whole drain: admitted requests, gRPC answers still being sent
        # and HTTP connections still answering share drain_timeout_s (each waited its own
        # before, up to twice the timeout and more).
        end = loop.time() + self.drain_timeout_s
        if drain:
            self.drained = await self.frontend.drain(self.drain_timeout_s)
        else:
            self.frontend.cut()
        self.frontend.failures.flush()  # the failures no line has counted yet: no later line will
        calls = list(self.frontend.grpc_calls)
        if calls:
            # gRPC calls still waiting for their model: UNAVAILABLE now, while their streams are
            # open (the server's stop would cancel them: CANCELLED, the client's word).
            for t in calls:
                t.cancel()
            await asyncio.wait(calls, timeout=_ABORT_WAIT_S)
        stopping = None
        if self._grpc is not None:
            # Calls whose answers are still being sent get what is left of the drain (a fixed
            # second cut a large answer to a slow client).
            stopping = asyncio.ensure_future(self._grpc.stop(grace=max(end - loop.time(), 0.05) if drain else None))
        if self._uv is not None:
            self._uv.config.timeout_graceful_shutdown = max(end - loop.time(), 0.05)  # type: ignore[assignment]
            self._uv.should_exit = True
            self._uv.force_exit = not drain
        if stopping is not None:
            await stopping
            # grpc.aio keeps a poller thread while any of its objects lives: let it end now
            self._grpc = None
        task = self._uv_task
        if task is None:
            return
        if drain:
            # Shielded: a second signal cancels this close, not uvicorn's task; the abort that
            # follows sets force_exit and waits for the same task to end.
            await asyncio.shield(task)
            return
        # Aborting: uvicorn leaves its wait for open connections at force_exit, within 0.1 s;
        # one that still waits for a connection to close after that is cancelled.
        await asyncio.wait({task}, timeout=_ABORT_WAIT_S)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_ABORT_WAIT_S)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure to start was raised from _open already

    async def _run(self, opened: threading.Event, failed: list[BaseException]) -> None:
        self._stop = asyncio.Event()
        try:
            await self._open()
        except BaseException as e:
            failed.append(e)
            opened.set()
            await self._close(drain=False)
            return
        opened.set()
        await self._stop.wait()
        await self._close(self._drain)

    # -- embedding ----------------------------------------------------------------------------
    def start(self) -> Server:
        """Serves on a background thread; returns once both ports listen (``http_port`` and
        ``grpc_port`` then hold the bound ports). Raises what binding raised."""
        if self._thread is not None:
            raise RuntimeError("Server: already started")
        opened = threading.Event()
        failed: list[BaseException] = []
        self._loop = self._loop_factory()

        def run() -> None:
            loop = self._loop
            assert loop is not None
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._run(opened, failed))
                # Requests still running (stop(drain=False), or past the drain): cancelled, they
                # answer 503 as serve_forever's do; closed with the loop, their clients got
                # nothing at all.
                left = asyncio.all_tasks(loop)
                for t in left:
                    t.cancel()
                if left:
                    loop.run_until_complete(asyncio.wait(left, timeout=_ABORT_WAIT_S))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="apportion-serve", daemon=True)
        self._thread.start()
        opened.wait()
        if failed:
            self._thread.join()
            raise failed[0]
        return self

    def stop(self, drain: bool = True) -> None:
        """Stops serving. ``drain=True``: readiness goes false, admitted requests complete
        (for at most ``drain_timeout_s``), then the ports close. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive():
            return
        self._drain = drain
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
        thread.join()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- a process of its own -----------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serves on the calling thread (the main thread: it handles SIGTERM and SIGINT) until
        a signal: then drains as ``stop()`` does and returns, so the process can close the
        runtime and exit 0. A second signal during the drain aborts: the ports close at once
        and ``SystemExit(128 + signum)`` is raised."""
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            runner.run(self._forever())

    async def _forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        abort: list[int] = []
        aborted = asyncio.Event()

        def on_signal(sig: int) -> None:
            name = signal.Signals(sig).name
            if stop.is_set():
                if not abort:
                    fe.log.warning("%s again: the drain is aborted; requests still running get 503", name)
                abort.append(sig)
                aborted.set()
            else:
                fe.log.info("%s: draining: not ready, new requests refused; %d admitted request(s) get up to "
                            "%g s to complete (a second signal aborts)", name, self.frontend.in_flight,
                            self.drain_timeout_s)
            stop.set()

        sigs = (signal.SIGTERM, signal.SIGINT)
        for sig in sigs:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await self._open()
            await stop.wait()
            closing = asyncio.create_task(self._close(drain=True))
            abort_wait = asyncio.create_task(aborted.wait())
            await asyncio.wait({closing, abort_wait}, return_when=asyncio.FIRST_COMPLETED)
            abort_wait.cancel()
            if abort:
                closing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await closing
                await self._close(drain=False)
                raise SystemExit(128 + abort[0])
            await closing
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def __repr__(self) -> str:
        return f"<apportion.serve.Server http={self.host}:{self.http_port} grpc={self.grpc_port}>"


