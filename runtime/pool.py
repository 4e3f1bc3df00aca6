"""The pool of loaded models: one worker process per model, loaded on demand.

`acquire(manifest)` returns a ready worker, starting one if needed; concurrent
requests for a model that is still loading wait for that one load instead of
starting a second. Requests to one worker are serialised by its lock (a worker
generates one answer at a time); requests to different workers run side by side.

What this module must not do: route requests (server.py) or touch the log.
Memory budgeting and eviction build on `Worker.pid` and `ModelPool.workers`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import ModelLoadFailed, OutpostError, WorkerCrashed, from_wire
from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore

from .config import Settings
from . import worker as worker_module

log = logging.getLogger("outpost.pool")
POLL_MS = 100  # how often a waiting request checks that its worker is still alive


@dataclass
class Worker:
    manifest: Manifest
    process: multiprocessing.process.BaseProcess
    socket: zmq.asyncio.Socket
    endpoint: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: str = "loading"  # loading | ready | busy | dead
    pid: int | None = None
    load_ms: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    served: int = 0
    last_used: float = field(default_factory=time.monotonic)
    _ids: itertools.count = field(default_factory=itertools.count)

    async def _recv(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            if await self.socket.poll(POLL_MS):
                return await self.socket.recv_json()
            if not self.process.is_alive():
                self.state = "dead"
                raise WorkerCrashed(self.manifest.id, self.process.exitcode)
            if time.monotonic() > deadline:
                self.state = "dead"
                self.process.kill()
                raise WorkerCrashed(self.manifest.id, None)

    async def wait_ready(self, timeout_s: float) -> None:
        msg = await self._recv(timeout_s)
        if msg.get("type") == "failed":
            self.state = "dead"
            raise from_wire(msg["error"])
        self.pid, self.load_ms, self.info = msg["pid"], msg["load_ms"], msg["info"]
        self.state = "ready"

    async def generate(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one generation; the caller holds `lock`."""
        self.state = "busy"
        msg_id = next(self._ids)
        try:
            await self.socket.send_json({"type": "generate", "id": msg_id, "request": request})
            reply = await self._recv(timeout_s)
        finally:
            if self.state == "busy":
                self.state = "ready"
            self.last_used = time.monotonic()
        if reply.get("type") == "error":
            raise from_wire(reply["error"])
        self.served += 1
        if "grammar_cache" in reply:
            self.info["grammar_cache"] = reply["grammar_cache"]
        return reply["generation"]

    def memory(self) -> dict[str, int]:
        if self.pid is None:
            return {}
        try:
            mem = psutil.Process(self.pid).memory_full_info()
            return {"rss_bytes": mem.rss, "uss_bytes": mem.uss}
        except (psutil.Error, OSError):
            return {}

    def describe(self) -> dict[str, Any]:
        return {"model": self.manifest.id, "version": self.manifest.version, "state": self.state,
                "pid": self.pid, "load_ms": round(self.load_ms, 1), "served": self.served,
                "idle_s": round(time.monotonic() - self.last_used, 1), **self.memory(),
                **{k: v for k, v in self.info.items() if k in ("n_ctx", "n_gpu_layers", "grammar_cache")}}

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.process.is_alive():
            try:
                await self.socket.send_json({"type": "shutdown"})
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + grace_s
            while self.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.process.is_alive():
                self.process.kill()
        self.process.join(timeout=1)
        self.socket.close(linger=0)
        self.state = "dead"


class ModelPool:
    def __init__(self, settings: Settings, catalog: Catalog, store: ModelStore,
                 zmq_ctx: zmq.asyncio.Context) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self._zmq = zmq_ctx
        self.workers: dict[str, Worker] = {}
        self._loading: dict[str, asyncio.Future[Worker]] = {}
        self._sockdir = Path(tempfile.mkdtemp(prefix="outpost-w-"))
        self._seq = itertools.count()
        # Workers fork from a server that has llama_cpp and xgrammar imported already.
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload([worker_module.__name__])

    async def acquire(self, manifest: Manifest) -> Worker:
        current = self.workers.get(manifest.id)
        if current is not None and current.state != "dead" and current.process.is_alive():
            return current
        if current is not None:
            await self._forget(current)
        pending = self._loading.get(manifest.id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._loading[manifest.id] = future
        try:
            worker = await self._start(manifest)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters get it, nobody else must
            raise
        else:
            future.set_result(worker)
            self.workers[manifest.id] = worker
            return worker
        finally:
            del self._loading[manifest.id]

    async def _start(self, manifest: Manifest) -> Worker:
        weights = self.store.weights_path(manifest)  # raises ModelNotPulled
        text = self.catalog.entry(manifest.id).text
        endpoint = f"ipc://{self._sockdir / f'w{next(self._seq)}.sock'}"
        sock = self._zmq.socket(zmq.DEALER)
        sock.linger = 0
        sock.bind(endpoint)
        llama = self.settings.llama
        options = {"n_threads": llama.n_threads, "n_batch": llama.n_batch,
                   "n_gpu_layers": llama.n_gpu_layers}
        process = self._mp.Process(
            target=worker_module.serve_model, name=f"outpost-worker-{manifest.id}",
            args=(endpoint, text, str(weights), os.getpid(), options), daemon=True)
        t0 = time.perf_counter()
        process.start()
        worker = Worker(manifest=manifest, process=process, socket=sock, endpoint=endpoint)
        try:
            await worker.wait_ready(self.settings.server.load_timeout_s)
        except WorkerCrashed as exc:
            await worker.stop(grace_s=0)
            raise ModelLoadFailed(f"the worker for {manifest.id} died while loading "
                                  f"(exit code {exc.exitcode})", model=manifest.id) from exc
        except OutpostError:
            await worker.stop(grace_s=1)
            raise
        log.info("loaded %s %s in %.0f ms (pid %s, process start included %.0f ms)",
                 manifest.id, manifest.version, worker.load_ms, worker.pid,
                 (time.perf_counter() - t0) * 1e3)
        return worker

    async def _forget(self, worker: Worker) -> None:
        log.warning("worker for %s (pid %s) is gone (exit code %s); it will be reloaded",
                    worker.manifest.id, worker.pid, worker.process.exitcode)
        self.workers.pop(worker.manifest.id, None)
        await worker.stop(grace_s=0)

    def describe(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self.workers.values()]

    async def close(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
        self.workers.clear()
        shutil.rmtree(self._sockdir, ignore_errors=True)

