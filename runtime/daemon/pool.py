"""The pool of loaded models under one memory budget: one worker process per model.

    lease(manifest)  ->  acquire (load on demand, deduplicated)  ->  wait for one of
    the worker's slots  ->  generate  ->  release

Budget. The ledger (ledger.py) knows the budget, what Outpost uses and what each
model will cost. A load that does not fit evicts idle models, chosen by
eviction.py; one larger than everything that could ever be freed is refused with
`budget_exceeded`. A model that is serving or has requests queued holds a lease and
is never evicted; a load that needs its memory drains it and waits for the lease
to end.

Queueing. Requests to one worker take its slots (`n_parallel`, turns.py): the
ones in slots are decoded together in one batch, interactive requests are given a
free slot before batch ones, and one adapter's requests go together. Beyond
`max_queue` waiting requests a new one gets `overloaded`, and a request that waits
longer than `queue_timeout_s` gets `timeout`.

The reaper, once a second: unloads models idle past their TTL, notices workers
that died between requests, re-measures the live ones, and evicts idle models while
Outpost is over its budget (workers can outgrow their charge).

What this module must not do: route requests (server.py), write request logs, or
talk to SQLite: loads, evictions and footprints go to a `PoolRecorder` (the log
store is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Protocol

import zmq.asyncio

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import OutpostError
from outpost.manifests.schema import ADAPTER_OVERHEAD, Manifest
from outpost.manifests.store import ModelStore
from outpost.models.backend import AdapterRef, Generation, GenerationRequest, LoadOptions
from outpost.models.decision import rule_for
from outpost.models.errors import ModelLoadFailed
from outpost.runtime.logs.records import Footprint, PoolEvent, PoolEventKind

from . import adapters, eviction, memory
from .adapters import Lease
from .background import Background
from .errors import BudgetExceeded, Overloaded, Timeout, WorkerCrashed
from .ledger import MemoryLedger
from .quarantine import Quarantine
from .settings import DaemonSettings
from .workers import LIVE, Forkserver, Snapshot, WorkerHandle, WorkerState

log = logging.getLogger("outpost.pool")
REAP_S = 1.0  # how often idle and dead workers are looked for
TRIM_EVERY = 5  # reaper rounds between returning the daemon's free heap (memory.release_free_heap)


class PoolRecorder(Protocol):
    """Where the pool keeps what it learns: measured footprints and its events."""

    def footprints(self) -> dict[tuple[str, str], Footprint]: ...

    async def record_footprint(self, footprint: Footprint) -> None: ...

    async def record_event(self, event: PoolEvent) -> None: ...


class ModelPool:
    def __init__(self, settings: DaemonSettings, catalog: Catalog, store: ModelStore,
                 zmq_ctx: zmq.asyncio.Context, recorder: PoolRecorder) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.recorder = recorder
        self.workers: dict[str, WorkerHandle] = {}
        self._loading: dict[str, asyncio.Task[WorkerHandle]] = {}
        self._queued: dict[str, int] = {}
        self._admit = asyncio.Lock()  # one admission decision (and its evictions) at a time
        self._released = asyncio.Condition()  # a lease ended or a worker went away
        self._reaper: asyncio.Task[None] | None = None
        self.forkserver: asyncio.Task[None] | None = None
        self.background = Background(log)  # the reaper, the forkserver's start, log writes
        self.ledger = MemoryLedger(settings.budget, settings.llama, recorder.footprints())
        self.evictions = 0
        self.quarantine = Quarantine(settings.pool.quarantine_after, settings.pool.quarantine_s)
        self._forkserver = Forkserver(zmq_ctx)

    async def start(self) -> None:
        # Start the forkserver now, in the background: its start-up (the preload, a few
        # seconds) is part of Outpost's base memory and must not be paid by the first
        # request, but the daemon answers pings, status and logged errors meanwhile.
        self.forkserver = self.background.spawn(self._start_forkserver(), "starting the forkserver")
        self._reaper = self.background.spawn(self._reap(), "the pool's reaper")

    async def _start_forkserver(self) -> None:
        await self._forkserver.start()
        used = self.used()
        vram = self.ledger.vram
        log.info("memory budget %.0f MiB (Outpost itself uses %.0f MiB now)%s",
                 self.ledger.ram / 2**20, used / 2**20,
                 f"; VRAM {[f'{v / 2**20:.0f} MiB' for v in vram]}" if vram else "")
        if used + self.ledger.margin > self.ledger.ram:
            log.warning("the budget leaves no room for any model: raise [budget] ram")

    async def ready(self) -> None:
        """Wait until the forkserver can start workers (and Outpost's base is measurable)."""
        await asyncio.shield(self.forkserver)

    # -- accounting -------------------------------------------------------------------
    def policy(self, manifest: Manifest) -> tuple[bool, float | None]:
        p = self.settings.models.get(manifest.id)
        ttl = p.idle_ttl_s if p and p.idle_ttl_s is not None else self.settings.pool.idle_ttl_s
        return bool(p and p.pin), ttl

    def measure(self) -> tuple[int, Snapshot]:
        """What Outpost uses now, and the one snapshot of its processes it was summed from."""
        return self.ledger.measure(self.workers.values())

    def used(self) -> int:
        return self.measure()[0]

    def _candidate(self, w: WorkerHandle, snapshot: Snapshot) -> eviction.Candidate:
        """What eviction needs to know of a worker, now."""
        return eviction.Candidate(
            model=w.manifest.id, ready=w.state is WorkerState.READY, serving=w.state in LIVE,
            idle_s=time.monotonic() - w.last_used, size=w.charge(snapshot), reload_ms=w.load_ms,
            pinned=w.pinned, leases=w.leases, queued=self._queued.get(w.manifest.id, 0),
            draining=w.draining)

    def _candidates(self, snapshot: Snapshot) -> list[tuple[eviction.Candidate, WorkerHandle]]:
        return [(self._candidate(w, snapshot), w) for w in self.workers.values()]

    def _victim(self, snapshot: Snapshot) -> tuple[WorkerHandle, int] | None:
        """The idle worker to evict now and what evicting it frees, or None."""
        pairs = self._candidates(snapshot)
        chosen = eviction.choose_victim(c for c, _ in pairs)
        return next(((w, c.size) for c, w in pairs if c is chosen), None)

    # -- leases -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, manifest: Manifest, batch: bool = False) -> AsyncIterator[Lease]:
        """Hold a ready worker for one request (the base's, for a task adapter); a
        `batch` request lets interactive ones go first (turns.py)."""
        # The active version, should one have been activated since the request was routed:
        # a request never brings an older version back.
        manifest = self.catalog.active(manifest)
        base, adapter = adapters.resolve(self.catalog, manifest)
        model = base.id
        queued = self._queued.get(model, 0)
        if queued >= self.settings.pool.max_queue:
            raise Overloaded(model, queued, self.settings.pool.max_queue)
        self._queued[model] = queued + 1
        deadline = time.monotonic() + self.settings.pool.queue_timeout_s
        timings = {"load": 0.0, "queue": 0.0}
        try:
            t0 = time.monotonic()
            while True:
                worker = await self._leased(base, t0, deadline)
                try:
                    if adapter is not None and adapter.sha256 not in worker.adapters:
                        await asyncio.wait_for(self._admit_adapter(worker, manifest, adapter),
                                               max(0.0, deadline - time.monotonic()))
                    t1 = time.monotonic()
                    timings["load"] = (t1 - t0) * 1e3
                    # Requests for the adapter applied last go first (turns.py): a switch
                    # clears the prompt cache.
                    await asyncio.wait_for(worker.turns.acquire(adapter and adapter.sha256, batch),
                                           max(0.0, deadline - time.monotonic()))
                except BaseException as exc:
                    await self._release(worker)
                    if isinstance(exc, TimeoutError):
                        raise Timeout(model, time.monotonic() - t0, "earlier requests to finish") from None
                    raise
                if worker.alive:
                    break
                # Its worker crashed while this request waited for its turn: load it again.
                worker.turns.release()
                await self._release(worker)
            timings["queue"] = (time.monotonic() - t1) * 1e3
        finally:
            self._queued[model] -= 1
        try:
            yield Lease(worker, manifest if adapter is not None else worker.manifest, adapter, timings)
        finally:
            worker.turns.release()
            await self._release(worker)
            if worker.served == 1 and worker.alive:
                # The first generation touches the compute buffers: measure it now, so
                # the stored footprint includes them; after that the reaper samples.
                self._remeasure(worker, settle=True)

    async def _leased(self, base: Manifest, t0: float, deadline: float) -> WorkerHandle:
        """A live worker for `base` with one more lease on it, loading it if needed."""
        model = base.id
        while True:
            try:
                worker = await asyncio.wait_for(self.acquire(base), deadline - time.monotonic())
            except TimeoutError:
                raise Timeout(model, time.monotonic() - t0, "the model to load") from None
            # acquire() resumes us on a later loop turn; check and lease in one step,
            # so no eviction can fall between them.
            if self.workers.get(model) is worker and worker.state in LIVE and not worker.draining \
                    and worker.manifest.version == base.version:
                worker.leases += 1
                return worker
            # It is being evicted to make room: wait for that, then load it again.
            if not await self._wait_released(deadline):
                raise Timeout(model, time.monotonic() - t0, "the model to be reloaded")

    async def _admit_adapter(self, worker: WorkerHandle, manifest: Manifest, adapter: AdapterRef) -> None:
        """Charge a task adapter to its base's worker before its first use: llama.cpp
        copies its tensors into memory of the worker's own. Room is made like a load's."""
        need = adapter.size + ADAPTER_OVERHEAD
        async with self._admit:
            if adapter.sha256 in worker.adapters:
                return  # another request for it got here first
            await self._make_room(manifest, need)
            worker.reserve += need
            worker.adapters[adapter.sha256] = f"{adapter.id} {adapter.version}"
        self._note(PoolEventKind.ADAPTER, manifest, f"on {worker.manifest.id} {worker.manifest.version}", need)

    async def _wait_released(self, deadline: float) -> bool:
        """Wait (at most a second, and not past `deadline`) for a lease or worker to go."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        async with self._released:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), min(remaining, 1.0))
        return True

    async def _release(self, worker: WorkerHandle) -> None:
        worker.leases -= 1
        worker.last_used = time.monotonic()
        if not worker.alive and self.workers.get(worker.manifest.id) is worker \
                and (not worker.process.is_alive() or not worker.generating):
            # It crashed serving this lease: its memory leaves the budget now, not when
            # the next request for it comes. (One that said it exits finishes its batch
            # first: the last of its requests forgets it.)
            await self._forget(worker, f"exit code {worker.process.exitcode}")
        async with self._released:
            self._released.notify_all()

    async def acquire(self, manifest: Manifest, reason: str = "request") -> WorkerHandle:
        """A ready worker for `manifest`, loading it (once, however many ask) if needed."""
        manifest = self.catalog.active(manifest)
        current = self.workers.get(manifest.id)
        if current is not None and current.manifest.version != manifest.version:
            # Another version is active now: the old worker takes no new leases and goes
            # once its own requests are done (lease() waits for that, then asks again).
            current.draining = True
            if current.leases or current.state is WorkerState.LOADING:
                return current
            await self.evict(current, f"replaced by version {manifest.version}", PoolEventKind.REPLACE)
            current = None
        if current is not None and current.state in LIVE and current.process.is_alive():
            return current
        if current is not None and current.state is not WorkerState.LOADING:
            await self._forget(current, f"exit code {current.process.exitcode}")
        task = self._loading.get(manifest.id)
        if task is None:
            task = asyncio.create_task(self._load(manifest, reason))
            self._loading[manifest.id] = task
            task.add_done_callback(lambda t, m=manifest.id: self._loading.pop(m, None))
        # shield: a waiter that times out must not cancel a load others wait for
        return await asyncio.shield(task)

    # -- loading and evicting ----------------------------------------------------------
    async def _load(self, manifest: Manifest, reason: str) -> WorkerHandle:
        self.quarantine.check(manifest)  # failed too often lately: no fork, no eviction
        self.store.weights_path(manifest)  # raises ModelNotPulled before anything is evicted
        pinned, ttl = self.policy(manifest)
        p = self.settings.models.get(manifest.id)
        layers, slots = self.ledger.plan(
            manifest, p.n_parallel if p and p.n_parallel else self.settings.llama.n_parallel, self.workers.values())
        need = self.ledger.estimate(manifest, slots)
        t0 = time.perf_counter()
        await self.ready()
        async with self._admit:
            t1 = time.perf_counter()
            await self._make_room(manifest, need)
            t2 = time.perf_counter()
            worker = self._spawn(manifest, need, pinned, ttl, slots=slots, layers=layers)
            self.workers[manifest.id] = worker
        try:
            await worker.wait_ready(self.settings.server.load_timeout_s)
        except BaseException as exc:
            self.workers.pop(manifest.id, None)
            await worker.stop(grace_s=0 if isinstance(exc, WorkerCrashed) else 1)
            async with self._released:
                self._released.notify_all()
            failure = exc
            if isinstance(exc, WorkerCrashed):
                failure = ModelLoadFailed(f"the worker for {manifest.id} died while loading "
                                          f"(exit code {exc.exitcode})", model=manifest.id)
            if isinstance(failure, OutpostError) and self.quarantine.failed(manifest, failure):
                log.warning("quarantined %s %s: %s", manifest.id, manifest.version, failure.message)
                self._note(PoolEventKind.QUARANTINE, manifest, failure.message)
            if failure is exc:
                raise
            raise failure from exc
        self.quarantine.loaded(manifest)
        if (manifest.id, manifest.version) not in self.ledger.footprints:
            # Charge what the first load measures, not the coarse estimate. A model
            # loaded before is charged its stored high-water mark already; the
            # reaper re-measures it within a second, off this request's path.
            self._remeasure(worker)
        t3 = time.perf_counter()
        log.info("loaded %s %s in %.0f ms (%s; waited %.0f ms to admit, %.0f ms to make room, "
                 "%.0f ms to start the worker, %.0f ms in llama.cpp; charged %.0f MiB of a "
                 "%.0f MiB budget)", manifest.id, manifest.version, (t3 - t0) * 1e3, reason,
                 (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3 - worker.load_ms,
                 worker.load_ms, worker.reserve / 2**20, self.ledger.ram / 2**20)
        self._note(PoolEventKind.LOAD, manifest, reason, worker.reserve, worker.load_ms)
        return worker

    async def trial(self, manifest: Manifest, manifest_toml: str,
                    requests: list[GenerationRequest]) -> list[Generation]:
        """Load a version in a worker of its own, which no request can reach, answer
        `requests` with it (under auto, deciding by the version's own rule), and stop it:
        an activation's smoke test. It is admitted like
        any load (room is made under the budget), and holds admission until it is done,
        so no other load can count on memory the trial is using."""
        self.store.weights_path(manifest)
        base, adapter = adapters.resolve(self.catalog, manifest)
        if adapter is not None:  # a task adapter is tried on a private worker of its base
            self.store.weights_path(base)
            manifest_toml = self.catalog.entry(base.id).text
        need = self.ledger.estimate(base) + (adapter.size + ADAPTER_OVERHEAD if adapter else 0)
        await self.ready()
        async with self._admit:
            await self._make_room(manifest, need)
            worker = self._spawn(base, need, False, None, manifest_toml)
            try:
                await worker.wait_ready(self.settings.server.load_timeout_s)
                return [await worker.generate(replace(request, adapter=adapter,
                                                      decision=rule_for(manifest, request)),
                                              self.settings.server.request_timeout_s)
                        for request in requests]
            except WorkerCrashed as exc:
                raise ModelLoadFailed(f"the worker for {manifest.id} {manifest.version} died "
                                      f"(exit code {exc.exitcode})", model=manifest.id) from exc
            finally:
                await worker.stop(grace_s=0)
                async with self._released:
                    self._released.notify_all()

    def _note(self, kind: PoolEventKind, manifest: Manifest, reason: str, ram: int | None = None,
              load_ms: float | None = None, stop_ms: float | None = None) -> None:
        """Record a pool event without making the request that caused it wait for SQLite."""
        event = PoolEvent(kind=kind, model=manifest.id, version=manifest.version, reason=reason,
                          ram_bytes=ram, load_ms=load_ms, stop_ms=stop_ms)
        self.background.spawn(self.recorder.record_event(event), f"logging a {kind} of {manifest.id}")

    def _spawn(self, manifest: Manifest, need: int, pinned: bool, ttl: float | None,
               manifest_toml: str | None = None, slots: int = 1, layers: int | str | None = None) -> WorkerHandle:
        """A worker for `manifest` (its catalog text unless a trial passes the staged one)."""
        llama = self.settings.llama
        options = LoadOptions(n_threads=llama.n_threads, n_batch=llama.n_batch,
                              n_gpu_layers=layers if layers is not None else
                              self.ledger.gpu_layers(manifest, self.workers.values()),
                              providers=tuple(self.settings.onnx.providers),
                              grammar_timeout_s=self.settings.server.grammar_timeout_s, n_parallel=slots)
        text = manifest_toml if manifest_toml is not None else self.catalog.entry(manifest.id).text
        return self._forkserver.spawn(manifest, text, str(self.store.root), options, need, pinned, ttl)

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
        limit = self.ledger.limit
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
                               if w.state is not WorkerState.DEAD and not w.pinned)
            if floor + need > limit:
                raise BudgetExceeded(manifest.id, need, max(0, limit - floor))
            chosen = self._victim(snapshot)
            if chosen is not None:
                victim, freed = chosen
                await self.evict(victim, f"make room for {manifest.id} "
                                         f"({need / 2**20:.0f} MiB, {used / 2**20:.0f} MiB in use)",
                                 freed=freed)
                if any(w.state in (WorkerState.BUSY, WorkerState.LOADING) for w in self.workers.values()):
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
            pairs = self._candidates(snapshot)
            drain = eviction.choose_drain(c for c, _ in pairs)
            if drain is not None:
                self.workers[drain.model].draining = True
                log.info("draining %s to make room for %s", drain.model, manifest.id)
            if not await self._wait_released(deadline):
                raise Timeout(manifest.id, self.settings.pool.queue_timeout_s, "memory to free up")
            used, snapshot = self.measure()

    async def evict(self, worker: WorkerHandle, reason: str, kind: PoolEventKind = PoolEventKind.EVICT,
                    freed: int | None = None) -> None:
        freed = worker.charge() if freed is None else freed
        self.workers.pop(worker.manifest.id, None)
        # An idle worker holds nothing worth a goodbye: killing it frees its memory at
        # once, where a polite shutdown costs the waiting load a few hundred ms.
        t0 = time.perf_counter()
        await worker.stop(grace_s=0)
        stop_ms = (time.perf_counter() - t0) * 1e3
        self.evictions += kind is PoolEventKind.EVICT
        log.info("%s %s: %s (freed %.0f MiB in %.0f ms)", kind, worker.manifest.id, reason,
                 freed / 2**20, stop_ms)
        self._note(kind, worker.manifest, reason, freed, stop_ms=stop_ms)
        async with self._released:
            self._released.notify_all()

    async def _forget(self, worker: WorkerHandle, reason: str) -> None:
        log.warning("worker for %s (pid %s) is gone (%s); it will be reloaded on demand",
                    worker.manifest.id, worker.pid, reason)
        await self.evict(worker, reason, kind=PoolEventKind.CRASH)

    def _remeasure(self, worker: WorkerHandle, settle: bool = False, snapshot: Snapshot | None = None) -> None:
        """Charge the larger of expected and seen; store a new high for the next load."""
        new = self.ledger.remeasure(worker, self.workers.values(), settle, snapshot)
        if new is not None:
            self.background.spawn(self.recorder.record_footprint(new),
                                  f"storing the footprint of {new.model}")

    async def _reap(self) -> None:
        """Unload models idle past their TTL; notice workers that died between requests;
        re-measure the live ones (here, once a second, not on each request's path)."""
        tick = 0
        while True:
            await asyncio.sleep(REAP_S)
            used, snapshot = self.measure() if self.workers else (0, {})
            for w in list(self.workers.values()):
                try:
                    if w.state in LIVE and w.process.is_alive():
                        self._remeasure(w, snapshot=snapshot)
                    if w.state is not WorkerState.LOADING and not w.process.is_alive():
                        await self._forget(w, f"exit code {w.process.exitcode}")
                    elif eviction.expired(self._candidate(w, snapshot), w.idle_ttl_s):
                        await self.evict(w, f"idle for more than {w.idle_ttl_s:g} s",
                                         kind=PoolEventKind.UNLOAD)
                except OutpostError:
                    log.exception("reaper could not unload %s", w.manifest.id)
            if used > self.ledger.ram and not self._admit.locked():
                await self._restore_budget()
            if (tick := tick + 1) % TRIM_EVERY == 0:
                memory.release_free_heap()

    async def _restore_budget(self) -> None:
        """Workers can grow past what they were charged (a longer prompt, a new grammar):
        if Outpost is over its budget, evict idle models until it is not."""
        async with self._admit:
            used, snapshot = self.measure()
            while used > self.ledger.ram:
                log.warning("over the memory budget: %.0f MiB in use of %.0f MiB (%s)",
                            used / 2**20, self.ledger.ram / 2**20,
                            ", ".join(f"{w.manifest.id} {w.charge(snapshot) / 2**20:.0f} MiB"
                                      for w in self.workers.values()))
                chosen = self._victim(snapshot)
                if chosen is None:
                    return
                victim, freed = chosen
                await self.evict(victim, "over the memory budget", freed=freed)
                used, snapshot = self.measure()

    # -- views and shutdown ------------------------------------------------------------
    def describe(self, snapshot: Snapshot | None = None) -> list[dict[str, Any]]:
        return [w.describe(self.ledger.ram, snapshot) for w in self.workers.values()]

    def budget(self, used: int | None = None) -> dict[str, Any]:
        return {**self.ledger.view(self.used() if used is None else used),
                "evictions": self.evictions, "loading": sorted(self._loading),
                "admitting": self._admit.locked(), "quarantined": self.quarantine.view(),
                "queued": {m: n for m, n in self._queued.items() if n}}

    async def close(self) -> None:
        for task in (self._reaper, self.forkserver):
            if task is not None:
                task.cancel()
        for task in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
        await self.background.drain()  # the log writes of the last evictions
        self.workers.clear()
        self._forkserver.close()
