"""Which loaded model to give up: pure functions of what the pool knows about each.

    Candidate (one per worker)  ->  choose_victim / choose_drain  ->  the model to evict

Idle and evictable means: loaded and generating nothing, no request holding or
waiting for it, not pinned. A model that has just loaded for waiting requests is
not idle, or it could be evicted again before they get their turn, forever; the one
exception is a model already chosen to drain, whose waiting requests expect it to go.

Among the idle, the victim is the one with the highest

    (1 + idle seconds) x bytes / (reload ms + 100)

idle for long, large, and cheap to bring back. A drained model goes first, since
requests already wait on its exit.

When everything evictable is serving, the pool drains one instead (it takes no new
leases, its current requests finish): `choose_drain` picks it by the same score.

What this module must not do: touch a worker, a process or a clock. It is called by
the pool with plain data, and tested with tables of cases (tests/test_eviction.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    model: str
    ready: bool  # loaded and not generating (busy, loading, stopping and dead are not)
    serving: bool  # loaded: ready, or busy generating
    idle_s: float  # since its last request ended
    size: int  # bytes it is charged: what evicting it frees
    reload_ms: float  # what its last load took
    pinned: bool = False
    leases: int = 0  # requests holding it (queued on its lock, or generating)
    queued: int = 0  # requests waiting to lease it (for its load, or an eviction)
    draining: bool = False  # chosen for eviction: takes no new leases


def score(c: Candidate) -> float:
    """How good a victim: idle for long, large, cheap to bring back."""
    return (1.0 + c.idle_s) * c.size / (c.reload_ms + 100.0)


def is_idle(c: Candidate) -> bool:
    """Idle and evictable: nothing leased, nobody waiting for it (unless it drains), not pinned."""
    return c.ready and c.leases == 0 and not c.pinned and (c.draining or not c.queued)


def choose_victim(candidates: Iterable[Candidate]) -> Candidate | None:
    """The idle model to evict now, or None when none is idle."""
    idle = [c for c in candidates if is_idle(c)]
    return max(idle, key=lambda c: (c.draining, score(c))) if idle else None


def choose_drain(candidates: Iterable[Candidate]) -> Candidate | None:
    """The serving model to drain when nothing is idle; None if one drains already or none may."""
    serving = [c for c in candidates if c.serving and not c.pinned and (c.leases > 0 or not c.queued)]
    if not serving or any(c.draining for c in serving):
        return None
    return max(serving, key=score)


def expired(c: Candidate, idle_ttl_s: float | None) -> bool:
    """Idle past its TTL (None: kept however long it idles)."""
    return idle_ttl_s is not None and is_idle(c) and c.idle_s > idle_ttl_s
