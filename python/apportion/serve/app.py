"""The Open Inference Protocol (KServe v2) over HTTP/REST as an ASGI application.

A plain ASGI callable rather than Starlette routes: the v2 paths are few and fixed, and
measured here (in-process ASGI calls of a no-op infer, bench/RESULTS.md "Serving over the
network") Starlette's routing and Request/Response objects added per-request time that a
split of the path does not. It mounts in any ASGI framework (``fastapi_app.mount("/", app)``)
that runs it on an asyncio event loop (asyncio or uvloop; not trio).
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
import orjson  # the package's __init__ names the extra when it is missing

from .._private.checks import finite_number
from ..errors import QuotaError, RuntimeClosed
from ..metrics import CONTENT_TYPE, RuntimeMetrics, ServerCollector
from . import _frontend as fe
from .tensors import (
    OFF_LOOP_BYTES,
    OutputError,
    Signature,
    TensorError,
    check_header,
    conversion_bytes,
    from_bytes,
    from_json,
    to_bytes,
    to_json,
)

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["asgi", "DEFAULT_MAX_BODY_BYTES"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 64 << 20
"""Request bodies beyond this many bytes are refused with 413 (``max_body_bytes=``)."""

DEFAULT_BODY_TIMEOUT_S = 60.0
"""A request body not arrived whole this many seconds after its headers gets 408
(``body_timeout_s=``): a client that stalls does not hold a connection and its buffer."""

_PROMETHEUS = CONTENT_TYPE.encode()
_JSON = [(b"content-type", b"application/json")]
_STATUS = {fe.NOT_FOUND: 404, fe.INVALID: 400, fe.QUEUE_FULL: 429, fe.DEADLINE: 504,
           fe.INTERNAL: 500, fe.MODEL_FAILED: 500, fe.OUTPUT_MISMATCH: 500, fe.UNAVAILABLE: 503,
           fe.DISCONNECTED: 503,  # (nobody reads it)
           fe.TOO_LARGE: 413, fe.NOT_ALLOWED: 405, fe.UNSUPPORTED: 415, fe.SLOW_BODY: 408}


def asgi(rt: Runtime, signatures: Mapping[str, Signature], *,
         max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, queue_full_status: int = 429,
         body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> V2App:
    """An ASGI app serving ``rt``'s models named in ``signatures`` over KServe v2 REST.

    ``max_body_bytes``: larger request bodies get 413. ``queue_full_status``: the status of a
    request refused because the model's queue is full: 429 (with ``Retry-After: 1``) or 503.
    ``body_timeout_s``: a body not arrived whole this long after its headers gets 408.
    The runtime is the caller's: start it before serving, close it after.

    The app runs on an asyncio event loop (asyncio or uvloop: uvicorn, hypercorn's asyncio
    and uvloop workers, FastAPI and Starlette on anyio's asyncio backend). Under trio its
    startup fails and every request gets 500 saying so."""
    return V2App(fe.Frontend(rt, signatures), max_body_bytes=max_body_bytes,
                 queue_full_status=queue_full_status, body_timeout_s=body_timeout_s)


NOT_ASYNCIO = ("apportion's v2 app runs on an asyncio event loop (asyncio or uvloop), and this ASGI server "
               "runs it on another (trio?): serve it with uvicorn, hypercorn's asyncio or uvloop worker, or "
               "anyio's asyncio backend")


class _Disconnected(Exception):
    pass


class V2App:
    """The ASGI callable; see :func:`asgi`."""

    def __init__(self, frontend: fe.Frontend, *, max_body_bytes: int, queue_full_status: int,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise QuotaError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}", field="max_body_bytes")
        if not (finite_number(body_timeout_s) and body_timeout_s > 0):
            raise QuotaError(f"body_timeout_s must be a finite number of seconds > 0, got {body_timeout_s!r}",
                             field="body_timeout_s")
        self.body_timeout_s = float(body_timeout_s)
        self._body_alarms = fe.Alarms(self.body_timeout_s)
        if queue_full_status not in (429, 503):
            raise QuotaError(f"queue_full_status must be 429 or 503, got {queue_full_status!r}",
                             field="queue_full_status")
        self.frontend = frontend
        # Kept: each _sum carries on across the native wrap. With the front's own count of the
        # infer requests it answered, by status.
        self._metrics = RuntimeMetrics(frontend.rt, collectors=[ServerCollector(frontend.answers)])
        self.max_body_bytes = max_body_bytes
        self._status = {**_STATUS, fe.QUEUE_FULL: queue_full_status}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # trio (hypercorn --worker-class trio, anyio's trio backend)
            await self._refuse_loop(kind, receive, send)
            return
        if kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    try:
                        self.frontend.rt._check_not_forked()
                    except RuntimeClosed as e:  # the server fails to start, saying why
                        await send({"type": "lifespan.startup.failed", "message": str(e)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind == "websocket":
            # The protocol has no websocket route: refuse the handshake (403), rather than
            # return without a word (uvicorn answered 500 and logged an error).
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        try:
            status, headers, body = await self._route(scope, receive)
        except fe.ServeError as e:
            status, headers, body = self._error(e)
        except _Disconnected:
            return
        except asyncio.CancelledError:
            if not self.frontend.draining:
                raise
            # The drain ended with the request still running (its timeout, a second signal,
            # stop(drain=False)): cancelled here, it gets 503, not the server's generic 500
            # (which reads as the model's failure), and the log no traceback.
            status, headers, body = self._error(fe.ServeError(
                fe.UNAVAILABLE, "the server stopped before this request completed (its drain ended: the drain "
                                "timeout, or an abort)"))
        except Exception as e:  # a bug of ours: answer it, never take the server down
            self.frontend.failures.report("", fe.INTERNAL, f"{scope['method']} {scope['path'][:200]!r} failed in "
                                          f"the server: {type(e).__name__}: {e}", e)
            status, headers, body = self._error(fe.ServeError(fe.INTERNAL, f"{type(e).__name__}: {e}"))
        if self.frontend.draining or status in (408, 413):
            # The connection ends with this answer: draining, a client that reused it for its
            # next request raced the server closing it, and got no answer at all; after a body
            # that stalled or was too large, what the client sends next would be read as a new
            # request, and nothing timed the connection out any more (a slow sender held it).
            headers = [*headers, (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        # HEAD: the headers a GET would get (its Content-Length too), without the body
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    async def _refuse_loop(self, kind: str, receive: Receive, send: Send) -> None:
        """Under an ASGI server that runs the app on another event loop than asyncio's: its
        startup fails (with lifespan), and every request, health included, gets 500 saying so
        (the app waits for the runtime's futures on the asyncio loop it runs on: without one,
        every infer failed while health answered ready)."""
        if kind == "lifespan":
            if (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": NOT_ASYNCIO})
            return
        if kind == "http":
            _, headers, body = self._error(fe.ServeError(fe.INTERNAL, NOT_ASYNCIO))
            await send({"type": "http.response.start", "status": 500,
                        "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        elif kind == "websocket" and (await receive())["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1011})

    def _error(self, e: fe.ServeError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        status = self._status[e.kind]
        headers = list(_JSON)
        if status == 429:
            headers.append((b"retry-after", b"1"))
        return status, headers, _dumps({"error": e.message})

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        f = self.frontend
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix (Starlette/FastAPI Mount)
            path = path[len(root):]
        parts = path.rstrip("/").split("/")[1:]
        raw = scope.get("raw_path")
        if raw and b"%" in raw and (b"%2F" in raw or b"%2f" in raw):
            # A model name with "/" in it arrives escaped as %2F, and the decoded path splits it:
            # split the raw path, then decode each segment (as many segments off the front as
            # the mount prefix has).
            segments = [unquote(seg) for seg in raw.decode("latin-1").rstrip("/").split("/")[1:]]
            parts = segments[len(root.rstrip("/").split("/")) - 1 if root else 0:]
        method = scope["method"]
        if parts == ["metrics"]:
            _method(method, "GET", scope)
            # On a worker thread: with tens of models the text takes tens of milliseconds, which
            # held every request and probe behind each scrape.
            return 200, [(b"content-type", _PROMETHEUS)], await asyncio.to_thread(self._metrics.text)
        if parts[:1] != ["v2"]:
            raise fe.ServeError(fe.NOT_FOUND, f"no such endpoint: {scope['path']}")
        rest = parts[1:]
        if not rest:
            _method(method, "GET", scope)
            return 200, _JSON, _dumps(f.server_metadata())
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            _method(method, "GET", scope)
            ok = f.live() if rest[1] == "live" else f.ready()
            return _health(ok, f"server is not {rest[1]}")
        if rest[0] == "models" and len(rest) >= 2:
            name, tail = rest[1], rest[2:]
            if name not in f.signatures:
                # A name with "/" in it, sent unescaped (as tritonclient does): the shortest run
                # of segments that names a model.
                for k in range(2, len(rest)):
                    if "/".join(rest[1:k + 1]) in f.signatures:
                        name, tail = "/".join(rest[1:k + 1]), rest[k + 1:]
                        break
            version = ""
            if len(tail) >= 2 and tail[0] == "versions":
                version, tail = tail[1], tail[2:]
                if not version:
                    if tail == ["infer"]:
                        f.count(name, "http", fe.NOT_FOUND)
                    raise fe.ServeError(fe.NOT_FOUND, f"no such endpoint: {scope['path']} (empty version)")
            if tail == ["infer"]:  # counted by status, its refusals too
                return await self._infer(name, version, scope, receive)
            if rest[-1] == "infer":  # an infer path that names no served model (counted as "")
                f.count("", "http", fe.NOT_FOUND)
            f.signature(name)
            f.check_version(name, version)
            if not tail:
                _method(method, "GET", scope)
                return 200, _JSON, _dumps(f.model_metadata(name))
            if tail == ["ready"]:
                _method(method, "GET", scope)
                return _health(f.model_ready(name), f"model {name!r} is not ready")
        raise fe.ServeError(fe.NOT_FOUND, f"no such endpoint: {scope['path']}")

    async def _read(self, name: str, scope: Scope, receive: Receive) -> bytearray:
        f = self.frontend
        if f.draining:  # its body would not be read before the drain cuts it off
            raise fe.ServeError(fe.UNAVAILABLE, f"model {name!r}: the server is shutting down")
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and _digits(declared) and int(declared) > limit:
            raise fe.ServeError(fe.TOO_LARGE, f"model {name!r}: request body of {declared} bytes exceeds the "
                                              f"limit of {limit} bytes")
        body = bytearray()
        # Registered while its body arrives: not admitted yet, so a drain does not wait for a
        # client that sends slowly or stops halfway; it answers 503 instead (Frontend.cut), and
        # a body later than body_timeout_s answers 408 (the same stop, by its timer).
        task = asyncio.current_task()
        if task is not None:
            f.reading.add(task)
            self._body_alarms.set(task, f.stop_reading, task, fe.SLOW_BODY)
        try:
            while True:
                try:
                    msg = await receive()
                except asyncio.CancelledError:
                    why = f.was_cut(task)
                    if why == fe.UNAVAILABLE:
                        raise fe.ServeError(why, f"model {name!r}: the server is shutting down; the "
                                                 "request's body had not arrived") from None
                    if why == fe.SLOW_BODY:
                        raise fe.ServeError(why, f"model {name!r}: the request body did not arrive within "
                                                 f"{self.body_timeout_s:g} s") from None
                    raise
                if msg["type"] == "http.disconnect":
                    raise _Disconnected
                body += msg.get("body", b"")
                if len(body) > limit:
                    raise fe.ServeError(fe.TOO_LARGE, f"model {name!r}: request body exceeds the limit of {limit} bytes")
                if not msg.get("more_body", False):
                    return body
        finally:
            if task is not None:
                f.done_reading(task)
                self._body_alarms.cancel(task)

    async def _infer(self, name: str, version: str, scope: Scope,
                     receive: Receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        count = self.frontend.count
        try:
            answer = await self._answer(name, version, scope, receive)
        except fe.ServeError as e:
            self.frontend.refused(name, "http", e)
            raise
        except _Disconnected:
            count(name, "http", fe.DISCONNECTED)
            raise
        except asyncio.CancelledError:
            # Draining: answered 503 (see __call__); else the server dropped the connection.
            count(name, "http", fe.UNAVAILABLE if self.frontend.draining else fe.DISCONNECTED)
            raise
        except Exception:
            count(name, "http", fe.INTERNAL)
            raise
        count(name, "http", fe.OK)
        return answer

    async def _answer(self, name: str, version: str, scope: Scope,
                      receive: Receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        f = self.frontend
        sig = f.signature(name)
        f.check_version(name, version)
        _method(scope["method"], "POST", scope)
        encoding = _header(scope, b"content-encoding")
        coding = encoding.strip().lower() if encoding is not None else "identity"  # codings ignore case
        if coding not in _CODINGS:
            raise fe.ServeError(fe.UNSUPPORTED, f"model {name!r}: Content-Encoding {encoding!r} is not supported "
                                                "(send the body as gzip, deflate or uncompressed)")
        body = await self._read(name, scope, receive)
        hlen = _header(scope, b"inference-header-content-length")
        # A large body is inflated, parsed and converted on a worker thread, its answer encoded
        # there too: on the loop, a 15 MB request held every other request and probe for
        # seconds. (Each step still holds the GIL, so the loop waits out its longest C call.)
        if coding != "identity" or len(body) >= OFF_LOOP_BYTES:
            request_id, options, arrays, wanted = await asyncio.to_thread(self._parse, name, sig, body, hlen, coding)
        else:
            request_id, options, arrays, wanted = self._parse(name, sig, body, hlen, coding)
        outputs = await f.infer(name, arrays, *options, gone=receive)
        if conversion_bytes(outputs[spec.name] for spec, _ in wanted) >= OFF_LOOP_BYTES:
            return await asyncio.to_thread(_encoded, name, request_id, wanted, outputs)
        return _encoded(name, request_id, wanted, outputs)

    def _parse(self, name: str, sig: Signature, body: bytearray, hlen: str | None,
               coding: str) -> tuple[Any, tuple[float | None, int | None], dict[str, np.ndarray], list[tuple[Any, bool]]]:
        """The request's id, (timeout_ms, priority), input arrays and wanted outputs; every
        refusal a ServeError."""
        if coding != "identity":
            body = _decompressed(name, body, coding, self.max_body_bytes)
        if hlen is None:
            json_len = len(body)
        elif not _digits(hlen) or int(hlen) > len(body):
            raise fe.ServeError(fe.INVALID, f"Inference-Header-Content-Length is {hlen!r}, but the "
                                            f"body has {len(body)} bytes")
        else:
            json_len = int(hlen)
        try:
            request = _loads(body[:json_len])
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise fe.ServeError(fe.INVALID, f"model {name!r}: malformed JSON request: {e}") from None
        if not isinstance(request, dict):
            raise fe.ServeError(fe.INVALID, f"model {name!r}: the request must be a JSON object")
        request_id = request.get("id", _NO_ID)
        if request_id is not _NO_ID and not isinstance(request_id, str):
            raise fe.ServeError(fe.INVALID, f"model {name!r}: the request's 'id' must be a string, "
                                            f"got {request_id!r}"[:300])
        if isinstance(request_id, str) and not _encodable(request_id):
            # Echoed in the answer, which could not be written after the model ran (500).
            raise fe.ServeError(fe.INVALID, f"model {name!r}: the request's 'id' is not valid Unicode (a lone "
                                            f"surrogate escape): {request_id!r}"[:300])
        params = _params(name, "request", request.get("parameters"))
        options = self.frontend.request_options(name, params.get("timeout"), params.get("priority"))
        try:
            arrays = _inputs(name, sig, request.get("inputs"), memoryview(body)[json_len:])
            wanted = _outputs(name, sig, request.get("outputs"), params.get("binary_data_output"))
        except TensorError as e:
            raise fe.ServeError(fe.INVALID, str(e)) from None
        return request_id, options, arrays, wanted


_NO_ID = object()


def _encoded(name: str, request_id: Any, wanted: list[tuple[Any, bool]],
             outputs: Mapping[str, np.ndarray]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The answer: JSON, or JSON and binary outputs after it."""
    header: dict[str, Any] = {"model_name": name, "model_version": "1"}
    if request_id is not _NO_ID:
        header["id"] = request_id
    out_meta = []
    raw = []
    try:
        for spec, binary in wanted:
            arr = outputs[spec.name]
            meta: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(arr.shape)}
            if binary:
                data = to_bytes(spec, arr)
                meta["parameters"] = {"binary_data_size": len(data)}
                raw.append(data)
            else:
                meta["data"] = to_json(name, spec, arr)
            out_meta.append(meta)
    except OutputError as e:
        raise fe.ServeError(fe.OUTPUT_MISMATCH, str(e)) from None  # logged by Frontend.refused
    header["outputs"] = out_meta
    head = _dumps(header)
    if not raw:
        return 200, _JSON, head
    return 200, [(b"content-type", b"application/octet-stream"),
                 (b"inference-header-content-length", str(len(head)).encode())], b"".join([head, *raw])


