"""A Python client for agents: one DEALER socket, one request at a time.

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
from typing import Any

import zmq

from .errors import BadRequest, DaemonUnreachable, from_wire


class OutpostClient:
    def __init__(self, endpoint: str, timeout_s: float = 300.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def request(self, method: str, params: dict[str, Any] | None = None,
                timeout_s: float | None = None) -> dict[str, Any]:
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise DaemonUnreachable(self.endpoint, 0)  # no socket file: nothing listens
        request_id = uuid.uuid4().hex
        payload = {"v": 1, "id": request_id, "method": method, "params": params or {}}
        self._sock.send(json.dumps(payload).encode("utf-8"))
        timeout = self.timeout_s if timeout_s is None else timeout_s
        while True:
            if not self._sock.poll(int(timeout * 1000)):
                # The daemon may answer late; a fresh socket keeps that stale reply
                # from being read as the answer to the next request.
                self._sock.close()
                self._sock = self._connect()
                raise DaemonUnreachable(self.endpoint, timeout)
            reply = json.loads(self._sock.recv())
            if reply.get("id") in (request_id, None):
                break
        if "error" in reply:
            raise from_wire(reply["error"])
        if "result" not in reply:
            raise BadRequest("reply has neither result nor error", reply=reply)
        return reply["result"]

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
        body: dict[str, Any] = {"messages": messages, **params}
        if model:
            body["model"] = model
        if tools:
            body["tools"] = tools
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        return self.request("chat", body)

    def feedback(self, log_id: int, outcome: str, note: str | None = None) -> dict[str, Any]:
        """Tell the daemon whether the answer logged as `log_id` worked ("good"/"bad")."""
        params: dict[str, Any] = {"log_id": log_id, "outcome": outcome}
        if note is not None:
            params["note"] = note
        return self.request("feedback", params)

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> OutpostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
