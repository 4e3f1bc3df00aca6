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
from pydantic import BaseModel

from outpost.manifests.catalog import Catalog, model_row
from outpost.manifests.errors import (BadRequest, CloudError, ConfigError, InternalError,
                                      OutpostError, UnknownMethod, UnknownModel)
from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest
from outpost.models.schemas import check_tools

from . import VERSION, confidence, escalate, protocol
from .cloud import CloudAnswer, CloudClient
from .config import Settings
from .logstore import LogStore
from .pool import ModelPool

log = logging.getLogger("outpost.server")


class Daemon:
    def __init__(self, settings: Settings, catalog: Catalog, store: ModelStore,
                 cloud_transport: Any = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.zmq = zmq.asyncio.Context()
        self.logs = LogStore(settings.log_path, settings.logs.busy_timeout_s)
        self.pool = ModelPool(settings, catalog, store, self.zmq, self.logs)
        # `cloud_transport`: an httpx transport for tests that script the cloud's faults.
        self.cloud = CloudClient(settings.cloud, transport=cloud_transport)
        self.cloud.seed(*self.logs.cloud_spent_today())
        if not self.cloud.configured and (settings.escalation.policy != "off" or any(
                t.policy not in (None, "off") for t in settings.escalation.tasks.values())):
            log.warning("an escalation policy is set but [cloud] base_url is not: every "
                        "escalation will answer locally, marked degraded (not_configured)")
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
            retention = asyncio.create_task(self._retention())
            self._tasks.add(retention)
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
            await self.cloud.close()
            self.logs.close()
            sock.close(linger=0)
            self.zmq.term()

    def stop(self) -> None:
        self._stop.set()

    async def _retention(self) -> None:
        """Apply the log's retention caps now and every `prune_interval_s`."""
        cfg = self.settings.logs
        if cfg.max_age_days is None and cfg.max_size is None:
            return
        warned = False
        while True:
            try:
                result = await self.logs.prune(cfg.max_age_days * 86400 if cfg.max_age_days else None,
                                               int(cfg.max_size) if cfg.max_size else None)
            except Exception:
                log.exception("pruning the log failed; will try again")
            else:
                if result["deleted_by_age"] or result["deleted_by_size"]:
                    log.info("log retention: deleted %d requests by age, %d by size",
                             result["deleted_by_age"], result["deleted_by_size"])
                over = cfg.max_size is not None and result["bytes"] > int(cfg.max_size)
                if result["held"] and over and not warned:
                    log.warning("the log is over its size cap, but %d requests have not been "
                                "exported or synced yet and are kept: run `outpost logs export`",
                                result["held"])
                    warned = True
            await asyncio.sleep(cfg.prune_interval_s)

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
        await self.pool.ready()  # Outpost's base memory includes the forkserver
        used, snapshot = self.pool.measure()  # one read: the budget and the rows agree
        return {"version": VERSION, "pid": os.getpid(), "endpoint": self.settings.endpoint,
                "data_dir": str(self.settings.data_dir),
                "uptime_s": round(time.time() - self.started, 1), "requests": self.requests,
                "default_model": self.catalog.default, "budget": self.pool.budget(used),
                "loaded": self.pool.describe(snapshot), "escalation": self._escalation_status()}

    def _escalation_status(self) -> dict[str, Any]:
        cloud = self.cloud
        cap = cloud.cap
        cap.check()  # rolls the day over
        return {"policy": self.settings.escalation.policy, "threshold": self.settings.escalation.threshold,
                "cloud": None if not cloud.configured else {
                    "model": self.settings.cloud.model, "breaker": cloud.breaker.state,
                    "requests_today": cap.requests, "tokens_today": cap.tokens,
                    "daily_max_requests": cap.max_requests, "daily_max_tokens": cap.max_tokens}}

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
        task = chat.task or (manifest.tasks[0] if manifest.tasks else None)
        policy, threshold = escalate.resolve(self.settings, manifest, task, chat.escalation)
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
            # The task asked for, else the model's first: what stats and export group by.
            "task": task, "policy": policy,
            "messages": request.messages, "tools": request.tools, "tool_choice": request.tool_choice,
            "params": {k: v for k, v in chat.model_dump(exclude={"messages", "tools"}).items()
                       if v is not None}}
        timings = {"queue": 0.0, "load": 0.0, "prefill": 0.0, "decode": 0.0, "total": 0.0}
        ask = lambda: self._ask_cloud(chat, request)  # noqa: E731

        # cloud_only: the cloud first; the local model only if it fails.
        cloud: tuple[CloudAnswer | None, CloudError | None] | None = None
        if policy == "cloud_only":
            cloud = await ask()
            if cloud[0] is not None:
                return await self._cloud_reply(row, [], cloud[0], timings, t0, None, None)

        try:
            async with self.pool.lease(manifest) as (worker, waited):
                timings.update(waited)
                gen = await worker.generate(asdict(request), self.settings.server.request_timeout_s)
        except OutpostError as exc:
            timings["total"] = (time.perf_counter() - t0) * 1e3
            row.update(error_code=exc.code, error_message=exc.message, timings=timings)
            if cloud is None and policy in ("on_low_confidence", "shadow") and self.cloud.configured:
                # The local model could not answer at all: the cloud may.
                cloud = await ask()
            attempts = []
            if cloud is not None:  # both tries are logged, the failed local one too
                attempts = [{"kind": "local", "model": manifest.id, "model_version": manifest.version,
                             "error_code": exc.code, "error_message": exc.message}]
                if cloud[0] is not None:
                    return await self._cloud_reply(row, attempts, cloud[0], timings, t0, None, None)
                attempts.append(escalate.cloud_attempt(None, cloud[1], self.settings.cloud.model))
            exc.data["log_id"] = await self._log(row, attempts)
            exc.data["log_failed"] = exc.data["log_id"] is None
            raise
        timings.update(prefill=gen["prefill_ms"], decode=gen["decode_ms"])
        conf, parts = confidence.score(gen, request.tool_choice, self.settings.confidence)
        attempt = self._local_attempt(manifest, gen, conf, parts)

        shadow = False
        if policy == "on_low_confidence" and conf < threshold:
            cloud = await ask()
            if cloud[0] is not None:
                return await self._cloud_reply(row, [attempt], cloud[0], timings, t0, conf, parts)
        elif policy == "shadow":
            shadow = True
        degraded = cloud[1].reason if cloud is not None and cloud[1] is not None else None
        if degraded is not None and policy != "cloud_only":
            log.info("escalation of a %s answer (confidence %.2f) failed: %s", manifest.id, conf,
                     cloud[1].message)
        timings["total"] = (time.perf_counter() - t0) * 1e3
        timings = {k: round(v, 2) for k, v in timings.items()}
        row.update(content=gen["content"], tool_calls=gen["tool_calls"] or None,
                   finish_reason=gen["finish_reason"], timings=timings,
                   prompt_tokens=gen["prompt_tokens"], completion_tokens=gen["completion_tokens"],
                   answered_by=manifest.id, confidence=conf, degraded=degraded)
        attempts = [attempt]
        if cloud is not None:
            attempts.append(escalate.cloud_attempt(cloud[0], cloud[1], self.settings.cloud.model))
        log_id = await self._log(row, attempts)
        if shadow and log_id is not None:
            self._spawn(self._shadow(log_id, ask))
        message: dict[str, Any] = {"role": "assistant", "content": gen["content"]}
        if gen["tool_calls"]:
            message["tool_calls"] = gen["tool_calls"]
        return self._reply(log_id, manifest.id, message, gen["finish_reason"], gen["prompt_tokens"],
                           gen["completion_tokens"], {
            "model": manifest.id, "model_version": manifest.version, "timings_ms": timings,
            "answered_by": manifest.id, "confidence": conf, "confidence_parts": parts,
            "policy": policy, "escalated": cloud is not None, "shadow": shadow,
            "degraded": degraded is not None, "degraded_reason": degraded,
            "constrained": gen["constrained"], "validation": gen["validation"],
            "grammar_dead_end": gen["grammar_dead_end"], "repaired": gen["repaired"],
            "logprob": {"mean": attempt["mean_logprob"], "min": attempt["min_logprob"]},
        })

    @staticmethod
    def _local_attempt(manifest: Manifest, gen: dict[str, Any], conf: float,
                       parts: dict[str, Any]) -> dict[str, Any]:
        logprobs = gen["logprobs"]
        return {
            "kind": "local", "model": manifest.id, "model_version": manifest.version,
            "output": gen["text"], "tool_calls": gen["tool_calls"] or None,
            "finish_reason": gen["finish_reason"], "constrained": int(gen["constrained"]),
            "grammar_dead_end": int(gen["grammar_dead_end"]), "validation": gen["validation"] or None,
            "prompt": gen["prompt"], "grammar": gen["grammar"], "repaired": gen["repaired"],
            "mean_logprob": sum(logprobs) / len(logprobs) if logprobs else None,
            "min_logprob": min(logprobs) if logprobs else None,
            "confidence": conf, "confidence_parts": parts,
            "prompt_tokens": gen["prompt_tokens"], "completion_tokens": gen["completion_tokens"],
            "prefill_ms": gen["prefill_ms"], "decode_ms": gen["decode_ms"]}

    async def _ask_cloud(self, chat: protocol.ChatParams, request: GenerationRequest
                         ) -> tuple[CloudAnswer | None, CloudError | None]:
        """(answer, None) or (None, why not): a cloud failure is never the agent's error."""
        tool_choice = (chat.tool_choice.model_dump() if isinstance(chat.tool_choice, BaseModel)
                       else chat.tool_choice)
        try:
            answer = await self.cloud.ask(request.messages, chat.tools or None, tool_choice,
                                          chat.parallel_tool_calls if chat.tools else None,
                                          request.max_tokens)
        except CloudError as exc:
            return None, exc
        return answer, None

    async def _cloud_reply(self, row: dict[str, Any], attempts: list[dict[str, Any]],
                           answer: CloudAnswer, timings: dict[str, float], t0: float,
                           conf: float | None, parts: dict[str, Any] | None) -> dict[str, Any]:
        timings["cloud"] = answer.latency_ms
        timings["total"] = (time.perf_counter() - t0) * 1e3
        timings = {k: round(v, 2) for k, v in timings.items()}
        row.update(content=answer.content, tool_calls=answer.tool_calls or None,
                   finish_reason=answer.finish_reason, timings=timings,
                   prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                   answered_by=answer.model, confidence=conf, error_code=None, error_message=None)
        log_id = await self._log(row, [*attempts, escalate.cloud_attempt(answer, None, answer.model)])
        message: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        local = attempts[0] if attempts and not attempts[0].get("error_code") else None
        return self._reply(log_id, answer.model, message, answer.finish_reason, answer.prompt_tokens,
                           answer.completion_tokens, {
            "model": row["model"], "model_version": row["model_version"], "timings_ms": timings,
            "answered_by": answer.model, "confidence": conf, "confidence_parts": parts,
            "policy": row["policy"], "escalated": True, "shadow": False,
            "degraded": False, "degraded_reason": None, "validation": answer.validation,
            "local": None if local is None else {"tool_calls": local["tool_calls"],
                                                  "content": None if local["tool_calls"] else local["output"],
                                                  "validation": local["validation"]},
            "cloud": {"model": answer.model, "attempts": answer.attempts,
                      "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "cost_usd": round(answer.cost_usd, 8), "latency_ms": round(answer.latency_ms, 2)},
        })

    async def _shadow(self, request_id: int, ask: Callable[[], Awaitable[Any]]) -> None:
        """Shadow mode: the agent has its local answer; the cloud's goes to the log."""
        answer, error = await ask()
        try:
            await self.logs.record_attempt(
                request_id, escalate.cloud_attempt(answer, error, self.settings.cloud.model))
        except Exception:
            log.exception("could not log the shadow cloud answer of request %s", request_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, log_id: int | None, model: str, message: dict[str, Any], finish_reason: Any,
               prompt_tokens: int, completion_tokens: int, outpost: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{log_id if log_id is not None else 'unlogged'}",
            "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "outpost": {**outpost, "log_id": log_id, "log_failed": log_id is None},
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