_CODINGS = ("identity", "gzip", "x-gzip", "deflate")

MAX_GZIP_MEMBERS = 1024
"""The most gzip members a request body may hold (clients send one)."""

_INFLATE_SLICE = 1 << 16


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decompressed(name: str, body: bytearray, coding: str, limit: int) -> bytearray:
    """A gzip or deflate request body (what tritonclient's request_compression_algorithm
    sends), decompressed to at most ``limit`` bytes: a body that would inflate beyond it gets
    413 before more is inflated."""
    # deflate: the zlib format (RFC 9110), as zlib.compress writes it; some clients send raw
    # deflate data, which has no header to detect, so it is tried when the zlib header is not there.
    # gzip: a body may hold several members, one after another (RFC 1952), read in turn. The
    # body is fed in slices: what a member leaves unread is then at most a slice (handing each
    # member the whole rest of the body made 100,000 empty members a quadratic copy, 6 s of
    # CPU for 2 MB), and at most MAX_GZIP_MEMBERS members are read.
    gzip = coding in ("gzip", "x-gzip")
    wbits = 16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS
    view = memoryview(body)
    for attempt in (wbits, -zlib.MAX_WBITS) if coding == "deflate" else (wbits,):
        out = bytearray()
        d = zlib.decompressobj(attempt)
        member, pos, pending = 1, 0, b""
        data: bytes | memoryview
        try:
            while True:
                if pending:
                    data, pending = pending, b""
                elif pos < len(view):
                    data = view[pos:pos + _INFLATE_SLICE]
                    pos += len(data)
                else:
                    raise fe.ServeError(fe.INVALID, f"model {name!r}: the {coding} request body ends before its "
                                                    "compressed data does")
                out += d.decompress(data, limit + 1 - len(out))
                if len(out) > limit or d.unconsumed_tail:
                    raise fe.ServeError(fe.TOO_LARGE, f"model {name!r}: the {coding} request body decompresses "
                                                      f"beyond the limit of {limit} bytes")
                if not d.eof:
                    continue
                rest = d.unused_data
                if not rest and pos >= len(view):
                    return out
                if not gzip:
                    raise fe.ServeError(fe.INVALID, f"model {name!r}: {len(rest) + len(view) - pos} bytes follow "
                                                    f"the end of the {coding} request body's compressed data")
                member += 1
                if member > MAX_GZIP_MEMBERS:
                    raise fe.ServeError(fe.INVALID, f"model {name!r}: the gzip request body holds more than "
                                                    f"{MAX_GZIP_MEMBERS} members")
                d, pending = zlib.decompressobj(attempt), rest
        except zlib.error as e:
            if attempt == wbits and coding == "deflate":
                continue
            which = f" (its gzip member {member})" if member > 1 else ""
            raise fe.ServeError(fe.INVALID, f"model {name!r}: the {coding} request body cannot be "
                                            f"decompressed{which}: {e}") from None
    raise AssertionError("unreachable")


