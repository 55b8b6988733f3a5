"""Load over the network: a KServe v2 server (``apportion serve``, Triton, or any other that
speaks the Open Inference Protocol) as the target of :func:`apportion.load.run`.

:class:`RemoteTarget` has the part of a :class:`~apportion.Runtime` the load generator uses
(``models``, ``submit``, ``stats``), so the same closed and open loops, windows, stability rule
and report drive a server in another process::

    from apportion import load

    with load.RemoteTarget("http://127.0.0.1:8000", ["mlp"]) as target:
        report = load.run(target, load.ModelLoad("mlp", concurrency=8), window_s=2.0)

Requests go out from one event loop thread, so requests in flight cost no thread each;
:func:`~apportion.load.run` drives a RemoteTarget's loads on that loop itself (no hand-off
between threads per request). Over HTTP the client is apportion's own (kept-alive connections,
each answer parsed by httptools, request bytes encoded once per input by tritonclient's request
encoder): it spends a fraction of the CPU tritonclient's aiohttp client spends a request, CPU
taken from the server under test when both share a machine. Over gRPC it is tritonclient's
asyncio client. Needs the ``load`` extra (``pip install "apportion[load]"``).

How requests and outcomes map:

- a request's input is what the load's ``inputs`` gives: a mapping of input name to array, or
  one array (numpy, torch or anything ``numpy.asarray`` takes) for a model with one input;
  None sends zeros of the model's declared shape (``-1`` dims as 1). Arrays are converted to
  the datatype the server declares for the input and sent as binary tensor data
  (``tensors="json"``: as JSON ``data``, outputs asked for as JSON too, for HTTP servers that
  take no binary data);
- ``timeout_ms`` goes to the server as the v2 ``timeout`` parameter (microseconds) and
  ``priority`` p as v2 priority p + 1 (v2's 1 is the highest level, apportion's 0);
- every request is sent (``submit`` never refuses), and every one is waited for: a request in
  flight cannot be taken back, so :meth:`~concurrent.futures.Future.cancel` fails and the
  end of a run waits for the answers;
- a refusal for a full queue (HTTP 429, gRPC ``RESOURCE_EXHAUSTED``) ends the request with
  :class:`RemoteRejected` (a :class:`~apportion.QueueFull`), counted as rejected; an expired
  deadline (HTTP 504, gRPC ``DEADLINE_EXCEEDED``) with :class:`RemoteExpired` (a
  :class:`~apportion.DeadlineExceeded`), counted as expired. Servers that answer both with
  one status are told apart by their own words: Triton answers a full queue ("Exceeds
  maximum queue size") and a request whose timeout passed in its queue ("Request timeout
  expired") with 503 / ``UNAVAILABLE``, Ray Serve a full queue ("Request dropped due to
  backpressure") with 503 or 429; these count as rejected and expired too. Any other error, a lost
  connection, or no answer within ``request_timeout_s`` with :class:`RemoteError`, counted as
  failed. Each carries ``kind`` (``"http 500"``, ``"grpc UNAVAILABLE"``, ``"connection"``,
  ``"client timeout"``), which the report counts (``ModelReport.errors``);
- ``stats()`` is empty: the server's own queue and compute histograms are not read, so a
  remote report has the generator's end-to-end figures only.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .._private.checks import finite_number
from ..errors import ApportionError, DeadlineExceeded, ModelNotFound, QueueFull
from ._http import POST_REDIRECTS, REDIRECTS, HttpClient, HttpError, RemoteResult
from .spec import LoadError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RemoteError", "RemoteExpired", "RemoteRejected", "RemoteResult", "RemoteTarget"]

_SCHEMES = ("http", "grpc")


class RemoteError(ApportionError):
    """A request that a server answered with an error, or that got no answer. ``kind`` says
    which (``"http 500"``, ``"grpc INTERNAL"``, ``"connection"``, ``"client timeout"``);
    the message is the server's or the client library's."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class RemoteRejected(RemoteError, QueueFull):
    """The server refused the request because the model's queue was full (HTTP 429, gRPC
    RESOURCE_EXHAUSTED)."""


