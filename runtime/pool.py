"""The pool of loaded models under one memory budget: one worker process per model.

    lease(manifest)  ->  acquire (load on demand, deduplicated)  ->  queue on the
    worker's lock  ->  generate  ->  release

Budget. The budget covers all of Outpost: the daemon, the forkserver and every
worker, counted in PSS (see memory.py). Before a load the pool charges the model's
footprint: the one measured on its last load (kept in SQLite per model version),
else the manifest's estimate plus a worker's own overhead. After the load it
measures the worker (USS, and NVML VRAM where a GPU exists) and charges the larger
of what it sees and what it expected, so memory a worker has yet to touch stays
reserved. A load that does not fit evicts idle models; one larger than everything
that could ever be freed is refused with `budget_exceeded`.

Eviction. Only a ready worker with no lease, not pinned, is a candidate. The pool
evicts the one with the highest (1 + idle seconds) x bytes / (reload ms + 100):
idle for long, large, and cheap to bring back. A model that is serving or has
requests queued holds a lease and is never evicted; a load that needs its memory
waits for the lease to end.

Queueing. Requests to one worker run one at a time, in arrival order (asyncio
locks are fair); beyond `max_queue` waiting requests a new one gets `overloaded`,
and a request that waits longer than `queue_timeout_s` gets `timeout`.

What this module must not do: route requests (server.py) or write request logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import (BudgetExceeded, ModelLoadFailed, OutpostError, Overloaded,
                                      Timeout, WorkerCrashed, from_wire)
from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore

from . import memory
from .config import Settings
from .logstore import LogStore

log = logging.getLogger("outpost.pool")
Snapshot = dict[int, "memory.ProcessMemory | None"]  # pid -> one read of its memory
POLL_MS = 100  # how often a waiting request checks that its worker is still alive
REAP_S = 1.0  # how often idle and dead workers are looked for
# A worker's own private memory beyond its model (Python heap touched after the fork,
# llama.cpp and xgrammar state); only used until the model's footprint is measured.
WORKER_OVERHEAD = 96 << 20


@dataclass
class Worker:
    manifest: Manifest
    process: multiprocessing.process.BaseProcess
    socket: zmq.asyncio.Socket
    reserve: int  # bytes charged to the budget for this worker
    pinned: bool = False
    idle_ttl_s: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: str = "loading"  # loading | ready | busy | stopping | dead
    pid: int | None = None
    load_ms: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    served: int = 0
    leases: int = 0  # requests holding this worker (queued or generating)
    draining: bool = False  # chosen for eviction: no new leases, current ones finish
    vram: int = 0
    last_used: float = field(default_factory=time.monotonic)
    _ids: itertools.count = field(default_factory=itertools.count)

    # -- talking to the process ---------------------------------------------------
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

    async def _send(self, msg: dict[str, Any]) -> None:
        # A DEALER with no connected peer blocks on send, forever: a worker that has
        # exited must show up as an error, not a hang.
        try:
            await self.socket.send_json(msg, flags=zmq.DONTWAIT)
        except zmq.Again:
            self.state = "dead"
            raise WorkerCrashed(self.manifest.id, self.process.exitcode) from None

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
            await self._send({"type": "generate", "id": msg_id, "request": request})
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

    async def stop(self, grace_s: float = 5.0) -> None:
        self.state = "stopping"
        if self.process.is_alive() and grace_s <= 0:
            self.process.kill()
        elif self.process.is_alive():
            try:
                await self._send({"type": "shutdown"})
            except (WorkerCrashed, zmq.ZMQError):
                pass  # already gone or going: the wait below settles it
            deadline = time.monotonic() + grace_s
            while self.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if self.process.is_alive():
                self.process.kill()
        await self._exited(5.0)
        self.socket.close(linger=0)
        self.state = "dead"

    async def _exited(self, timeout_s: float) -> None:
        """Wait until the process has exited, and so given its memory back.

        A pidfd turns readable when the process exits, after the kernel has torn down
        its address space; that is sooner than a join, which waits for the forkserver
        to reap it and pass the exit status on (that part goes on in a thread).
        """
        pid = self.process.pid
        try:
            fd = os.pidfd_open(pid) if pid else None
        except OSError:  # already reaped, or a kernel without pidfds
            fd = None
        if fd is None:
            await asyncio.to_thread(self.process.join, timeout_s)
            return
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
        try:
            await asyncio.wait_for(gone, timeout_s)
        except TimeoutError:
            log.warning("worker %s (pid %s) did not exit in %.0f s", self.manifest.id, pid, timeout_s)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        asyncio.get_running_loop().run_in_executor(None, self.process.join, timeout_s)

    # -- memory ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.state not in ("dead",) and self.process.is_alive()

    def uss(self, snapshot: Snapshot | None = None) -> int:
        if snapshot is not None:
            mem = snapshot.get(self.process.pid)
        else:
            mem = memory.process_memory(self.process.pid) if self.process.pid else None
        return mem.uss if mem else 0

    def charge(self, snapshot: Snapshot | None = None) -> int:
        """What this worker costs the budget: its private memory or its reserve."""
        return max(self.uss(snapshot), self.reserve)

    def describe(self, budget: int, snapshot: Snapshot | None = None) -> dict[str, Any]:
        charge = self.charge(snapshot)
        return {"model": self.manifest.id, "version": self.manifest.version, "state": self.state,
                "pid": self.pid, "ram_bytes": charge, "vram_bytes": self.vram,
                "budget_share": round(charge / budget, 3) if budget else None,
                "pinned": self.pinned, "leases": self.leases, "draining": self.draining,
                "load_ms": round(self.load_ms, 1), "served": self.served,
                "idle_s": round(time.monotonic() - self.last_used, 1),
                **{k: v for k, v in self.info.items() if k in ("n_ctx", "n_gpu_layers", "grammar_cache")}}


class ModelPool:
    def __init__(self, settings: Settings, catalog: Catalog, store: ModelStore,
                 zmq_ctx: zmq.asyncio.Context, logs: LogStore) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.logs = logs
        self._zmq = zmq_ctx
        self.workers: dict[str, Worker] = {}
        self._loading: dict[str, asyncio.Task[Worker]] = {}
        self._queued: dict[str, int] = {}
        self._sockdir = Path(tempfile.mkdtemp(prefix="outpost-w-"))
        self._seq = itertools.count()
        self._admit = asyncio.Lock()  # one admission decision (and its evictions) at a time
        self._released = asyncio.Condition()  # a lease ended or a worker went away
        self._reaper: asyncio.Task[None] | None = None
        self.forkserver: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # event writes in flight
        self.footprints = logs.footprints()  # (model, version) -> stored row
        self.gpus = memory.Gpus()
        self.ram_budget = int(settings.budget.ram or memory.available_ram() * settings.budget.ram_share)
        self.vram_budget = ([int(settings.budget.vram)] * self.gpus.count if settings.budget.vram
                            else [int(f * settings.budget.vram_share) for f in self.gpus.free()])
        self.evictions = 0
        # Workers fork from a server that has llama_cpp and xgrammar imported already;
        # the daemon itself never imports them (they would double Outpost's base
        # memory). The CLI module too: each child re-runs the `outpost` script as
        # __mp_main__, and its imports would otherwise cost every swap.
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(["outpost.runtime.worker", __name__, "outpost.runtime.cli"])

    async def start(self) -> None:
        # Start the forkserver now, in the background: its start-up (the preload, a few
        # seconds) is part of Outpost's base memory and must not be paid by the first
        # request, but the daemon answers pings, status and logged errors meanwhile.
        # A trivial child is the only way to wait until the preload has finished.
        self.forkserver = asyncio.create_task(self._start_forkserver())
        self._reaper = asyncio.create_task(self._reap())

    async def _start_forkserver(self) -> None:
        probe = self._mp.Process(target=os.getpid, name="outpost-forkserver-probe")
        await asyncio.to_thread(lambda: (probe.start(), probe.join()))
        used = self.used()
        log.info("memory budget %.0f MiB (Outpost itself uses %.0f MiB now)%s",
                 self.ram_budget / 2**20, used / 2**20,
                 f"; VRAM {[f'{v / 2**20:.0f} MiB' for v in self.vram_budget]}" if self.vram_budget else "")
        if used + self.settings.budget.margin > self.ram_budget:
            log.warning("the budget leaves no room for any model: raise [budget] ram")

    async def ready(self) -> None:
        """Wait until the forkserver can start workers (and Outpost's base is measurable)."""
        await asyncio.shield(self.forkserver)

    # -- accounting -------------------------------------------------------------------
    def policy(self, manifest: Manifest) -> tuple[bool, float | None]:
        p = self.settings.models.get(manifest.id)
        ttl = p.idle_ttl_s if p and p.idle_ttl_s is not None else self.settings.pool.idle_ttl_s
        return bool(p and p.pin), ttl

    def estimate(self, manifest: Manifest) -> int:
        stored = self.footprints.get((manifest.id, manifest.version))
        if stored:
            return int(stored["ram_bytes"])
        return int(manifest.memory_estimate) + WORKER_OVERHEAD

    def used(self) -> int:
        return self.measure()[0]

    def measure(self) -> tuple[int, Snapshot]:
        """PSS of the daemon and every process under it, plus reserved-but-untouched
        memory; and the snapshot it was summed from.

        One read per process: a loading worker grows by hundreds of MB a second, so its
        PSS and USS must come from the same read, or the sum undercounts it. A read
        walks the process's page tables (milliseconds for a loaded model), so a swap
        takes one snapshot and works from it.
        """
        me = psutil.Process()
        snapshot = memory.processes_memory([me.pid, *(p.pid for p in me.children(recursive=True))])
        workers = {w.process.pid for w in self.workers.values()}
        if any(w.state == "loading" for w in self.workers.values()):
            # A young worker is copying the forkserver's pages as it writes to them
            # (copy-on-write), hundreds of MB a second, and the reads are not atomic:
            # a forkserver read from before a copy still splits the page with the
            # worker, which by its own read already owns a private copy. The copies
            # only ever move pages back to the forkserver, so its later read is the
            # truer one: read it again and keep the larger.
            others = [pid for pid in snapshot if pid not in workers and pid != me.pid]
            for pid, again in memory.processes_memory(others).items():
                first = snapshot.get(pid)
                if again is not None and (first is None or again.pss > first.pss):
                    snapshot[pid] = again
        total = sum(m.pss for m in snapshot.values() if m)
        for w in self.workers.values():
            if w.state != "dead":
                total += max(0, w.reserve - w.uss(snapshot))
        return total, snapshot

    # -- leases -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, manifest: Manifest) -> AsyncIterator[tuple[Worker, dict[str, float]]]:
        """Hold a ready worker for one request: (worker, {"load": ms, "queue": ms})."""
        model = manifest.id
        queued = self._queued.get(model, 0)
        if queued >= self.settings.pool.max_queue:
            raise Overloaded(model, queued, self.settings.pool.max_queue)
        self._queued[model] = queued + 1
        deadline = time.monotonic() + self.settings.pool.queue_timeout_s
        timings = {"load": 0.0, "queue": 0.0}
        try:
            t0 = time.monotonic()
            while True:
                try:
                    worker = await asyncio.wait_for(self.acquire(manifest),
                                                    deadline - time.monotonic())
                except TimeoutError:
                    raise Timeout(model, time.monotonic() - t0, "the model to load") from None
                # acquire() resumes us on a later loop turn; check and lease in one step,
                # so no eviction can fall between them.
                if (self.workers.get(model) is worker and worker.state in ("ready", "busy")
                        and not worker.draining):
                    worker.leases += 1
                    break
                # It is being evicted to make room: wait for that, then load it again.
                if not await self._wait_released(deadline):
                    raise Timeout(model, time.monotonic() - t0, "the model to be reloaded")
            t1 = time.monotonic()
            timings["load"] = (t1 - t0) * 1e3
            try:
                await asyncio.wait_for(worker.lock.acquire(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await self._release(worker)
                raise Timeout(model, time.monotonic() - t0, "earlier requests to finish") from None
            timings["queue"] = (time.monotonic() - t1) * 1e3
        finally:
            self._queued[model] -= 1
        try:
            yield worker, timings
        finally:
            worker.lock.release()
            await self._release(worker)
            if worker.served == 1 and worker.alive:
                # The first generation touches the compute buffers: measure it now, so
                # the stored footprint includes them; after that the reaper samples.
                self._remeasure(worker, settle=True)

    async def _wait_released(self, deadline: float) -> bool:
        """Wait (at most a second, and not past `deadline`) for a lease or worker to go."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        async with self._released:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), min(remaining, 1.0))
        return True

    async def _release(self, worker: Worker) -> None:
        worker.leases -= 1
        worker.last_used = time.monotonic()
        async with self._released:
            self._released.notify_all()

    async def acquire(self, manifest: Manifest, reason: str = "request") -> Worker:
        """A ready worker for `manifest`, loading it (once, however many ask) if needed."""
        current = self.workers.get(manifest.id)
        if current is not None and current.state in ("ready", "busy") and current.process.is_alive():
            return current
        if current is not None and current.state not in ("loading",):
            await self._forget(current, "crash", f"exit code {current.process.exitcode}")
        task = self._loading.get(manifest.id)
        if task is None:
            task = asyncio.create_task(self._load(manifest, reason))
            self._loading[manifest.id] = task
            task.add_done_callback(lambda t, m=manifest.id: self._loading.pop(m, None))
        # shield: a waiter that times out must not cancel a load others wait for
        return await asyncio.shield(task)

    # -- loading and evicting ----------------------------------------------------------
    async def _load(self, manifest: Manifest, reason: str) -> Worker:
        weights = self.store.weights_path(manifest)  # raises ModelNotPulled
        pinned, ttl = self.policy(manifest)
        need = self.estimate(manifest)
        t0 = time.perf_counter()
        await self.ready()
        async with self._admit:
            t1 = time.perf_counter()
            await self._make_room(manifest, need)
            t2 = time.perf_counter()
            worker = self._spawn(manifest, weights, need, pinned, ttl)
            self.workers[manifest.id] = worker
        try:
            await worker.wait_ready(self.settings.server.load_timeout_s)
        except BaseException as exc:
            self.workers.pop(manifest.id, None)
            await worker.stop(grace_s=0 if isinstance(exc, WorkerCrashed) else 1)
            async with self._released:
                self._released.notify_all()
            if isinstance(exc, WorkerCrashed):
                raise ModelLoadFailed(f"the worker for {manifest.id} died while loading "
                                      f"(exit code {exc.exitcode})", model=manifest.id) from exc
            raise
        if (manifest.id, manifest.version) not in self.footprints:
            # Charge what the first load measures, not the coarse estimate. A model
            # loaded before is charged its stored high-water mark already; the
            # reaper re-measures it within a second, off this request's path.
            self._remeasure(worker)
        t3 = time.perf_counter()
        log.info("loaded %s %s in %.0f ms (%s; waited %.0f ms to admit, %.0f ms to make room, "
                 "%.0f ms to start the worker, %.0f ms in llama.cpp; charged %.0f MiB of a "
                 "%.0f MiB budget)", manifest.id, manifest.version, (t3 - t0) * 1e3, reason,
                 (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3 - worker.load_ms,
                 worker.load_ms, worker.reserve / 2**20, self.ram_budget / 2**20)
        self._note("load", manifest, reason, worker.reserve, worker.load_ms)
        return worker

    def _note(self, kind: str, manifest: Manifest, reason: str, ram: int | None = None,
              load_ms: float | None = None) -> None:
        """Record a pool event without making the request that caused it wait for SQLite."""
        task = asyncio.get_running_loop().create_task(
            self.logs.record_event(kind, manifest.id, manifest.version, reason, ram, load_ms))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn(self, manifest: Manifest, weights: Path, need: int, pinned: bool,
               ttl: float | None) -> Worker:
        endpoint = f"ipc://{self._sockdir / f'w{next(self._seq)}.sock'}"
        sock = self._zmq.socket(zmq.DEALER)
        sock.linger = 0
        sock.bind(endpoint)
        llama = self.settings.llama
        options = {"n_threads": llama.n_threads, "n_batch": llama.n_batch,
                   "n_gpu_layers": self.gpu_layers(manifest)}
        process = self._mp.Process(
            target=_worker_main, name=f"outpost-worker-{manifest.id}",
            args=(endpoint, self.catalog.entry(manifest.id).text, str(self.store.root),
                  os.getpid(), options), daemon=True)
        process.start()
        return Worker(manifest=manifest, process=process, socket=sock, reserve=need, pinned=pinned,
                      idle_ttl_s=ttl)

    def gpu_layers(self, manifest: Manifest) -> int | str:
        """Layers to offload: the configured number, or as many as fit the VRAM budget."""
        configured = self.settings.llama.n_gpu_layers
        if configured != "auto":
            return configured
        if not self.vram_budget or not self.gpus.count:
            return 0  # a CPU-only llama.cpp build ignores the number anyway
        mine = self.gpus.used_by({w.pid for w in self.workers.values() if w.pid})
        free = self.vram_budget[0] - sum(mine.values())
        stored = self.footprints.get((manifest.id, manifest.version)) or {}
        weights = manifest.weights.size
        kv = max(0, int(manifest.memory_estimate) - weights)
        n_layer = int(stored.get("n_layer") or 32)
        return memory.plan_gpu_layers(n_layer, weights, kv, free)

    async def _make_room(self, manifest: Manifest, need: int) -> None:
        """Evict until `need` more bytes fit the budget; the caller holds `_admit`."""
        try:
            await self._evict_until_fits(manifest, need)
        finally:
            # A drain belongs to this admission. If room came another way (an idle
            # model went instead) or the load gave up, the drained model serves again:
            # left draining, its waiting requests would wait for an eviction nobody does.
            undrained = [w for w in self.workers.values() if w.draining]
            for w in undrained:
                w.draining = False
            if undrained:
                async with self._released:
                    self._released.notify_all()

    async def _evict_until_fits(self, manifest: Manifest, need: int) -> None:
        limit = self.ram_budget - int(self.settings.budget.margin)
        deadline = time.monotonic() + self.settings.pool.queue_timeout_s
        used, snapshot = self.measure()
        while True:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("admit %s: need %.0f MiB, %.0f MiB in use of %.0f; workers %s", manifest.id,
                          need / 2**20, used / 2**20, limit / 2**20,
                          {w.manifest.id: (w.state, w.uss(snapshot) >> 20, w.reserve >> 20)
                           for w in self.workers.values()})
            if used + need <= limit:
                return
            # Refuse only what could never fit: everything but pinned models may go
            # eventually (a loading one once it is ready and idle).
            floor = used - sum(w.charge(snapshot) for w in self.workers.values()
                               if w.state != "dead" and not w.pinned)
            if floor + need > limit:
                raise BudgetExceeded(manifest.id, need, max(0, limit - floor))
            # Idle: nothing leased and nobody waiting for it. A model that has just
            # loaded for waiting requests is not idle, or it could be evicted again
            # before they get their turn, forever.
            idle = [w for w in self.workers.values()
                    if w.state == "ready" and w.leases == 0 and not w.pinned
                    and (w.draining or not self._queued.get(w.manifest.id))]
            if idle:
                # A drained worker goes first: requests are already waiting on its exit.
                victim = max(idle, key=lambda w: (w.draining, self._eviction_score(w, snapshot)))
                freed = victim.charge(snapshot)
                await self.evict(victim, f"make room for {manifest.id} "
                                         f"({need / 2**20:.0f} MiB, {used / 2**20:.0f} MiB in use)",
                                 freed=freed)
                if any(w.state in ("busy", "loading") for w in self.workers.values()):
                    # A worker that is generating or loading grew while we waited.
                    used, snapshot = self.measure()
                else:
                    # Nothing else moved: an exited process takes at least its private
                    # memory and its untouched reserve with it, so the sum has fallen
                    # by at least this, and measuring again would only cost the swap.
                    used -= freed
                continue
            # Everything evictable is serving. Drain the best victim (it takes no new
            # leases, its current requests finish), then wait; without draining, a busy
            # model would be leased again and again while this load starves.
            busy = [w for w in self.workers.values()
                    if w.state in ("ready", "busy") and not w.pinned
                    and (w.leases > 0 or not self._queued.get(w.manifest.id))]
            if busy and not any(w.draining for w in busy):
                victim = max(busy, key=lambda w: self._eviction_score(w, snapshot))
                victim.draining = True
                log.info("draining %s to make room for %s", victim.manifest.id, manifest.id)
            if not await self._wait_released(deadline):
                raise Timeout(manifest.id, self.settings.pool.queue_timeout_s, "memory to free up")
            used, snapshot = self.measure()

    @staticmethod
    def _eviction_score(w: Worker, snapshot: Snapshot) -> float:
        idle_s = time.monotonic() - w.last_used
        return (1.0 + idle_s) * w.charge(snapshot) / (w.load_ms + 100.0)

    async def evict(self, worker: Worker, reason: str, kind: str = "evict",
                    freed: int | None = None) -> None:
        freed = worker.charge() if freed is None else freed
        self.workers.pop(worker.manifest.id, None)
        # An idle worker holds nothing worth a goodbye: killing it frees its memory at
        # once, where a polite shutdown costs the waiting load a few hundred ms.
        t0 = time.perf_counter()
        await worker.stop(grace_s=0)
        self.evictions += kind == "evict"
        log.info("%s %s: %s (freed %.0f MiB in %.0f ms)", kind, worker.manifest.id, reason,
                 freed / 2**20, (time.perf_counter() - t0) * 1e3)
        self._note(kind, worker.manifest, reason, freed)
        async with self._released:
            self._released.notify_all()

    async def _forget(self, worker: Worker, kind: str, reason: str) -> None:
        log.warning("worker for %s (pid %s) is gone (%s); it will be reloaded on demand",
                    worker.manifest.id, worker.pid, reason)
        await self.evict(worker, reason, kind=kind)

    def _shares_weights(self, worker: Worker) -> bool:
        """Does another live worker map the same weights file (two manifests, one blob)?"""
        sha = worker.manifest.weights.sha256
        return any(w is not worker and w.state != "dead" and w.manifest.weights.sha256 == sha
                   for w in self.workers.values())

    def _remeasure(self, worker: Worker, settle: bool = False, snapshot: Snapshot | None = None) -> None:
        """Charge the larger of expected and seen; remember a new high for next time."""
        seen = worker.uss(snapshot)
        if self._shares_weights(worker):
            # The weights' page cache is mapped by both, so it is in neither's USS. Alone,
            # this model will own those pages: what it costs then is what the next load
            # must reserve (the weights' size bounds them from above).
            seen += worker.manifest.weights.size
        if worker.pid is not None and self.gpus.count:
            worker.vram = self.gpus.used_by({worker.pid}).get(worker.pid, 0)
        key = (worker.manifest.id, worker.manifest.version)
        stored = self.footprints.get(key)
        measured = max(seen, int(stored["ram_bytes"]) if stored else 0)
        # Right after a first load the worker has not yet touched its compute buffers,
        # so what it measures then is not its footprint: the estimate stays reserved
        # until its first generation has been measured (`settle`), which replaces it.
        worker.reserve = measured if settle else max(worker.reserve, seen)
        if stored is None or seen > int(stored["ram_bytes"]) + (1 << 20):
            row = {"ram_bytes": measured, "vram_bytes": worker.vram, "load_ms": worker.load_ms,
                   "n_layer": worker.info.get("n_layer")}
            self.footprints[key] = row
            asyncio.get_running_loop().create_task(self.logs.record_footprint(key[0], key[1], row))

    async def _reap(self) -> None:
        """Unload models idle past their TTL; notice workers that died between requests;
        re-measure the live ones (here, once a second, not on each request's path)."""
        while True:
            await asyncio.sleep(REAP_S)
            used, snapshot = self.measure() if self.workers else (0, {})
            for w in list(self.workers.values()):
                try:
                    if w.state in ("ready", "busy") and w.process.is_alive():
                        self._remeasure(w, snapshot=snapshot)
                    if w.state in ("ready",) and not w.process.is_alive():
                        await self._forget(w, "crash", f"exit code {w.process.exitcode}")
                    elif (w.state == "ready" and w.leases == 0 and not w.pinned
                          and w.idle_ttl_s is not None
                          and time.monotonic() - w.last_used > w.idle_ttl_s):
                        await self.evict(w, f"idle for more than {w.idle_ttl_s:g} s", kind="unload")
                except OutpostError:
                    log.exception("reaper could not unload %s", w.manifest.id)
            if used > self.ram_budget and not self._admit.locked():
                await self._restore_budget()

    async def _restore_budget(self) -> None:
        """Workers can grow past what they were charged (a longer prompt, a new grammar):
        if Outpost is over its budget, evict idle models until it is not."""
        async with self._admit:
            used, snapshot = self.measure()
            while used > self.ram_budget:
                idle = [w for w in self.workers.values() if w.state == "ready" and w.leases == 0
                        and not w.pinned and not self._queued.get(w.manifest.id)]
                log.warning("over the memory budget: %.0f MiB in use of %.0f MiB (%s)",
                            used / 2**20, self.ram_budget / 2**20,
                            ", ".join(f"{w.manifest.id} {w.charge(snapshot) / 2**20:.0f} MiB"
                                      for w in self.workers.values()))
                if not idle:
                    return
                victim = max(idle, key=lambda w: self._eviction_score(w, snapshot))
                await self.evict(victim, "over the memory budget", freed=victim.charge(snapshot))
                used, snapshot = self.measure()

    # -- views and shutdown ------------------------------------------------------------
    def describe(self, snapshot: Snapshot | None = None) -> list[dict[str, Any]]:
        return [w.describe(self.ram_budget, snapshot) for w in self.workers.values()]

    def budget(self, used: int | None = None) -> dict[str, Any]:
        return {"ram_bytes": self.ram_budget, "used_bytes": self.used() if used is None else used,
                "margin_bytes": int(self.settings.budget.margin), "vram_bytes": self.vram_budget,
                "unified_memory": memory.unified_memory(), "evictions": self.evictions,
                "loading": sorted(self._loading), "admitting": self._admit.locked(),
                "queued": {m: n for m, n in self._queued.items() if n}}

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*(w.stop() for w in self.workers.values()), *self._background,
                             return_exceptions=True)
        self.workers.clear()
        shutil.rmtree(self._sockdir, ignore_errors=True)


def _worker_main(*args: Any) -> None:
    """A worker's entry point, importable without loading llama.cpp into the daemon."""
    from . import worker  # preloaded in the forkserver: free in the child

    worker.serve_model(*args)
