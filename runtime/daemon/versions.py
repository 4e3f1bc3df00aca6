"""The daemon's `models.*` methods: the catalog as agents see it, and a staged version
made active (once it has answered a smoke test in a worker of its own) or rolled
back, while the daemon serves.

What this module must not do: run a model itself (the pool's trial does), or write
SQL (logs/).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from outpost.manifests.catalog import Catalog, model_row
from outpost.manifests.errors import OutpostError
from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore
from outpost.runtime.logs.records import PoolEvent, PoolEventKind
from outpost.runtime.logs.store import LogStore

from . import protocol, smoke
from .errors import ActivationFailed, BudgetExceeded, Overloaded, Timeout
from .pool import ModelPool

log = logging.getLogger("outpost.server")  # the daemon's own log, as before


class Versions:
    def __init__(self, store: ModelStore, catalog: Catalog, pool: ModelPool, logs: LogStore) -> None:
        self.store, self.catalog, self.pool, self.logs = store, catalog, pool, logs

    async def list(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"models": [{**model_row(m, self.store, self.catalog), "loaded": m.id in self.pool.workers}
                           for m in self.catalog]}

    async def activate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Make a staged version active once it has answered its smoke test in a worker
        of its own; new requests then go to it and the old version's worker drains."""
        model_id, version = protocol.model_param(params), protocol.text_param(params, "version")
        manifest, text = self.store.staged(model_id, version)
        t0 = time.perf_counter()
        try:
            answers = await self.pool.trial(manifest, text, smoke.requests(manifest))
            problem = next((p for i, a in enumerate(answers) if (p := smoke.problem(a, empty_ok=i > 0))), None)
        except (BudgetExceeded, Overloaded, Timeout):
            raise  # no room or no time now, not a fault of the version: it stays staged, to retry
        except OutpostError as exc:
            problem = f"{exc.code}: {exc}"
        smoke_ms = round((time.perf_counter() - t0) * 1e3, 1)
        await self._note_trial(manifest, problem or "passed")
        if problem:
            self.store.mark_failed(model_id, version, {"reason": problem, "at": time.time()})
            raise ActivationFailed(model_id, version, problem)
        previous = self.store.activate(model_id, version)
        self.catalog.put(text, f"{self.store.manifests / model_id}.toml")
        log.info("activated %s %s (was %s) after a %.0f ms smoke test", model_id, version, previous, smoke_ms)
        return {"model": model_id, "version": version, "previous": previous, "smoke_ms": smoke_ms}

    async def rollback(self, params: dict[str, Any]) -> dict[str, Any]:
        """Return a model to the version active before this one (no smoke test: it served)."""
        model_id = protocol.model_param(params)
        current, back = self.store.rollback(model_id)
        if back is None:  # a task adapter's first version: its task goes to the base again
            self.catalog.remove(model_id)
            log.info("retired task adapter %s %s: its base serves its tasks again", model_id, current)
        else:
            self.catalog.put((self.store.manifests / f"{model_id}.toml").read_text(encoding="utf-8"),
                             f"{self.store.manifests / model_id}.toml")
            log.info("rolled %s back from %s to %s", model_id, current, back)
        return {"model": model_id, "version": back, "previous": current}

    async def _note_trial(self, manifest: Manifest, outcome: str) -> None:
        try:
            await self.logs.record_event(PoolEvent(kind=PoolEventKind.TRIAL, model=manifest.id,
                                                   version=manifest.version, reason=outcome))
        except Exception:
            log.exception("could not log the smoke test of %s %s", manifest.id, manifest.version)
