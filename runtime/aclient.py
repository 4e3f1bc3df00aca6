"""An asyncio client for agents: many requests in flight over one DEALER socket.

    async with AsyncOutpostClient(endpoint) as client:
        replies = await asyncio.gather(*(client.chat(m, tools=TOOLS) for m in prompts))
        async for chunk in client.chat_stream(messages):
            ...

One reader task takes every frame off the socket and hands it to the request whose
`id` it carries. A request whose caller stops waiting (its task cancelled, a stream
closed early) sends the daemon a `cancel`: the request stops wherever it is, queued or
generating, and is never answered (docs/protocol.md, `cancel`).

What this module must not do: import the daemon; a client process stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
import zmq.asyncio

from .client import chat_body, decoded, reply_id, request_frame, request_json, sliced
from .curve import ClientKeys, secure
from .errors import ConfigError, DaemonUnreachable, OutpostError


class AsyncOutpostClient:
    def __init__(self, endpoint: str, timeout_s: float = 300.0,
                 context: zmq.asyncio.Context | None = None, curve: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._own_ctx = context is None  # a shared context is not terminated here
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        try:
            secure(self._sock, endpoint, curve)  # required off loopback (runtime/curve.py)
        except ConfigError:
            self._sock.close(linger=0)
            if self._own_ctx:
                self._ctx.term()
            raise
        self._sock.connect(endpoint)
        self._waiting: dict[str, asyncio.Queue[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        while True:
            raw = await self._sock.recv()
            queue = self._waiting.get(reply_id(raw))
            if queue is not None:
                queue.put_nowait(raw)  # else: a reply to a request given up on

    def frames(self, method: str, params: dict[str, Any] | None = None,
               timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """One request's replies: the `chunk`s of a stream, then its `result`. An error
        frame is raised; `timeout_s` bounds the wait for each frame."""
        request_id = uuid.uuid4().hex
        return self._exchange(request_id, request_json(request_id, method, params or {}), timeout_s, decoded)

    def frames_json(self, method: str, params_json: bytes,
                    timeout_s: float | None = None) -> AsyncIterator[bytes]:
        """`frames()` with the params and each reply left as JSON (OutpostClient.frames_json)."""
        request_id = uuid.uuid4().hex
        return self._exchange(request_id, request_frame(request_id, method, params_json), timeout_s, sliced)

    async def _exchange(self, request_id: str, frame: bytes, timeout_s: float | None,
                        read: Callable[[bytes, str], tuple[bool, Any] | None]) -> AsyncIterator[Any]:
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise DaemonUnreachable(self.endpoint, 0)  # no socket file: nothing listens
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._waiting[request_id] = queue
        timeout = self.timeout_s if timeout_s is None else timeout_s
        done = False
        try:
            await self._sock.send(frame)
            while True:
                try:
                    raw = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise DaemonUnreachable(self.endpoint, timeout) from None
                try:
                    mine = read(raw, request_id)
                except OutpostError:
                    done = True  # an error frame ends the request too: nothing to cancel
                    raise
                if mine is None:
                    continue
                done, payload = mine
                yield payload
                if done:
                    return
        finally:
            del self._waiting[request_id]
            if not done and not self._sock.closed:
                # Given up on: the daemon stops the request, queued or generating.
                self._sock.send(request_json(uuid.uuid4().hex, "cancel", {"id": request_id}))

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> dict[str, Any]:
        """One request, its result (or its error, raised)."""
        stream = self.frames(method, params, timeout_s)
        async with contextlib.aclosing(stream):
            frames = [frame async for frame in stream]
            return frames[-1]

    # -- methods ---------------------------------------------------------------------
    async def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return await self.request("ping", timeout_s=timeout_s)

    async def status(self) -> dict[str, Any]:
        return await self.request("status")

    async def models(self) -> list[dict[str, Any]]:
        return (await self.request("models.list"))["models"]

    async def chat(self, messages: list[dict[str, Any]], *, model: str | None = None,
                   tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
                   **params: Any) -> dict[str, Any]:
        """A `chat.completion` (docs/protocol.md lists `params`)."""
        return await self.request("chat", chat_body(messages, model, tools, tool_choice, params))

    def chat_stream(self, messages: list[dict[str, Any]], *, model: str | None = None,
                    tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
                    **params: Any) -> AsyncIterator[dict[str, Any]]:
        """The answer as `chat.completion.chunk`s; the last has `usage` and `outpost`."""
        body = chat_body(messages, model, tools, tool_choice, params)
        return self.frames("chat", {**body, "stream": True})

    async def feedback(self, log_id: int, outcome: str, note: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"log_id": log_id, "outcome": outcome}
        if note is not None:
            params["note"] = note
        return await self.request("feedback", params)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    async def __aenter__(self) -> AsyncOutpostClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

