"""The OpenAI SDK, unchanged, over ZeroMQ: httpx transports that carry its requests to
the daemon's socket instead of a TCP connection.

    from openai import OpenAI
    from outpost.runtime.sdk import http_client

    client = OpenAI(base_url="http://outpost/v1", api_key="unused",
                    http_client=http_client("ipc:///run/user/1000/outpost/outpost.sock"))
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=...,
                                           tools=TOOLS, tool_choice="required", stream=True)

`AsyncOpenAI` takes `async_http_client(endpoint)`. The host in `base_url` is never
contacted; the path decides the method (openai_shape.route). Outpost's extensions go
in `extra_body` (`task`, `escalation`, `constrained`); its `outpost` block is read
from the reply (`completion.outpost`, or the last chunk's). Error codes come back as
the SDK's exception types (openai_shape.STATUS); a daemon that is not there is a
connection error (the SDK's APIConnectionError, or APITimeoutError after the SDK's
timeout), so the SDK's retries and timeouts work as they do over HTTP.

The sync transport keeps a few sockets and lends one to each request, so several
threads (or a stream left open beside a new request) never share one; the async one
has all requests in flight over one socket (aclient.py). Closing a stream early
cancels its request if it is still queued.

What this module must not do: import the daemon, or the `openai` package (the SDK is
the caller, not a dependency).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import zmq
import zmq.asyncio

from . import openai_shape as shape
from .aclient import AsyncOutpostClient
from .client import OutpostClient
from .curve import ClientKeys, needs_curve
from .errors import BadRequest, ConfigError, DaemonUnreachable, OutpostError

BASE_URL = "http://outpost/v1"  # any URL does: the transport never resolves it


def http_client(endpoint: str, timeout_s: float = 300.0, curve: ClientKeys | None = None) -> httpx.Client:
    """An httpx client for `OpenAI(http_client=...)` that talks to the daemon at `endpoint`
    (with `curve` keys when it is off loopback: runtime/curve.py)."""
    return httpx.Client(transport=ZmqTransport(endpoint, timeout_s, curve), base_url=BASE_URL,
                        timeout=timeout_s)


def async_http_client(endpoint: str, timeout_s: float = 300.0,
                      curve: ClientKeys | None = None) -> httpx.AsyncClient:
    """The same for `AsyncOpenAI(http_client=...)`."""
    return httpx.AsyncClient(transport=AsyncZmqTransport(endpoint, timeout_s, curve), base_url=BASE_URL,
                             timeout=timeout_s)


def secure_check(endpoint: str, curve: ClientKeys | None) -> None:
    """Refuse a transport that could never connect (off loopback without keys) when it is
    made, not at the SDK's first request."""
    if curve is None and needs_curve(endpoint):
        raise ConfigError(f"{endpoint} is off loopback: pass curve=ClientKeys (runtime/curve.py)",
                          endpoint=endpoint)