class RemoteExpired(RemoteError, DeadlineExceeded):
    """The request's deadline passed at the server (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


_REJECTED = {"429", "StatusCode.RESOURCE_EXHAUSTED"}
_EXPIRED = {"504", "StatusCode.DEADLINE_EXCEEDED"}
# What other servers say when one status (503 / UNAVAILABLE) covers several outcomes: Triton's
# scheduler for a full queue and for a request whose timeout passed while it waited, Ray
# Serve's router for a full queue (max_queued_requests).
_REJECTED_WORDS = ("exceeds maximum queue size", "request dropped due to backpressure")
_EXPIRED_WORDS = ("request timeout expired",)


def classify(scheme: str, status: str | None, message: str) -> RemoteError:
    """The error for a server's answer ``status`` (tritonclient's: ``"429"`` over HTTP,
    ``"StatusCode.UNAVAILABLE"`` over gRPC; None when the client had no status)."""
    if status is None:
        return RemoteError("connection", message)
    code = status.removeprefix("StatusCode.")
    kind = f"{scheme} {code}"
    said = message.lower()
    if status in _REJECTED or any(w in said for w in _REJECTED_WORDS):
        return RemoteRejected(kind, message)
    if status in _EXPIRED or any(w in said for w in _EXPIRED_WORDS):
        return RemoteExpired(kind, message)
    return RemoteError(kind, message)


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    datatype: str
    shape: tuple[int, ...]


class RemoteTarget:
    """A KServe v2 server at ``url`` (``http://HOST:PORT`` or ``grpc://HOST:PORT``) as a load
    target for ``models``.

    Connects and reads each model's metadata (its inputs) at construction: raises LoadError
    for a malformed URL, RemoteError (kind ``"connection"``) for a server that cannot be
    reached, ModelNotFound naming the model for one the server does not know.
    ``request_timeout_s`` bounds each request on the client side; ``connections`` caps the
    HTTP connections kept open (one request in flight per connection); ``tensors``: ``"binary"``
    (the binary tensor data extension, tritonclient's default) or ``"json"`` (HTTP only).
    Close it (or use it as a context manager) to stop its event loop thread.
    """

    closed = False
    started = True

    def __init__(self, url: str, models: Iterable[str], *, request_timeout_s: float = 30.0,
                 connections: int = 256, tensors: str = "binary") -> None:
        self.url = url
        self.scheme, self._address = _parse_url(url)
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "", parts.port or 0
        self._http: Any = None  # the HttpClient, over HTTP
        names = [models] if isinstance(models, str) else list(models)
        if not names:
            raise LoadError(f"{url}: name at least one model to load")
        if not (finite_number(request_timeout_s) and request_timeout_s > 0):
            raise LoadError(f"{url}: request_timeout_s must be a positive, finite number, got {request_timeout_s!r}")
        self.request_timeout_s = float(request_timeout_s)
        if tensors not in ("binary", "json") or (tensors == "json" and self.scheme != "http"):
            raise LoadError(f"{url}: tensors must be 'binary' or, over HTTP, 'json'; got {tensors!r}")
        self.tensors = tensors
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise LoadError(f"{url}: connections must be an int >= 1, got {connections!r}")
        self._outputs: dict[str, list[Any]] = {}
        self._connections = connections
        self._inputs: dict[str, tuple[_Input, ...]] = {}
        self._prepared: dict[str, tuple[Any, list[Any], list[tuple[Any, str, bytes]]]] = {}
        self._wire: dict[str, tuple[list[Any], tuple[Any, ...], list[bytes]]] = {}  # HTTP request bytes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="apportion-load-remote",
                                        daemon=True)
        self._thread.start()
        self._client: Any = None
        try:
            # Each metadata read has request_timeout_s (a RemoteError naming it); this bound is
            # only for a loop that does not answer.
            self._call(self._open(names), timeout=self.request_timeout_s * (len(names) + 1) + 10.0)
        except BaseException:
            self.close()
            raise

    # -- the part of a Runtime that load.run uses -------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self._inputs)

    def stats(self) -> dict[str, Any]:
        return {}

    def submit(self, model: str, x: Any = None, *, timeout_ms: float | None = None,
               priority: int | None = None) -> Future[Any]:
        """Sends one request; the future ends with the answer (tritonclient's InferResult over
        gRPC; over HTTP a :class:`RemoteResult`, which behaves as one) or a RemoteError.
        Raises LoadError naming the model and the input for an input that does not match the
        model's metadata."""
        if self.closed:
            raise RemoteError("closed", f"{self.url}: the target is closed")
        request = self.request(model, x, timeout_ms, priority)
        fut: Future[Any] = Future()
        fut.set_running_or_notify_cancel()  # in flight: cancel() fails, the answer is awaited
        self._loop.call_soon_threadsafe(self._start, fut, model, request)
        return fut

    def request(self, model: str, x: Any, timeout_ms: float | None, priority: int | None) -> tuple[Any, ...]:
        """What :meth:`send` takes after the model's name for one request of ``model`` with
        input ``x`` (over HTTP the request's bytes; over gRPC the tensors and the request's
        options). Raises LoadError as :meth:`submit` does."""
        inputs = self._tensors(model, x)
        options: dict[str, Any] = {}
        if timeout_ms is not None:
            options["timeout"] = max(1, int(timeout_ms * 1000))
        if priority is not None:
            options["priority"] = priority + 1
        if self.tensors == "json":
            options["outputs"] = self._outputs[model]
        if self.scheme == "http":
            return (self._http_request(model, inputs, options),)
        return inputs, options

    async def send(self, model: str, *request: Any) -> Any:
        """One request (what :meth:`request` made), on this target's event loop
        (:attr:`loop`): the answer as :meth:`submit`'s future ends with it, or raises
        RemoteError (the server's error, a lost connection, or no answer within
        ``request_timeout_s``)."""
        try:
            async with asyncio.timeout(self.request_timeout_s):
                if self.scheme == "http":
                    status, headers, body = await self._http.send(request[0], follow=POST_REDIRECTS)
                else:
                    return await self._client.infer(model, request[0], **request[1])
        except TimeoutError:
            raise RemoteError("client timeout", f"model {model!r}: no answer within "
                              f"{self.request_timeout_s:g} s") from None
        except HttpError as e:
            raise RemoteError("connection", f"{self.url}: {e}") from None
        except Exception as e:  # noqa: BLE001 - every outcome is one RemoteError
            raise self._error(e) from None
        if status != 200:
            raise classify("http", str(status), _error_text(body))
        length = headers.get(b"inference-header-content-length")
        try:
            header_length = int(length) if length is not None else None
        except ValueError:
            raise RemoteError("http 200", f"model {model!r}: the answer's Inference-Header-Content-Length "
                              f"is not a number: {length!r}") from None
        # Decoded only when read, but checked as a v2 answer now (a proxy's page is not a result).
        if body.lstrip()[:1] != b"{" or (header_length is not None and not 0 < header_length <= len(body)):
            raise RemoteError("http 200", f"model {model!r}: the answer is not a v2 inference answer: "
                              f"{body[:120]!r}{'...' if len(body) > 120 else ''}")
        return RemoteResult(body, header_length)

    @property
    def connections(self) -> int:
        """The HTTP connections kept open at most (one request in flight on each)."""
        return self._connections

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop (on a thread of its own) that sends every request."""
        return self._loop

    def close(self) -> None:
        if self._thread.is_alive():
            if self._http is not None:
                try:
                    self._call(self._http.aclose(), timeout=10.0)
                except Exception:  # noqa: BLE001 - closing a broken connection is not an error
                    pass
            if self._client is not None:
                try:
                    self._call(self._client.close(), timeout=10.0)
                except Exception:  # noqa: BLE001 - closing a broken connection is not an error
                    pass
            try:  # requests still connecting or waiting for a connection: each future ends
                self._call(_cancel_the_rest(), timeout=10.0)
            except Exception:  # noqa: BLE001 - as above
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        self.closed = True

    def __enter__(self) -> RemoteTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteTarget({self.url!r}, models={self.models!r})"

    # -- inside the event loop --------------------------------------------------------------------
    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(
            self.request_timeout_s if timeout is None else timeout)

    async def _open(self, names: list[str]) -> None:
        mod = self._module()
        if self.scheme == "http":
            try:
                self._http = HttpClient(self._host, self._port, self._connections)
            except ImportError as e:
                raise LoadError(f"{self.url}: load over HTTP needs httptools (pip install 'apportion[load]'): "
                                f"{e}") from None
        else:
            self._client = mod.InferenceServerClient(self._address)
        for name in names:
            try:
                md = await self._metadata(name)
            except Exception as e:  # noqa: BLE001 - classified below
                err = e if isinstance(e, RemoteError) else self._error(e)
                if err.kind in ("http 404", "grpc NOT_FOUND"):
                    raise ModelNotFound(f"model {name!r}: field 'model': the server at {self.url} "
                                        f"does not serve it ({e})", model=name) from None
                raise type(err)(err.kind, f"{self.url}: reading model {name!r}'s metadata: {e}") from None
            raw = md["inputs"] if isinstance(md, Mapping) else [
                {"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in md.inputs]
            self._inputs[name] = tuple(_Input(i["name"], i["datatype"], tuple(int(d) for d in i["shape"]))
                                       for i in raw)
            if self.tensors == "json":
                self._outputs[name] = [mod.InferRequestedOutput(o["name"], binary_data=False)
                                       for o in md.get("outputs", [])]

    async def _metadata(self, name: str) -> Any:
        if self.scheme != "http":
            return await self._client.get_model_metadata(name)
        try:
            async with asyncio.timeout(self.request_timeout_s):
                # A server may move it (Ray Serve adds a trailing slash).
                status, _, body = await self._http.request("GET", f"/v2/models/{quote(name, safe='')}",
                                                           follow=REDIRECTS)
        except TimeoutError:
            raise RemoteError("client timeout", f"no answer within {self.request_timeout_s:g} s") from None
        except HttpError as e:
            raise RemoteError("connection", str(e)) from None
        if status != 200:
            raise classify("http", str(status), _error_text(body))
        try:
            md = json.loads(body)
            if not isinstance(md, dict) or not isinstance(md.get("inputs"), list):
                raise ValueError("no 'inputs' list")
        except ValueError as e:
            raise RemoteError("http 200", f"the model's metadata is not a v2 answer: {e}") from None
        return md

    def _http_request(self, model: str, inputs: list[Any], options: dict[str, Any]) -> list[bytes]:
        """The request's bytes (head, JSON, tensor data), encoded once for the same inputs and
        options."""
        key = (options.get("timeout"), options.get("priority"))
        cached = self._wire.get(model)
        if cached is not None and cached[0] is inputs and cached[1] == key:
            return cached[2]
        from tritonclient.http import InferenceServerClient

        body, json_size = InferenceServerClient.generate_request_body(
            inputs, outputs=options.get("outputs"), priority=options.get("priority", 0), timeout=options.get("timeout"))
        headers = (("Content-Type", "application/json"),) if json_size is None else (
            ("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", str(json_size)))
        wire = self._http.encode("POST", f"/v2/models/{quote(model, safe='')}/infer", body, headers=headers)
        self._wire[model] = (inputs, key, wire)
        return wire

    def _module(self) -> Any:
        try:
            if self.scheme == "http":
                import tritonclient.http as mod
            else:
                import tritonclient.grpc.aio as mod
        except (ImportError, RuntimeError) as e:
            # tritonclient installed without the protocol's extra raises RuntimeError ("The
            # installation does not include http support"), not ImportError.
            raise LoadError(f"{self.url}: load over {self.scheme.upper()} needs tritonclient[http,grpc] "
                            f"(pip install 'apportion[load]'): {e}") from None
        return mod

    def _start(self, fut: Future[Any], model: str, request: tuple[Any, ...]) -> None:
        self._loop.create_task(self._infer(fut, model, request))

    async def _infer(self, fut: Future[Any], model: str, request: tuple[Any, ...]) -> None:
        try:
            result = await self.send(model, *request)
        except RemoteError as e:  # every outcome ends the future, once
            fut.set_exception(e)
        except asyncio.CancelledError:  # close() with the request in flight
            fut.set_exception(RemoteError("closed", f"{self.url}: model {model!r}: the target was closed "
                                                    "before the answer came"))
            raise
        else:
            fut.set_result(result)

    def _error(self, e: Exception) -> RemoteError:
        from tritonclient.utils import InferenceServerException

        if isinstance(e, InferenceServerException):
            status = e.status()
            return classify(self.scheme, None if status is None else str(status), e.message() or str(e))
        return RemoteError("connection", f"{type(e).__name__}: {e}")

    # -- request tensors (in the caller's thread) ---------------------------------------------------
    def _tensors(self, model: str, x: Any) -> list[Any]:
        cached = self._prepared.get(model)
        if cached is not None and cached[0] is x and _unchanged(cached[2]):
            return cached[1]
        specs = self._inputs.get(model)
        if specs is None:
            raise ModelNotFound(f"model {model!r}: not one of this target's models ({self.models})", model=model)
        mod = self._module()
        import numpy as np  # here, not at import: `import apportion` loads apportion.load

        if x is None:
            arrays = {s.name: np.zeros([d if d >= 0 else 1 for d in s.shape], dtype=_np_dtype(s.datatype))
                      for s in specs}
        elif isinstance(x, Mapping):
            missing = [s.name for s in specs if s.name not in x]
            extra = sorted(set(x) - {s.name for s in specs})
            if missing or extra:
                raise LoadError(f"model {model!r}: field 'inputs': the server expects inputs "
                                f"{[s.name for s in specs]}, got {sorted(x)}")
            arrays = dict(x)
        elif len(specs) == 1:
            arrays = {specs[0].name: x}
        else:
            raise LoadError(f"model {model!r}: field 'inputs': the server expects several inputs "
                            f"{[s.name for s in specs]}; give a mapping of name to array")
        tensors = []
        sent: list[tuple[Any, str, bytes]] = []
        for s in specs:
            try:
                arr = _as_array(arrays[s.name], s.datatype)
            except (TypeError, ValueError) as e:
                raise LoadError(f"model {model!r}: input {s.name!r}: cannot send it as "
                                f"{s.datatype}: {e}") from None
            t = mod.InferInput(s.name, list(arr.shape), s.datatype)
            if self.tensors == "json":
                t.set_data_from_numpy(arr, binary_data=False)
            else:
                t.set_data_from_numpy(arr)
            tensors.append(t)
            sent.append((arrays[s.name], s.datatype, arr.tobytes()))
        # The same object again is sent as encoded only while its values are the same: an
        # inputs callable that refills one buffer must not send its first values for ever.
        self._prepared[model] = (x, tensors, sent)
        return tensors


async def _cancel_the_rest() -> None:
    """Cancels every other task of the running loop and waits for them."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _error_text(body: bytes) -> str:
    """A v2 error answer's message: its JSON ``error``, else the body itself (cut short)."""
    try:
        err = json.loads(body)
        if isinstance(err, dict) and isinstance(err.get("error"), str):
            return err["error"]
    except ValueError:
        pass
    text = body[:500].decode("utf-8", "replace")
    return text + ("..." if len(body) > 500 else "") if text else "(no message)"


def _unchanged(sent: list[tuple[Any, str, bytes]]) -> bool:
    """Whether each input still holds the values it was encoded with."""
    for value, datatype, raw in sent:
        if _frozen(value):
            continue
        try:
            if _as_array(value, datatype).tobytes() != raw:
                return False
        except Exception:  # noqa: BLE001 - it no longer converts: encode it again (and say why there)
            return False
    return True


def _frozen(value: Any) -> bool:
    """A numpy array that owns its data read-only: its values cannot change in place (the
    check above is skipped; a load's fixed input costs nothing more per request)."""
    flags = getattr(value, "flags", None)
    return flags is not None and getattr(flags, "owndata", False) and not getattr(flags, "writeable", True)


def _parse_url(url: str) -> tuple[str, str]:
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
    except ValueError as e:  # such as an unclosed IPv6 bracket
        raise LoadError(f"url {url!r}: {e}; expected http://HOST:PORT or grpc://HOST:PORT") from None
    if parts is None or parts.scheme not in _SCHEMES or not parts.hostname or parts.path not in ("", "/"):
        raise LoadError(f"url {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise LoadError(f"url {url!r}: give the port, e.g. {parts.scheme}://{parts.hostname}:8000")
    return parts.scheme, f"{parts.hostname}:{port}"


def _np_dtype(datatype: str) -> Any:
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise ValueError(f"unknown v2 datatype {datatype!r}")
    return dtype


def _as_array(value: Any, datatype: str) -> np.ndarray:
    import numpy as np

    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    dtype = _np_dtype(datatype)
    if datatype == "BYTES":
        return np.asarray(value, dtype=object)
    arr = np.asarray(value)
    if arr.dtype != dtype and not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise ValueError(f"its dtype {arr.dtype} does not convert to {np.dtype(dtype)}")
    return np.ascontiguousarray(arr, dtype=dtype)
