"""The memory ledger: the budget, what Outpost uses now, and what each model will cost.

The budget covers all of Outpost: the daemon, the forkserver and every worker,
counted in PSS (see memory.py). Before a load the pool charges the model's
footprint: the one measured on its last load (kept in the log's `footprints` table
per model version), else the manifest's estimate plus a worker's own overhead. After
the load the ledger measures the worker (USS, and NVML VRAM where a GPU exists) and
charges the larger of what it sees and what it expected, so memory a worker has yet
to touch stays reserved.

What this module must not do: start, stop or choose workers (pool.py), or write to
the log itself (it hands new footprints back for the pool's recorder).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import psutil

from outpost.manifests.schema import Manifest
from outpost.runtime.logs.records import Footprint

from . import memory
from .settings import BudgetSettings, LlamaSettings
from .workers import Snapshot, WorkerHandle, WorkerState

log = logging.getLogger("outpost.pool")
# A worker's own private memory beyond its model (Python heap touched after the fork,
# llama.cpp and xgrammar state); only used until the model's footprint is measured.
WORKER_OVERHEAD = 96 << 20
AUTO_SLOTS_GPU = 4  # [llama] n_parallel = "auto" on a GPU


def context_bytes(manifest: Manifest) -> int:
    """One context's KV cache and buffers, as the manifest's estimate puts it: what it
    says beyond the weights."""
    return max(0, int(manifest.memory_estimate) - manifest.weights.size)


class MemoryLedger:
    def __init__(self, budget: BudgetSettings, llama: LlamaSettings,
                 footprints: dict[tuple[str, str], Footprint], gpus: memory.Gpus | None = None) -> None:
        self.llama = llama
        self.footprints = footprints  # (model, version) -> its highest measured cost
        self.gpus = gpus if gpus is not None else memory.Gpus()
        self.margin = int(budget.margin)
        self.ram = int(budget.ram or memory.available_ram() * budget.ram_share)
        self.vram = ([int(budget.vram)] * self.gpus.count if budget.vram
                     else [int(f * budget.vram_share) for f in self.gpus.free()])

    @property
    def limit(self) -> int:
        """What loads may fill: the budget less the margin kept for the daemon's growth."""
        return self.ram - self.margin

    def estimate(self, manifest: Manifest, slots: int = 1) -> int:
        """What a worker for `manifest` with `slots` sequences will cost: its measured
        footprint, or the manifest's estimate, with a context's cache per slot more or
        fewer than it was measured with."""
        stored = self.footprints.get((manifest.id, manifest.version))
        if stored:
            return stored.ram_bytes + (slots - stored.n_slots) * context_bytes(manifest)
        return int(manifest.memory_estimate) + WORKER_OVERHEAD + (slots - 1) * context_bytes(manifest)

    def slots(self, manifest: Manifest, configured: int | str, gpu_layers: int | str) -> int:
        """Sequences a worker for `manifest` decodes together: as configured ("auto": see
        AUTO_SLOTS_GPU), but no more than the budget holds; a model short of memory runs
        fewer rather than not loading. ONNX models decode one at a time."""
        if manifest.backend == "onnx":
            return 1
        on_gpu = bool(gpu_layers) and self.gpus.count > 0
        n = configured if isinstance(configured, int) else (AUTO_SLOTS_GPU if on_gpu else 1)
        while n > 1 and self.estimate(manifest, n) > self.limit:
            n -= 1
        return n

    def measure(self, workers: Iterable[WorkerHandle]) -> tuple[int, Snapshot]:
        """PSS of the daemon and every process under it, plus reserved-but-untouched
        memory; and the snapshot it was summed from.

        One read per process: a loading worker grows by hundreds of MB a second, so its
        PSS and USS must come from the same read, or the sum undercounts it. A read
        walks the process's page tables (milliseconds for a loaded model), so a swap
        takes one snapshot and works from it.
        """
        workers = list(workers)
        me = psutil.Process()
        snapshot = memory.processes_memory([me.pid, *(p.pid for p in me.children(recursive=True))])
        pids = {w.process.pid for w in workers}
        if any(w.state is WorkerState.LOADING for w in workers):
            # A young worker is copying the forkserver's pages as it writes to them
            # (copy-on-write), hundreds of MB a second, and the reads are not atomic:
            # a forkserver read from before a copy still splits the page with the
            # worker, which by its own read already owns a private copy. The copies
            # only ever move pages back to the forkserver, so its later read is the
            # truer one: read it again and keep the larger.
            others = [pid for pid in snapshot if pid not in pids and pid != me.pid]
            for pid, again in memory.processes_memory(others).items():
                first = snapshot.get(pid)
                if again is not None and (first is None or again.pss > first.pss):
                    snapshot[pid] = again
        total = sum(m.pss for m in snapshot.values() if m)
        for w in workers:
            if w.state is not WorkerState.DEAD:
                total += max(0, w.reserve - w.uss(snapshot))
        return total, snapshot

    def remeasure(self, worker: WorkerHandle, others: Iterable[WorkerHandle], settle: bool = False,
                  snapshot: Snapshot | None = None) -> Footprint | None:
        """Charge the larger of expected and seen; a new high comes back, to be stored."""
        seen = worker.uss(snapshot)
        sha = worker.manifest.weights.sha256
        if any(w is not worker and w.state is not WorkerState.DEAD and w.manifest.weights.sha256 == sha
               for w in others):
            # Two manifests, one blob: the weights' page cache is mapped by both, so it
            # is in neither's USS. Alone, this model will own those pages: what it costs
            # then is what the next load must reserve (the weights' size bounds them).
            seen += worker.manifest.weights.size
        if worker.pid is not None and self.gpus.count:
            worker.vram = self.gpus.used_by({worker.pid}).get(worker.pid, 0)
        key = (worker.manifest.id, worker.manifest.version)
        stored = self.footprints.get(key)
        if stored is not None and stored.n_slots != worker.slots:
            stored = None  # measured with another number of sequences: this one replaces it
        measured = max(seen, stored.ram_bytes if stored else 0)
        # Right after a first load the worker has not yet touched its compute buffers,
        # so what it measures then is not its footprint: the estimate stays reserved
        # until its first generation has been measured (`settle`), which replaces it.
        worker.reserve = measured if settle else max(worker.reserve, seen)
        if stored is not None and seen <= stored.ram_bytes + (1 << 20):
            return None
        new = Footprint(model=key[0], version=key[1], ram_bytes=measured, vram_bytes=worker.vram,
                        load_ms=worker.load_ms, n_layer=worker.info.get("n_layer"), n_slots=worker.slots)
        self.footprints[key] = new
        return new

    def plan(self, manifest: Manifest, configured_slots: int | str,
             workers: Iterable[WorkerHandle]) -> tuple[int | str, int]:
        """(layers to offload, sequences) for a new worker. The sequences depend on
        whether it runs on the GPU at all, and the layers that fit on how many contexts
        their KV cache holds: a first plan for one context says whether, the second
        sizes the offload for every slot's context. Where "auto" slots would leave no
        layer on the GPU, there are fewer slots (a configured number is kept)."""
        workers = list(workers)
        layers = self.gpu_layers(manifest, workers)
        slots = self.slots(manifest, configured_slots, layers)
        if slots > 1:
            for_all = self.gpu_layers(manifest, workers, slots)
            # "auto" chose the slots for a GPU: where all their caches would leave no
            # layer on it, fewer slots keep the model there.
            while for_all == 0 and layers != 0 and configured_slots == "auto" and slots > 1:
                slots -= 1
                for_all = self.gpu_layers(manifest, workers, slots)
            layers = for_all
        return layers, slots

    def gpu_layers(self, manifest: Manifest, workers: Iterable[WorkerHandle], slots: int = 1) -> int | str:
        """Layers to offload: the configured number, or as many as fit the VRAM budget
        with `slots` contexts' KV cache (llama.cpp spreads the cache over the layers
        with their weights)."""
        configured = self.llama.n_gpu_layers
        if configured != "auto":
            return configured
        if not self.vram or not self.gpus.count:
            return 0  # a CPU-only llama.cpp build ignores the number anyway
        mine = self.gpus.used_by({w.pid for w in workers if w.pid})
        free = self.vram[0] - sum(mine.values())
        stored = self.footprints.get((manifest.id, manifest.version))
        weights = manifest.weights.size
        kv = context_bytes(manifest) * slots
        n_layer = int(stored.n_layer if stored and stored.n_layer else 32)
        return memory.plan_gpu_layers(n_layer, weights, kv, free)

    def view(self, used: int) -> dict[str, Any]:
        return {"ram_bytes": self.ram, "used_bytes": used, "margin_bytes": self.margin,
                "vram_bytes": self.vram, "unified_memory": memory.unified_memory()}