def _inputs(name: str, sig: Signature, inputs: Any, raw: memoryview) -> dict[str, np.ndarray]:
    if not isinstance(inputs, list):
        raise TensorError(f"model {name!r}: the request needs 'inputs', a list of tensors "
                          f"(expected {[s.name for s in sig.inputs]})")
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise TensorError(f"model {name!r}: each input must be an object with a 'name', got {t!r}"[:300])
        spec = sig.input(name, t["name"])
        if spec.name in arrays:
            raise TensorError(f"model {name!r}: input {spec.name!r} is given twice")
        shape = check_header(name, spec, t.get("datatype"), t.get("shape"))
        size = _params(name, f"input {spec.name!r}", t.get("parameters")).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise TensorError(f"model {name!r}, input {spec.name!r}: 'binary_data_size' must "
                                  f"be an int >= 0, got {size!r}")
            if pos + size > len(raw):
                raise TensorError(f"model {name!r}, input {spec.name!r}: binary_data_size {size} "
                                  f"at offset {pos} runs past the {len(raw)} binary bytes after "
                                  "the JSON header (check Inference-Header-Content-Length)")
            arrays[spec.name] = from_bytes(name, spec, shape, raw[pos:pos + size])
            pos += size
        elif "data" in t:
            arrays[spec.name] = from_json(name, spec, shape, t["data"])
        else:
            raise TensorError(f"model {name!r}, input {spec.name!r}: give 'data' or "
                              "parameters.binary_data_size")
    if pos != len(raw):
        raise TensorError(f"model {name!r}: the inputs' binary_data_size add up to {pos} bytes, "
                          f"but {len(raw)} follow the JSON header (check Inference-Header-Content-Length)")
    return arrays


