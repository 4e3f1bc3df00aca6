"""Quarantine: a model version whose worker keeps failing to load is not reloaded in a loop.

A file that crashes llama.cpp, one Outpost's reader refuses, or a worker the kernel's
OOM killer takes while loading would otherwise cost a fork, a load and a crash for every
request that names it (and a flood of requests would turn that into a fork storm). After
`[pool] quarantine_after` failed loads in a row, the version is quarantined: requests for
it get `model_quarantined` at once, without a worker, until its backoff ends
(`[pool] quarantine_s`, doubling with each failure after that, up to an hour). Then one
load is tried again; a success clears the record, a failure doubles the wait.

What this module must not do: load or stop workers (pool.py decides, this only counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from outpost.manifests.errors import OutpostError
from outpost.manifests.schema import Manifest

from .errors import ModelQuarantined

MAX_BACKOFF_S = 3600.0


@dataclass
class Strikes:
    failures: int = 0  # failed loads in a row
    last_error: str = ""
    until: float = 0.0  # monotonic time the quarantine ends (0: not quarantined)


class Quarantine:
    def __init__(self, after: int, backoff_s: float) -> None:
        self.after, self.backoff_s = after, backoff_s
        self._strikes: dict[tuple[str, str], Strikes] = {}

    def check(self, manifest: Manifest) -> None:
        """Raise ModelQuarantined while this version's backoff runs."""
        s = self._strikes.get((manifest.id, manifest.version))
        if s is not None and s.until > (now := time.monotonic()):
            raise ModelQuarantined(manifest.id, manifest.version, s.failures, s.until - now, s.last_error)

    def failed(self, manifest: Manifest, exc: BaseException) -> bool:
        """Count a failed load; True when it (re)starts a quarantine."""
        s = self._strikes.setdefault((manifest.id, manifest.version), Strikes())
        s.failures += 1
        s.last_error = f"[{exc.code}] {exc.message}" if isinstance(exc, OutpostError) else repr(exc)
        if s.failures < self.after:
            return False
        wait = min(self.backoff_s * 2 ** (s.failures - self.after), MAX_BACKOFF_S)
        s.until = time.monotonic() + wait
        return True

    def loaded(self, manifest: Manifest) -> None:
        self._strikes.pop((manifest.id, manifest.version), None)

    def view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"model": model, "version": version, "failures": s.failures,
                 "retry_in_s": round(s.until - now, 1), "last_error": s.last_error}
                for (model, version), s in self._strikes.items() if s.until > now]
