"""Task adapters as the pool sees them: which base serves an adapter, and the lease a
request holds on that base's worker (with the adapter to apply).

A task adapter is never loaded on its own: the worker of its base serves it, and only
when the active base is the exact file it was trained on (`base_sha256`).

What this module must not do: start workers or charge memory (pool.py does both).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from outpost.manifests.catalog import Catalog
from outpost.manifests.schema import Manifest
from outpost.models.backend import AdapterRef, Generation, GenerationRequest
from outpost.models.decision import rule_for

from .errors import AdapterBaseMismatch
from .workers import WorkerHandle


def resolve(catalog: Catalog, manifest: Manifest) -> tuple[Manifest, AdapterRef | None]:
    """The model a worker loads for `manifest`, and the adapter to apply on it."""
    if manifest.adapter is None:
        return manifest, None
    of = manifest.adapter
    base = catalog.get(of.base)
    if base.weights.sha256 != of.base_sha256:
        raise AdapterBaseMismatch(manifest.id, manifest.version, of.base, of.base_version, base.version)
    return base, AdapterRef(id=manifest.id, version=manifest.version, sha256=manifest.weights.sha256,
                            size=manifest.weights.size, scale=of.scale)


@dataclass
class Lease:
    """One request's hold on a worker: who serves it, with which adapter, after how long."""

    worker: WorkerHandle
    served: Manifest  # what answers: the adapter's manifest, or the model's (as loaded); its rule decides
    adapter: AdapterRef | None
    timings: dict[str, float]  # ms: {"load": ..., "queue": ...}

    async def generate(self, request: GenerationRequest, timeout_s: float,
                       on_text: Callable[[str], Awaitable[None]] | None = None) -> Generation:
        # Under tool_choice auto the version that answers decides with its own rule.
        return await self.worker.generate(replace(request, adapter=self.adapter,
                                                  decision=rule_for(self.served, request)),
                                          timeout_s, on_text)