def _flag(name: str, where: str, key: str, value: Any, default: bool) -> bool:
    """A boolean parameter: JSON true or false (absent: ``default``); "false" is not false."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TensorError(f"model {name!r}, {where}: parameter {key!r} must be true or false, got {value!r}"[:300])
    return value


def _outputs(name: str, sig: Signature, outputs: Any, binary_default: Any) -> list[tuple[Any, bool]]:
    default = _flag(name, "request", "binary_data_output", binary_default, False)
    if outputs is None or outputs == []:  # none named: every output the model produces
        return [(s, default) for s in sig.outputs]
    if not isinstance(outputs, list):
        raise TensorError(f"model {name!r}: 'outputs' must be a list, got {outputs!r}"[:300])
    out: list[tuple[Any, bool]] = []
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise TensorError(f"model {name!r}: each requested output must be an object with a "
                              f"'name', got {o!r}"[:300])
        where = f"output {o['name']!r}"
        p = _params(name, where, o.get("parameters"))
        if "classification" in p:
            raise TensorError(f"model {name!r}, {where}: the classification extension is not supported; request "
                              "the output without parameters.classification and take the top classes from it")
        spec = sig.output(name, o["name"])
        if any(spec is seen for seen, _ in out):  # it was answered twice
            raise TensorError(f"model {name!r}: {where} is requested twice")
        out.append((spec, _flag(name, where, "binary_data", p.get("binary_data"), default)))
    return out


def _params(name: str, where: str, p: Any) -> dict[str, Any]:
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise fe.ServeError(fe.INVALID, f"model {name!r}, {where}: 'parameters' must be an object")
    return p


def _method(method: str, want: str, scope: Scope) -> None:
    if method != want and not (method == "HEAD" and want == "GET"):  # probes may send HEAD
        raise fe.ServeError(fe.NOT_ALLOWED, f"{scope['path']} takes {want}, not {method}")


def _health(ok: bool, why: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    # The protocol: 200 is true, a 4xx false.
    return (200, _JSON, b"") if ok else (400, _JSON, _dumps({"error": why}))


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes other scripts' digits (and "²", which int()
    refuses)."""
    return text.isascii() and text.isdigit()


