"""An asyncio client for agents: many requests in flight over one DEALER socket.

    async with AsyncOutpostClient(endpoint) as client:
        replies = await asyncio.gather(*(client.chat(m, tools=TOOLS) for m in prompts))
        async for chunk in client.chat_stream(messages):
            ...

One reader task takes every frame off the socket and hands it to the request whose
`id` it carries. A request whose caller stops waiting (its task cancelled, a stream
closed early) sends the daemon a `cancel`: a request still queued for its model
leaves the queue; one already generating runs to its end and is logged, and its
reply is dropped here (docs/protocol.md, `cancel`).

What this module must not do: import the daemon; a client process stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from .client import chat_body, read_reply
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
        self._waiting: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        while True:
            reply = json.loads(await self._sock.recv())
            queue = self._waiting.get(reply.get("id"))
            if queue is not None:
                queue.put_nowait(reply)  # else: a reply to a request given up on

    async def frames(self, method: str, params: dict[str, Any] | None = None,
                     timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """One request's replies: the `chunk`s of a stream, then its `result`. An error
        frame is raised; `timeout_s` bounds the wait for each frame."""
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise DaemonUnreachable(self.endpoint, 0)  # no socket file: nothing listens
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiting[request_id] = queue
        timeout = self.timeout_s if timeout_s is None else timeout_s
        done = False
        try:
            await self._send(request_id, method, params or {})
            while True:
                try:
                    reply = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise DaemonUnreachable(self.endpoint, timeout) from None
                try:
                    done, payload = read_reply(reply)
                except OutpostError:
                    done = True  # an error frame ends the request too: nothing to cancel
                    raise
                yield payload
                if done:
                    return
        finally:
            del self._waiting[request_id]
            if not done and not self._sock.closed:
                # Given up on: let the daemon free the request's place in its queue.
                self._sock.send(self._frame(uuid.uuid4().hex, "cancel", {"id": request_id}))

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> dict[str, Any]:
        """One request, its result (or its error, raised)."""
        stream = self.frames(method, params, timeout_s)
        async with contextlib.aclosing(stream):
            frames = [frame async for frame in stream]
            return frames[-1]

    async def _send(self, request_id: str, method: str, params: dict[str, Any]) -> None:
        await self._sock.send(self._frame(request_id, method, params))

    @staticmethod
    def _frame(request_id: str, method: str, params: dict[str, Any]) -> bytes:
        return json.dumps({"v": 1, "id": request_id, "method": method, "params": params}).encode("utf-8")

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

