"""The daemon: a ZeroMQ ROUTER that answers agents.

Each incoming message is handled in its own asyncio task, so requests for
different models proceed at once while the socket keeps reading. A request's path:
decode and check the frame (protocol.py) -> route to a manifest (explicit model,
else task, else the default) -> acquire its worker from the pool -> generate ->
write the log row (awaiting the commit) -> reply. Any failure becomes an error reply
with a stable code; nothing an agent sends can stop the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from outpost.manifests.catalog import Catalog, model_row
from outpost.manifests.errors import (BadRequest, ConfigError, InternalError, OutpostError,
                                      UnknownMethod, UnknownModel)
from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest
from outpost.models.schemas import check_tools

from . import VERSION, protocol
from .config import Settings
from .logstore import LogStore
from .pool import ModelPool

log = logging.getLogger("outpost.server")


class Daemon:
    def __init__(self, settings: Settings, catalog: Catalog, store: ModelStore) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.zmq = zmq.asyncio.Context()
        self.logs = LogStore(settings.log_path)
        self.pool = ModelPool(settings, catalog, store, self.zmq, self.logs)
        self.started = time.time()
        self.requests = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "ping": self.ping, "status": self.status, "models.list": self.models_list,
            "chat": self.chat, "feedback": self.feedback,
        }

    # -- lifecycle -------------------------------------------------------------------
    def bind(self) -> zmq.asyncio.Socket:
        endpoint = self.settings.endpoint
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[len("ipc://"):])
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if path.exists():
                if _answers(endpoint):
                    raise ConfigError(f"another daemon is already serving on {endpoint}",
                                      endpoint=endpoint)
                path.unlink()  # a socket file left by a daemon that died
        elif endpoint.startswith("tcp://"):
            host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
            if host not in ("127.0.0.1", "localhost", "[::1]"):
                raise ConfigError(f"refusing to bind {endpoint}: TCP is loopback-only until "
                                  "CURVE keys are configured", endpoint=endpoint)
        else:
            raise ConfigError(f"endpoint must be ipc://PATH or tcp://127.0.0.1:PORT, not {endpoint!r}",
                              endpoint=endpoint)
        sock = self.zmq.socket(zmq.ROUTER)
        sock.linger = 0
        # Hard cap far above the per-request limit: a peer sending more is cut off
        # before we buffer it; anything between gets a request_too_large reply.
        sock.setsockopt(zmq.MAXMSGSIZE, max(self.settings.server.max_request_bytes * 16, 1 << 24))
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(f"cannot bind {endpoint}: {exc.strerror}", endpoint=endpoint) from exc
        return sock

    async def serve(self, on_ready: Callable[[str], None] | None = None) -> None:
        try:
            sock = self.bind()
        except OutpostError:
            await self.pool.close()
            self.logs.close()
            self.zmq.term()
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await self.pool.start()
            for model_id in self.settings.preload or []:
                await self.pool.acquire(self.catalog.get(model_id), reason="preload")
            if on_ready:
                on_ready(self.settings.endpoint)
            stop = asyncio.ensure_future(self._stop.wait())
            while not self._stop.is_set():
                recv = asyncio.ensure_future(sock.recv_multipart())
                done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    break
                task = asyncio.create_task(self._handle(sock, recv.result()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self.pool.close()
            self.logs.close()
            sock.close(linger=0)
            self.zmq.term()

    def stop(self) -> None:
        self._stop.set()

    # -- one message -----------------------------------------------------------------
    async def _handle(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        # ROUTER gives [identity, (b"" from REQ sockets), payload...]; the envelope
        # before the payload is mirrored back unchanged.
        identity, rest = frames[0], frames[1:]
        envelope = [identity]
        if len(rest) >= 2 and rest[0] == b"":
            envelope.append(b"")
            rest = rest[1:]
        request_id = None
        try:
            if len(rest) != 1:
                raise BadRequest(f"expected one JSON frame, got {len(rest)}")
            raw, env = protocol.decode_frame(rest[0], self.settings.server.max_request_bytes)
            request_id = env.id
            handler = self._methods.get(env.method)
            if handler is None:
                raise UnknownMethod(env.method, sorted(self._methods))
            self.requests += 1
            reply = protocol.reply_ok(request_id, await handler(env.params))
        except OutpostError as exc:
            reply = protocol.reply_error(request_id, exc)
        except Exception as exc:  # a bug: report it and keep serving
            log.exception("unhandled error in request %s", request_id)
            reply = protocol.reply_error(request_id, InternalError(f"internal error: {exc!r}"))
        await sock.send_multipart([*envelope, reply])

    # -- methods ---------------------------------------------------------------------
    async def ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "version": VERSION, "pid": os.getpid()}

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        used, snapshot = self.pool.measure()  # one read: the budget and the rows agree
        return {"version": VERSION, "pid": os.getpid(), "endpoint": self.settings.endpoint,
                "data_dir": str(self.settings.data_dir),
                "uptime_s": round(time.time() - self.started, 1), "requests": self.requests,
                "default_model": self.catalog.default, "budget": self.pool.budget(used),
                "loaded": self.pool.describe(snapshot)}

    async def models_list(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"models": [{**model_row(m, self.store, self.catalog), "loaded": m.id in self.pool.workers}
                           for m in self.catalog]}

    def route(self, model: str | None, task: str | None) -> Manifest:
        if model:
            return self.catalog.get(model)
        if task:
            found = self.catalog.for_task(task)
            if found is None:
                raise UnknownModel(f"task:{task}", self.catalog.ids())
            return found
        return self.catalog.get_default()

    async def chat(self, params: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        chat = protocol.parse_chat(params)
        if chat.tools:
            check_tools(chat.tools)  # refused here, before any model is chosen or loaded
        manifest = self.route(chat.model, chat.task)
        sampling = manifest.sampling
        request = GenerationRequest(
            messages=[m.model_dump(exclude_none=True) for m in chat.messages],
            tools=chat.tools or None,
            tool_choice=chat.choice_name(),
            parallel_tool_calls=chat.parallel_tool_calls, constrained=chat.constrained,
            max_tokens=chat.max_completion_tokens or chat.max_tokens or sampling.max_tokens,
            temperature=sampling.temperature if chat.temperature is None else chat.temperature,
            top_p=sampling.top_p if chat.top_p is None else chat.top_p,
            top_k=sampling.top_k, seed=chat.seed)
        row: dict[str, Any] = {
            "method": "chat", "model_requested": chat.model or (f"task:{chat.task}" if chat.task else None),
            "model": manifest.id, "model_version": manifest.version,
            "messages": request.messages, "tools": request.tools, "tool_choice": request.tool_choice,
            "params": {k: v for k, v in chat.model_dump(exclude={"messages", "tools"}).items()
                       if v is not None}}
        timings = {"queue": 0.0, "load": 0.0, "prefill": 0.0, "decode": 0.0, "total": 0.0}
        try:
            async with self.pool.lease(manifest) as (worker, waited):
                timings.update(waited)
                gen = await worker.generate(asdict(request), self.settings.server.request_timeout_s)
        except OutpostError as exc:
            timings["total"] = (time.perf_counter() - t0) * 1e3
            row.update(error_code=exc.code, error_message=exc.message, timings=timings)
            exc.data["log_id"] = await self._log(row, [])
            raise
        timings.update(prefill=gen["prefill_ms"], decode=gen["decode_ms"])
        timings["total"] = (time.perf_counter() - t0) * 1e3
        timings = {k: round(v, 2) for k, v in timings.items()}
        logprobs = gen["logprobs"]
        row.update(content=gen["content"], tool_calls=gen["tool_calls"] or None,
                   finish_reason=gen["finish_reason"], timings=timings,
                   prompt_tokens=gen["prompt_tokens"], completion_tokens=gen["completion_tokens"])
        attempt = {
            "kind": "local", "model": manifest.id, "model_version": manifest.version,
            "output": gen["text"], "tool_calls": gen["tool_calls"] or None,
            "finish_reason": gen["finish_reason"], "constrained": int(gen["constrained"]),
            "grammar_dead_end": int(gen["grammar_dead_end"]), "validation": gen["validation"] or None,
            "prompt": gen["prompt"], "grammar": gen["grammar"], "repaired": gen["repaired"],
            "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else None,
            "min_logprob": min(logprobs) if logprobs else None,
            "prompt_tokens": gen["prompt_tokens"], "completion_tokens": gen["completion_tokens"],
            "prefill_ms": gen["prefill_ms"], "decode_ms": gen["decode_ms"]}
        log_id = await self._log(row, [attempt])
        message: dict[str, Any] = {"role": "assistant", "content": gen["content"]}
        if gen["tool_calls"]:
            message["tool_calls"] = gen["tool_calls"]
        return {
            "id": f"chatcmpl-{log_id if log_id is not None else 'unlogged'}",
            "object": "chat.completion", "created": int(time.time()), "model": manifest.id,
            "choices": [{"index": 0, "message": message, "finish_reason": gen["finish_reason"]}],
            "usage": {"prompt_tokens": gen["prompt_tokens"],
                      "completion_tokens": gen["completion_tokens"],
                      "total_tokens": gen["prompt_tokens"] + gen["completion_tokens"]},
            "outpost": {
                "model": manifest.id, "model_version": manifest.version, "timings_ms": timings,
                "log_id": log_id, "log_failed": log_id is None,
                "constrained": gen["constrained"], "validation": gen["validation"],
                "grammar_dead_end": gen["grammar_dead_end"], "repaired": gen["repaired"],
                "logprob": {"mean": attempt["mean_logprob"], "min": attempt["min_logprob"]},
            },
        }

    async def feedback(self, params: dict[str, Any]) -> dict[str, Any]:
        fb = protocol.parse_feedback(params)
        feedback_id = await self.logs.record_feedback(fb.log_id, fb.outcome, fb.note)
        return {"feedback_id": feedback_id, "log_id": fb.log_id, "outcome": fb.outcome}

    async def _log(self, row: dict[str, Any], attempts: list[dict[str, Any]]) -> int | None:
        """Commit the log row; a failing log never costs the agent its answer."""
        try:
            return await self.logs.record(row, attempts)
        except Exception:
            log.exception("could not write the log row")
            return None



def _answers(endpoint: str, timeout_ms: int = 500) -> bool:
    """Is a daemon listening there? (A leftover socket file from a crash does not answer.)"""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send(protocol.ping_frame())
        return bool(sock.poll(timeout_ms))
    finally:
        sock.close()
        ctx.term()