def _call(request: httpx.Request) -> tuple[str, str | None, dict[str, Any]]:
    """(kind, model id, params) of an SDK request; BadRequest if it is not one we serve."""
    found = shape.route(request.method, request.url.path)
    if found is None:
        raise BadRequest(f"{request.method} {request.url.path} is not served over Outpost's door",
                         path=request.url.path)
    kind, model_id = found
    if kind != "chat":
        return kind, model_id, {}
    try:
        params = json.loads(request.content or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise BadRequest("the request body must be a JSON object")
    return kind, model_id, params


def _timeout(request: httpx.Request, default: float) -> float:
    read = (request.extensions.get("timeout") or {}).get("read")
    return float(read) if read else default


def _ok(request: httpx.Request, kind: str, model_id: str | None, first: Any) -> httpx.Response:
    """The reply to a request that succeeded: a chat's result (JSON) as the body, as is;
    the model list (a decoded result) in OpenAI's shapes."""
    if kind == "chat":
        return httpx.Response(200, content=first, headers=_JSON, request=request)
    if kind == "models":
        return httpx.Response(200, json=shape.model_page(first["models"]), request=request)
    row = next((m for m in first["models"] if m["id"] == model_id), None)
    if row is None:
        return _error(request, {"code": "unknown_model", "message": f"unknown model {model_id!r}",
                                "data": {"model": model_id}})
    return httpx.Response(200, json=shape.model_object(row), request=request)


_JSON = {"content-type": "application/json"}


def _error(request: httpx.Request, error: dict[str, Any]) -> httpx.Response:
    code = error.get("code", "internal")
    return httpx.Response(shape.status_for(code), json=shape.error_body(error),
                          headers=shape.error_headers(code), request=request)


def _unreachable(request: httpx.Request, exc: DaemonUnreachable) -> httpx.TransportError:
    if exc.data.get("timeout_s"):
        return httpx.ReadTimeout(str(exc), request=request)
    return httpx.ConnectError(str(exc), request=request)


def _method(kind: str) -> str:
    return "chat" if kind == "chat" else "models.list"


# -- sync ------------------------------------------------------------------------------
class ZmqTransport(httpx.BaseTransport):
    def __init__(self, endpoint: str, timeout_s: float = 300.0, curve: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve
        secure_check(endpoint, curve)
        self._idle: list[OutpostClient] = []
        self._lock = threading.Lock()

    def _lend(self) -> OutpostClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return OutpostClient(self.endpoint, self.timeout_s, zmq.Context.instance(), self.curve)

    def _give_back(self, client: OutpostClient) -> None:
        with self._lock:
            self._idle.append(client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            kind, model_id, params = _call(request)
        except BadRequest as exc:
            return _error(request, exc.to_wire())
        client = self._lend()
        timeout = _timeout(request, self.timeout_s)
        if kind == "chat":  # the body goes out and the reply comes back as JSON, as is
            frames: Iterator[Any] = client.frames_json("chat", request.content or b"{}", timeout)
        else:
            frames = client.frames(_method(kind), {}, timeout)
        try:
            first = next(frames)
        except DaemonUnreachable as exc:
            self._give_back(client)  # the client replaced its socket already
            raise _unreachable(request, exc) from exc
        except OutpostError as exc:
            self._give_back(client)
            return _error(request, exc.to_wire())
        if kind == "chat" and params.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, request=request,
                                  stream=_SyncEvents(first, frames, lambda: self._give_back(client)))
        frames.close()
        self._give_back(client)
        return _ok(request, kind, model_id, first)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


class _SyncEvents(httpx.SyncByteStream):
    """A stream's frames as server-sent events, ending with `[DONE]` (or an error event)."""

    def __init__(self, first: bytes, frames: Iterator[bytes], release: Any) -> None:
        self._first, self._frames, self._release = first, frames, release
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield shape.sse_json(self._first)
        try:
            for chunk in self._frames:
                yield shape.sse_json(chunk)
        except OutpostError as exc:  # failed after the first delta: the SDK raises APIError
            yield shape.sse(shape.error_body(exc.to_wire()), event="error")
            return
        yield shape.SSE_DONE

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._frames.close()  # left early: the client cancels the request
            self._release()


# -- async -----------------------------------------------------------------------------
class AsyncZmqTransport(httpx.AsyncBaseTransport):
    def __init__(self, endpoint: str, timeout_s: float = 300.0, curve: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve
        secure_check(endpoint, curve)
        self._client: AsyncOutpostClient | None = None  # made in the loop that uses it

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            kind, model_id, params = _call(request)
        except BadRequest as exc:
            return _error(request, exc.to_wire())
        if self._client is None:
            self._client = AsyncOutpostClient(self.endpoint, self.timeout_s, zmq.asyncio.Context.instance(),
                                              self.curve)
        timeout = _timeout(request, self.timeout_s)
        if kind == "chat":
            frames: AsyncIterator[Any] = self._client.frames_json("chat", request.content or b"{}", timeout)
        else:
            frames = self._client.frames(_method(kind), {}, timeout)
        try:
            first = await anext(frames)
        except DaemonUnreachable as exc:
            raise _unreachable(request, exc) from exc
        except OutpostError as exc:
            return _error(request, exc.to_wire())
        if kind == "chat" and params.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, request=request,
                                  stream=_AsyncEvents(first, frames))
        await frames.aclose()
        return _ok(request, kind, model_id, first)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class _AsyncEvents(httpx.AsyncByteStream):
    def __init__(self, first: bytes, frames: AsyncIterator[bytes]) -> None:
        self._first, self._frames = first, frames

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield shape.sse_json(self._first)
        try:
            async for chunk in self._frames:
                yield shape.sse_json(chunk)
        except OutpostError as exc:
            yield shape.sse(shape.error_body(exc.to_wire()), event="error")
            return
        yield shape.SSE_DONE

    async def aclose(self) -> None:
        await self._frames.aclose()  # type: ignore[attr-defined]  # left early: cancels it
