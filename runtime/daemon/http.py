"""The optional OpenAI-compatible HTTP door: the same daemon, the same log, over HTTP.

    outpost serve --http 127.0.0.1:8080        # or [http] listen = "127.0.0.1:8080"

For agents in other languages and tools that only speak HTTP: `POST
/v1/chat/completions` (with server-sent events when `stream` is true) and `GET
/v1/models`, `GET /v1/models/{id}`. A request is handled by the very methods the
ZeroMQ socket's are (`Daemon.chat`, `Versions.list`), so validation, routing,
escalation, logging and metrics are one code path; statuses and error bodies are
openai_shape's, the same the SDK transport gives.

It listens on loopback unless `[http] api_key` is set; with a key, every request
must carry `Authorization: Bearer <key>` (on loopback too). Starlette on uvicorn,
run as a task on the daemon's own loop (uvicorn's signal handling is left to the
daemon, which owns SIGINT and SIGTERM).

What this module must not do: answer anything itself; it translates HTTP to the
daemon's methods and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from outpost.manifests.errors import BadRequest, ConfigError, OutpostError, UnknownModel
from outpost.runtime import openai_shape as shape

from .errors import RequestTooLarge
from .settings import HttpSettings

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger("outpost.http")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def listen_address(settings: HttpSettings) -> tuple[str, int]:
    """(host, port) to bind, checked: off loopback only with an API key."""
    assert settings.listen is not None
    host, sep, port = settings.listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"[http] listen must be HOST:PORT, not {settings.listen!r}", listen=settings.listen)
    if host not in LOOPBACK and settings.api_key is None:
        raise ConfigError(f"refusing to serve HTTP on {settings.listen}: off loopback, set [http] api_key "
                          "so that only agents with the key are answered", listen=settings.listen)
    return host.strip("[]"), int(port)


def _error(exc: OutpostError) -> JSONResponse:
    wire = exc.to_wire()
    return JSONResponse(shape.error_body(wire), status_code=shape.status_for(exc.code),
                        headers=shape.error_headers(exc.code))


def app(daemon: Daemon, settings: HttpSettings) -> Starlette:
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    def authorised(request: Request) -> bool:
        if key is None:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        return hmac.compare_digest(given, key)

    def unauthorised() -> JSONResponse:
        return JSONResponse({"error": {"message": "a valid API key is required (Authorization: Bearer)",
                                       "type": "unauthorized", "code": "unauthorized", "param": None}},
                            status_code=401)

    async def chat(request: Request) -> Response:
        if not authorised(request):
            return unauthorised()
        limit = daemon.settings.server.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            return _error(RequestTooLarge(int(request.headers["content-length"]), limit))
        body = b""
        async for piece in request.stream():  # bounded as the socket's frames are
            body += piece
            if len(body) > limit:
                return _error(RequestTooLarge(len(body), limit))
        try:
            params = json.loads(body or b"{}")
            if not isinstance(params, dict):
                raise BadRequest("the request body must be a JSON object")
        except ValueError as exc:
            return _error(BadRequest(f"the request body is not JSON: {exc}"))
        except BadRequest as exc:
            return _error(exc)
        if params.get("stream"):
            return await _stream(daemon, params)
        try:
            return JSONResponse(await daemon.serve_call("chat", params))
        except OutpostError as exc:
            return _error(exc)
        except Exception as exc:  # a bug: reported, and answered in OpenAI's error shape
            return _error(daemon.internal(exc))

    async def models(request: Request) -> Response:
        if not authorised(request):
            return unauthorised()
        rows = (await daemon.versions.list({}))["models"]
        model_id = request.path_params.get("model_id")
        if model_id is None:
            return JSONResponse(shape.model_page(rows))
        row = next((m for m in rows if m["id"] == model_id), None)
        if row is None:
            return _error(UnknownModel(model_id, [m["id"] for m in rows]))
        return JSONResponse(shape.model_object(row))

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", models, methods=["GET"]),
    ])


async def _stream(daemon: Daemon, params: dict[str, Any]) -> Response:
    """A streamed chat: chunks as server-sent events. An error before the first chunk is
    an HTTP error status, as without streaming; one after it is an `error` event."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def emit(chunk: dict[str, Any]) -> None:
        queue.put_nowait(("chunk", chunk))

    call = daemon.start_call("chat", params, emit)
    call.task.add_done_callback(lambda t: queue.put_nowait(("done", t)))
    kind, first = await queue.get()
    if kind == "done" and first.exception() is not None:
        exc = first.exception()
        return _error(exc if isinstance(exc, OutpostError) else daemon.internal(exc))

    async def events() -> AsyncIterator[bytes]:
        item: tuple[str, Any] = (kind, first)
        try:
            while True:
                kind_, value = item
                if kind_ == "chunk":
                    yield shape.sse(value)
                else:
                    exc = value.exception()
                    if exc is None:
                        yield shape.sse(value.result())
                        yield shape.SSE_DONE
                    else:
                        err = exc if isinstance(exc, OutpostError) else daemon.internal(exc)
                        yield shape.sse(shape.error_body(err.to_wire()), event="error")
                    return
                item = await queue.get()
        finally:
            call.abandon()  # the agent went away: the request stops, queued or generating

    return StreamingResponse(events(), media_type="text/event-stream")


class _Uvicorn(uvicorn.Server):
    """uvicorn, minus its signal handlers: the daemon owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start(daemon: Daemon, settings: HttpSettings) -> tuple[_Uvicorn, asyncio.Task[None]]:
    """Serve the door on the running loop; returns the server and its task (stop with
    `server.should_exit = True`, then await the task)."""
    host, port = listen_address(settings)
    # Bound here, not by uvicorn: a port in use is a ConfigError, not uvicorn's sys.exit.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve HTTP on {settings.listen}: {exc.strerror}", listen=settings.listen) from exc
    server = _Uvicorn(uvicorn.Config(app(daemon, settings), log_level="warning", lifespan="off",
                                     access_log=False, timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    log.info("HTTP door on http://%s:%d/v1", host, port)
    return server, task
