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
from collections.abc import Callable, Iterator
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
        request_id = uuid.uuid4().hex
        return self._exchange(request_id, request_json(request_id, method, params or {}), timeout_s, decoded)

    def frames_json(self, method: str, params_json: bytes,
                    timeout_s: float | None = None) -> Iterator[bytes]:
        """`frames()` for a caller that holds the params as a JSON object already and wants
        each chunk and the result as JSON (the SDK's transport, sdk.py): neither is decoded
        and encoded again on the way. An error frame is still raised as its typed exception."""
        request_id = uuid.uuid4().hex
        return self._exchange(request_id, request_frame(request_id, method, params_json), timeout_s, sliced)

    def _exchange(self, request_id: str, frame: bytes, timeout_s: float | None,
                  read: Callable[[bytes, str], tuple[bool, Any] | None]) -> Iterator[Any]:
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise DaemonUnreachable(self.endpoint, 0)  # no socket file: nothing listens
        self._sock.send(frame)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        done = False
        try:
            while True:
                if not self._sock.poll(int(timeout * 1000)):
                    raise DaemonUnreachable(self.endpoint, timeout)
                try:
                    mine = read(self._sock.recv(), request_id)
                except OutpostError:
                    done = True  # an error frame ends the request too: the socket is in step
                    raise
                if mine is None:
                    continue  # a late reply to a request given up on
                done, payload = mine
                yield payload
                if done:
                    return
        finally:
            if not done:
                # Given up on (a timeout, a stream left unread): the daemon stops the
                # request; and as a reply may be on its way already, a fresh socket keeps
                # that from being read as the reply to the next request.
                cancel = request_json(uuid.uuid4().hex, "cancel", {"id": request_id})
                try:
                    self._sock.send(cancel, flags=zmq.DONTWAIT)
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


def request_json(request_id: str, method: str, params: dict[str, Any]) -> bytes:
    """A request frame (docs/protocol.md)."""
    return json.dumps({"v": 1, "id": request_id, "method": method, "params": params}).encode("utf-8")


def request_frame(request_id: str, method: str, params_json: bytes) -> bytes:
    """A request frame around params that are a JSON object already (checked by the caller)."""
    return b'{"v": 1, "id": "%s", "method": "%s", "params": %s}' % (
        request_id.encode("ascii"), method.encode("ascii"), params_json)


def split_reply(raw: bytes, request_id: str) -> tuple[bool, bytes] | None:
    """(whether it ends the request, its chunk's or result's JSON) of a reply frame to
    `request_id`, cut out of the frame without decoding it; None for any other frame (an
    error, another request's, an envelope written some other way), for the caller to
    decode. The daemon writes the envelope with `id` before the body and the body last
    (runtime/daemon/protocol.py, reply_ok and reply_chunk)."""
    head = b'{"v": 1, "id": "' + request_id.encode("ascii") + b'", '
    if not (raw.startswith(head) and raw.endswith(b"}")):
        return None
    if raw.startswith(b'"result": ', len(head)):
        return True, raw[len(head) + 10:-1]
    if raw.startswith(b'"chunk": ', len(head)):
        return False, raw[len(head) + 9:-1]
    return None


def reply_id(raw: bytes) -> str | None:
    """The request id a reply frame answers, read off its head when the daemon wrote it
    (split_reply), decoded otherwise."""
    if raw.startswith(b'{"v": 1, "id": "'):
        end = raw.find(b'"', 16)
        if end > 16:
            return raw[16:end].decode("ascii", "replace")
    try:
        reply = json.loads(raw)
    except ValueError:
        return None
    return reply.get("id") if isinstance(reply, dict) else None


def decoded(raw: bytes, request_id: str) -> tuple[bool, dict[str, Any]] | None:
    """(whether it ends the request, its chunk or result) of a reply frame to `request_id`;
    None for another request's frame; an error frame is raised as its typed exception."""
    reply = json.loads(raw)
    if reply.get("id") not in (request_id, None):
        return None
    return read_reply(reply)


def sliced(raw: bytes, request_id: str) -> tuple[bool, bytes] | None:
    """`decoded()` with the chunk or result left as JSON: cut out of the frame when the
    daemon wrote it, decoded and encoded again only when it did not."""
    cut = split_reply(raw, request_id)
    if cut is not None:
        return cut
    decoded_ = decoded(raw, request_id)  # an error is raised here
    if decoded_ is None:
        return None
    done, payload = decoded_
    return done, json.dumps(payload, ensure_ascii=False).encode("utf-8")
