"""A Python client for agents: one DEALER socket, one request at a time (the asyncio
client, aclient.py, keeps many in flight).

    with OutpostClient("ipc:///run/user/1000/outpost/outpost.sock") as client:
        reply = client.chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
        call = reply["choices"][0]["message"]["tool_calls"][0]

Error replies are raised as the same typed exceptions the daemon raised
(`UnknownModel`, `ContextOverflow`, ...), rebuilt from their wire `code`.

What this module must not do: import the daemon; a client process stays small.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from .curve import ClientKeys, secure
from .errors import BadRequest, ConfigError, DaemonUnreachable, OutpostError, from_wire


class OutpostClient:
    def __init__(self, endpoint: str, timeout_s: float = 300.0, context: zmq.Context | None = None,
                 curve: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve  # required off loopback (runtime/curve.py)
        # A shared context (the SDK transport's) is never terminated here: a client left
        # to the garbage collector must not block in term() on another's sockets.
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            secure(sock, self.endpoint, self.curve)
        except ConfigError:
            sock.close(linger=0)
            raise
        sock.connect(self.endpoint)
        return sock

    def request(self, method: str, params: dict[str, Any] | None = None,
                timeout_s: float | None = None) -> dict[str, Any]:
        """One request, its result (or its error, raised)."""
        *_, last = self.frames(method, params, timeout_s)
        return last

    def frames(self, method: str, params: dict[str, Any] | None = None,
               timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """One request's replies: the `chunk`s of a stream, then its `result`. An error
        frame is raised; `timeout_s` bounds the wait for each frame."""
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise DaemonUnreachable(self.endpoint, 0)  # no socket file: nothing listens
        request_id = uuid.uuid4().hex
        payload = {"v": 1, "id": request_id, "method": method, "params": params or {}}
        self._sock.send(json.dumps(payload).encode("utf-8"))
        timeout = self.timeout_s if timeout_s is None else timeout_s
        done = False
        try:
            while True:
                if not self._sock.poll(int(timeout * 1000)):
                    raise DaemonUnreachable(self.endpoint, timeout)
                reply = json.loads(self._sock.recv())
                if reply.get("id") not in (request_id, None):
                    continue  # a late reply to a request given up on
                try:
                    done, payload = read_reply(reply)
                except OutpostError:
                    done = True  # an error frame ends the request too: the socket is in step
                    raise
                yield payload
                if done:
                    return
        finally:
            if not done:
                # Given up on (a timeout, a stream left unread): a request still queued
                # leaves the queue; and as the daemon may still answer, a fresh socket
                # keeps that from being read as the reply to the next request.
                cancel = {"v": 1, "id": uuid.uuid4().hex, "method": "cancel", "params": {"id": request_id}}
                try:
                    self._sock.send(json.dumps(cancel).encode("utf-8"), flags=zmq.DONTWAIT)
                except zmq.Again:
                    pass  # nobody to tell
                self._sock.close(linger=500)
                self._sock = self._connect()

    # -- methods ---------------------------------------------------------------------
    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request("ping", timeout_s=timeout_s)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def models(self) -> list[dict[str, Any]]:
        return self.request("models.list")["models"]

    def activate(self, model: str, version: str) -> dict[str, Any]:
        """Smoke-test a staged version in a worker, then serve it (or ActivationFailed)."""
        return self.request("models.activate", {"model": model, "version": version})

    def rollback(self, model: str) -> dict[str, Any]:
        """Serve the version active before this one again."""
        return self.request("models.rollback", {"model": model})

    def chat(self, messages: list[dict[str, Any]], *, model: str | None = None,
             tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
             **params: Any) -> dict[str, Any]:
        """A `chat.completion` (docs/protocol.md lists `params`)."""
        return self.request("chat", chat_body(messages, model, tools, tool_choice, params))

    def chat_stream(self, messages: list[dict[str, Any]], *, model: str | None = None,
                    tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
                    **params: Any) -> Iterator[dict[str, Any]]:
        """The answer as `chat.completion.chunk`s; the last has `usage` and `outpost`."""
        body = chat_body(messages, model, tools, tool_choice, params)
        return self.frames("chat", {**body, "stream": True})


    def feedback(self, log_id: int, outcome: str, note: str | None = None) -> dict[str, Any]:
        """Tell the daemon whether the answer logged as `log_id` worked ("good"/"bad")."""
        params: dict[str, Any] = {"log_id": log_id, "outcome": outcome}
        if note is not None:
            params["note"] = note
        return self.request("feedback", params)

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> OutpostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chat_body(messages: list[dict[str, Any]], model: str | None, tools: list[dict[str, Any]] | None,
              tool_choice: Any, params: dict[str, Any]) -> dict[str, Any]:
    """A `chat` request's params from the clients' keyword arguments."""
    body: dict[str, Any] = {"messages": messages, **params}
    if model:
        body["model"] = model
    if tools:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    return body


def read_reply(reply: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """One reply frame -> (whether it ends the request, its chunk or result); an error
    frame is raised as its typed exception."""
    if "chunk" in reply:
        return False, reply["chunk"]
    if "error" in reply:
        raise from_wire(reply["error"])
    if "result" not in reply:
        raise BadRequest("reply has neither result nor error", reply=reply)
    return True, reply["result"]
