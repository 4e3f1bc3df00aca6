"""The daemon: a ZeroMQ ROUTER that answers agents.

Each incoming message is handled in its own asyncio task, so requests for
different models proceed at once while the socket keeps reading. A chat request's
path, top to bottom in `Daemon.chat`: decode and check the frame (protocol.py) ->
route to a manifest (explicit model, else task, else the default) -> resolve its
escalation policy -> the escalation flow (escalation/flow.py), whose local attempt
leases a worker from the pool and generates -> the log rows, awaiting the commit
(replies.py shapes them) -> the reply. Any failure becomes an error reply with a
stable code; nothing an agent sends can stop the loop.

What this module must not do: decide who answers (escalation/), manage workers or
memory (pool.py), or write SQL (logs/).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import BadRequest, ConfigError, InternalError, OutpostError, UnknownModel
from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore
from outpost.models.backend import Generation
from outpost.models.schemas import check_tools
from outpost.runtime import VERSION, sync_state
from outpost.runtime.escalation.attempts import attempts, cloud_attempt
from outpost.runtime.escalation.cloud import CloudClient
from outpost.runtime.escalation.flow import Escalator, Outcome, Turn
from outpost.runtime.escalation.policy import resolve
from outpost.runtime.escalation.settings import Policy
from outpost.runtime.logs.records import AttemptRecord, RequestRecord
from outpost.runtime.logs import retention
from outpost.runtime.logs.store import LogStore

from . import adapters, endpoint, protocol, replies, streaming
from .background import Background
from .calls import InFlight, handling
from .clients import ClientGate
from .guard import Guard
from .metrics import Metrics, MetricsRecorder
from .errors import Cancelled, UnknownMethod
from .pool import ModelPool
from .settings import DaemonSettings
from .versions import Versions

log = logging.getLogger("outpost.server")
Emit = Callable[[dict[str, Any]], Awaitable[None]]  # sends one streamed chunk to the agent


class Daemon:
    def __init__(self, settings: DaemonSettings, catalog: Catalog, store: ModelStore,
                 cloud_transport: Any = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.zmq = zmq.asyncio.Context()
        self.logs = LogStore(settings.log_path, settings.logs.busy_timeout_s)
        self.metrics = Metrics()
        self.metrics.watch(self._state)
        self.pool = ModelPool(settings, catalog, store, self.zmq, MetricsRecorder(self.logs, self.metrics))
        # `cloud_transport`: an httpx transport for tests that script the cloud's faults.
        self.cloud = CloudClient(settings.cloud, transport=cloud_transport)
        self.cloud.seed(*self.logs.cloud_spent_today())
        self.escalator = Escalator(self.cloud, settings.confidence)
        if not self.cloud.configured and (settings.escalation.policy is not Policy.OFF or any(
                t.policy not in (None, Policy.OFF) for t in settings.escalation.tasks.values())):
            log.warning("an escalation policy is set but [cloud] base_url is not: every "
                        "escalation will answer locally, marked degraded (not_configured)")
        self.versions = Versions(store, catalog, self.pool, self.logs)
        self.started = time.time()
        self.requests = 0
        self.background = Background(log)  # request handlers, retention, shadow calls
        self._stop = asyncio.Event()
        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "ping": self.ping, "status": self.status, "models.list": self.versions.list,
            "models.activate": self.versions.activate, "models.rollback": self.versions.rollback,
            "chat": self.chat, "feedback": self.feedback,
        }
        self._streaming = {"chat"}  # methods that may send chunks before their result
        self._inflight: dict[tuple[bytes, str], InFlight] = {}  # (peer, request id) -> request
        self.clients = ClientGate(settings.clients)
        self.guard: Guard | None = None  # CURVE's, on a TCP endpoint off loopback

    # -- lifecycle -------------------------------------------------------------------
    async def serve(self, on_ready: Callable[[str], None] | None = None) -> None:
        try:
            sock, self.guard = endpoint.bind(self.zmq, self.settings)
        except OutpostError:
            await self.pool.close()
            self.logs.close()
            self.zmq.term()
            raise
        exporter: asyncio.Server | None = None
        door: tuple[Any, asyncio.Task[None]] | None = None  # the HTTP door: server, task
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await self.pool.start()
            if self.settings.metrics.port is not None:
                exporter = await self._exporter(self.settings.metrics.port)
            if self.settings.http.listen is not None:
                door = await _http_door(self)
            for model_id in self.settings.preload or []:
                await self.pool.acquire(adapters.resolve(self.catalog, self.catalog.get(model_id))[0],
                                        reason="preload")
            if on_ready:
                on_ready(self.settings.endpoint)
            self.background.spawn(retention.keep(self.logs, self.settings.logs), "log retention")
            stop = asyncio.ensure_future(self._stop.wait())
            while not self._stop.is_set():
                recv = asyncio.ensure_future(sock.recv_multipart())
                done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    break
                self.background.spawn(self._handle(sock, recv.result()), "a request's handler")
        finally:
            if door is not None:
                door[0].should_exit = True
                await asyncio.gather(door[1], return_exceptions=True)
            if exporter is not None:
                exporter.close()
            self.background.cancel()
            await self.pool.close()
            await self.cloud.close()
            self.logs.close()
            if self.guard is not None:
                self.guard.close(sock)
            sock.close(linger=0)
            self.zmq.term()

    def stop(self) -> None:
        self._stop.set()

    async def _exporter(self, port: int) -> asyncio.Server:
        try:
            return await self.metrics.serve(port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror}", port=port) from exc

    def _state(self) -> dict[str, Any]:
        """What a metrics scrape reads: status's budget, workers, clients and sync."""
        used, snapshot = self.pool.measure()
        return {"budget": self.pool.budget(used), "loaded": self.pool.describe(snapshot),
                "clients": dict(self.clients.in_flight), "sync": self._sync_status(),
                "security": self._security()}

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
            if env.method == "cancel":  # not counted, and only the sender's own requests
                await sock.send_multipart([*envelope, protocol.reply_ok(request_id, self.cancel(identity, env.params))])
                return
            emit = _emitter(sock, envelope, env.id) if env.method in self._streaming else None
            reply = protocol.reply_ok(request_id, await self.serve_call(env.method, env.params, emit,
                                                                        key=(identity, env.id)))
        except OutpostError as exc:
            reply = protocol.reply_error(request_id, exc)
        except Exception as exc:  # a bug: report it and keep serving
            reply = protocol.reply_error(request_id, self.internal(exc))
        # (A request its agent cancelled while queued ends in CancelledError: no reply.)
        await sock.send_multipart([*envelope, reply])

    async def serve_call(self, method: str, params: dict[str, Any], emit: Emit | None = None,
                         key: tuple[bytes, str] | None = None, entry: InFlight | None = None) -> dict[str, Any]:
        """Run one method for any door (the socket, HTTP): counted, cancellable by `key`."""
        handler = self._methods.get(method)
        if handler is None:
            raise UnknownMethod(method, sorted([*self._methods, "cancel"]))
        self.requests += 1
        self.metrics.in_flight.inc()
        entry = entry or InFlight()
        entry.task = asyncio.current_task()
        token = handling.set(entry)
        if key is not None:
            self._inflight[key] = entry
        try:
            if method in self._streaming:
                return await handler(params, emit=emit)
            return await handler(params)
        finally:
            self.metrics.in_flight.dec()
            handling.reset(token)
            if key is not None:
                self._inflight.pop(key, None)

    def start_call(self, method: str, params: dict[str, Any], emit: Emit | None = None) -> InFlight:
        """`serve_call` in a task of its own (an HTTP stream reads its chunks meanwhile)."""
        entry = InFlight()
        # Not a Background task: its outcome, errors included, is the caller's to read.
        entry.task = asyncio.create_task(self.serve_call(method, params, emit, entry=entry))
        return entry

    def internal(self, exc: BaseException) -> InternalError:
        """A bug, reported (with its traceback in the daemon's log) and survived."""
        log.error("unhandled error in a request", exc_info=exc)
        return InternalError(f"internal error: {exc!r}")

    # -- methods ---------------------------------------------------------------------
    def cancel(self, peer: bytes, params: dict[str, Any]) -> dict[str, Any]:
        """An agent gives up on one of its requests, which gets no reply. One still
        waiting for its model leaves the queue (its place is free at once); one
        generating is stopped in its worker at the next forward pass (its slot is free
        then) and logged as `cancelled`."""
        request_id = protocol.text_param(params, "id")
        entry = self._inflight.get((peer, request_id))
        state = entry.abandon() if entry is not None else None
        if state is None:
            return {"id": request_id, "cancelled": False, "state": "unknown"}
        return {"id": request_id, "cancelled": True, "state": state}

    async def ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "version": VERSION, "pid": os.getpid()}

    async def status(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.pool.ready()  # Outpost's base memory includes the forkserver
        used, snapshot = self.pool.measure()  # one read: the budget and the rows agree
        return {"version": VERSION, "pid": os.getpid(), "endpoint": self.settings.endpoint,
                "data_dir": str(self.settings.data_dir),
                "uptime_s": round(time.time() - self.started, 1), "requests": self.requests,
                "default_model": self.catalog.default, "budget": self.pool.budget(used),
                "loaded": self.pool.describe(snapshot), "escalation": self._escalation_status(),
                "sync": self._sync_status(), "security": self._security(),
                "clients": {name: n for name, n in self.clients.in_flight.items() if n}}

    def _security(self) -> dict[str, Any]:
        """Who may connect: CURVE's allow-list and its refusals, or keyless (ipc, loopback)."""
        return self.guard.view() if self.guard is not None else {"curve": False}

    def _sync_status(self) -> dict[str, Any] | None:
        """The last field sync's outcome, as `outpost sync` (or the schedule) recorded it
        (a JSON file; the daemon never imports the sync layer). None on a device that
        has never synced."""
        return sync_state.read(self.settings.data_dir / "sync") or None

    def _escalation_status(self) -> dict[str, Any]:
        cloud = self.cloud
        cap = cloud.cap
        cap.check()  # rolls the day over
        return {"policy": self.settings.escalation.policy, "threshold": self.settings.escalation.threshold,
                "cloud": None if not cloud.configured else {
                    "model": self.settings.cloud.model, "breaker": cloud.breaker.state,
                    "requests_today": cap.requests, "tokens_today": cap.tokens,
                    "daily_max_requests": cap.max_requests, "daily_max_tokens": cap.max_tokens}}

    def route(self, model: str | None, task: str | None) -> Manifest:
        if model:
            return self.catalog.get(model)
        if task:
            found = self.catalog.for_task(task)
            if found is None:
                raise UnknownModel(f"task:{task}", self.catalog.ids())
            return found
        return self.catalog.get_default()

    async def chat(self, params: dict[str, Any], emit: Emit | None = None) -> dict[str, Any]:
        try:
            chat = protocol.parse_chat(params)
            with self.clients.hold(chat.client):  # [clients.<name>] max_in_flight
                return await self._chat(chat, emit)
        except OutpostError as exc:
            # Labelled by a model of the catalog only: any string an agent sends would
            # otherwise become a series of its own.
            model = exc.data.get("model") or params.get("model")
            known = model if isinstance(model, str) and model in self.catalog.ids() else ""
            self.metrics.failed(known, self._task_label(params.get("task")) if known else "", exc.code)
            raise

    def _task_label(self, task: Any) -> str:
        """A task as a metrics label: one a model or the escalation settings know, else
        `other` (an agent's free text must not grow the series without bound)."""
        if not isinstance(task, str) or not task:
            return ""
        known = task in self.settings.escalation.tasks or self.catalog.for_task(task) is not None
        return task if known else "other"

    async def _chat(self, chat: protocol.ChatParams, emit: Emit | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if chat.stream and emit is None:
            raise BadRequest("`stream` needs a connection that can carry several frames", field="stream")
        if chat.tools:
            check_tools(chat.tools)  # refused here, before any model is chosen or loaded
        manifest = self.route(chat.model, chat.task)
        task = chat.task or (manifest.tasks[0] if manifest.tasks else None)
        policy, threshold = resolve(self.settings, manifest, task, chat.escalation)
        request = chat.generation(manifest.sampling)
        turn = Turn(model=manifest.id, policy=policy, threshold=threshold, messages=request.messages,
                    tools=request.tools, tool_choice=request.tool_choice,
                    cloud_tool_choice=chat.wire_tool_choice(),
                    parallel_tool_calls=chat.parallel_tool_calls, max_tokens=request.max_tokens)
        waited: dict[str, float] = {}
        stream = streaming.LiveStream(emit, manifest.id, request, policy) if chat.stream and emit else None

        served = [manifest]

        async def local() -> Generation:
            async with self.pool.lease(manifest, batch=chat.priority == "batch") as lease:
                if (current := handling.get()) is not None:
                    current.generating = True  # from here on, `cancel` stops it in the worker
                waited.update(lease.timings)
                # A version activated while this request waited serves it: the log and the
                # reply name the version (of the model, or of its task adapter) that answered.
                served[0] = lease.served
                return await lease.generate(request, self.settings.server.request_timeout_s,
                                            stream.on_text if stream and stream.live else None)

        if policy is Policy.CLOUD_ONLY and (current := handling.get()) is not None:
            current.generating = True  # the cloud is asked at once: a cancel stops that call
        try:
            outcome = await self.escalator.run(turn, local)
        except asyncio.CancelledError:
            if (current := handling.get()) is not None and current.abandoned and current.generating:
                # Its agent stopped it mid-answer: no reply, but the work it cost is logged.
                stopped = Outcome(policy, local_error=Cancelled(served[0].id, time.perf_counter() - t0))
                await self._log(replies.request_record(chat, request, served[0], task, stopped,
                                                       replies.timings(waited, stopped, t0)), [])
                self.metrics.failed(served[0].id, self._task_label(task), Cancelled.code)
            raise
        manifest = served[0]
        if stream is not None and stream.first_at is not None and outcome.cloud is not None:
            # The local attempt failed after its deltas went out (shadow falls back to the
            # cloud then): an answer cannot be taken back, so the agent gets the local error.
            log.warning("a streamed local answer failed mid-stream; the cloud's is not sent")
            outcome = dataclasses.replace(outcome, cloud=None, cloud_error=None)
        if stream is not None and outcome.answered:
            await stream.finish(outcome)  # the calls take the ids the agent was sent
        timings_ms = replies.timings(waited, outcome, t0)
        self.metrics.chat(manifest.id, self._task_label(task), outcome, timings_ms)
        if stream is not None and stream.first_at is not None:
            self.metrics.ttft.labels(manifest.id).observe(stream.first_at - t0)
        log_id = await self._log(
            replies.request_record(chat, request, manifest, task, outcome, timings_ms),
            attempts(outcome, manifest.id, manifest.version, self.settings.cloud.model, turn.auto))
        if not outcome.answered:
            error = outcome.local_error
            assert error is not None, "an unanswered outcome carries the local error"
            error.data.update(log_id=log_id, log_failed=log_id is None)
            raise error
        if outcome.shadow and log_id is not None:
            self.background.spawn(self._shadow(log_id, turn), f"the shadow cloud call of request {log_id}")
        reply = replies.chat_reply(outcome, manifest, log_id, timings_ms)
        return streaming.final_chunk(reply, stream.id) if stream is not None else reply

    async def _shadow(self, request_id: int, turn: Turn) -> None:
        """Shadow mode: the agent has its local answer; the cloud's goes to the log."""
        answer, error = await self.escalator.ask(turn)
        await self.logs.record_attempt(request_id, cloud_attempt(answer, error, self.settings.cloud.model,
                                                                 turn.auto))

    async def feedback(self, params: dict[str, Any]) -> dict[str, Any]:
        fb = protocol.parse_feedback(params)
        feedback_id = await self.logs.record_feedback(fb.log_id, fb.outcome, fb.note)
        return {"feedback_id": feedback_id, "log_id": fb.log_id, "outcome": fb.outcome}

    async def _log(self, request: RequestRecord, tries: list[AttemptRecord]) -> int | None:
        """Commit the log row; a failing log never costs the agent its answer."""
        t0 = time.perf_counter()
        try:
            return await self.logs.record(request, tries)
        except Exception:
            self.metrics.log_failures.inc()
            log.exception("could not write the log row")
            return None
        finally:
            self.metrics.log_seconds.observe(time.perf_counter() - t0)


def _emitter(sock: zmq.asyncio.Socket, envelope: list[bytes], request_id: str) -> Emit:
    """Sends a streamed request's chunks to its agent as they come."""
    async def emit(chunk: dict[str, Any]) -> None:
        await sock.send_multipart([*envelope, protocol.reply_chunk(request_id, chunk)])
    return emit


async def _http_door(daemon: Daemon) -> tuple[Any, asyncio.Task[None]]:
    """Start the HTTP door; Starlette and uvicorn are imported only when it is asked for."""
    try:
        from . import http  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"[http] listen needs the `http` extra: pip install 'outpost[http]' ({exc})") from exc
    return await http.start(daemon, daemon.settings.http)