def _header(scope: Scope, key: bytes) -> str | None:
    """The value of header ``key`` (lower case), None without one. Given more than once it
    is the client's error: neither of the two read here is a list, and taking the first
    silently could read a body other than the client meant."""
    found = None
    for k, v in scope["headers"]:
        if k == key:
            if found is not None:
                raise fe.ServeError(fe.INVALID, f"header {key.decode()!r} is given more than once; give it once")
            found = v.decode("latin-1")
    return found


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps with separators builds one per call


def _loads(data: bytes | bytearray) -> Any:
    """JSON through orjson (6x Python's json on a 249 KB tensor request: 0.43 ms, not 2.7);
    what orjson refuses (NaN and Infinity, numbers beyond a float, UTF-16, lone surrogates)
    through Python's json, which takes them as it always did, or says what is malformed."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data, parse_float=_finite_float)


def _finite_float(text: str) -> float:
    # A number literal past a float (1e400), which Python's json reads as inf: an infinity
    # nobody sent (the Infinity token, which some clients write, is not a number literal).
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is beyond a 64-bit float")
    return value


def _dumps(obj: Any) -> bytes:
    """JSON through orjson (13x Python's json on 6,144 floats), unless it wrote a null: orjson
    writes NaN and Infinity as null, Python's json as NaN and Infinity (what tritonclient
    reads back), so such an answer (or one with a real null) is written by Python's json."""
    out = orjson.dumps(obj)
    return out if b"null" not in out else _ENCODER.encode(obj).encode()
