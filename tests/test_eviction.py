"""Victim choice as a table: which loaded model the pool gives up, and which it never may."""

from __future__ import annotations

import pytest

from outpost.runtime.daemon.eviction import Candidate, choose_drain, choose_victim, expired, is_idle, score

MIB = 1 << 20


def c(model: str, idle_s: float = 10.0, size: int = 100 * MIB, reload_ms: float = 400.0,
      pinned: bool = False, leases: int = 0, queued: int = 0, draining: bool = False,
      state: str = "ready") -> Candidate:
    return Candidate(model=model, ready=state == "ready", serving=state in ("ready", "busy"),
                     idle_s=idle_s, size=size, reload_ms=reload_ms, pinned=pinned, leases=leases,
                     queued=queued, draining=draining)


# (case, candidates, the victim or None)
VICTIMS = [
    ("nothing loaded", [], None),
    ("the only idle model", [c("a")], "a"),
    ("idle longer wins", [c("a", idle_s=5), c("b", idle_s=500)], "b"),
    ("larger wins", [c("a", size=50 * MIB), c("b", size=400 * MIB)], "b"),
    ("cheaper to reload wins", [c("a", reload_ms=5000), c("b", reload_ms=200)], "b"),
    ("idle time against size: 10x idle beats 4x size",
     [c("a", idle_s=1, size=400 * MIB), c("b", idle_s=19, size=100 * MIB)], "b"),
    ("a pinned model never goes", [c("a", pinned=True, idle_s=10_000, size=2000 * MIB), c("b")], "b"),
    ("only pinned models: none", [c("a", pinned=True)], None),
    ("a leased model never goes", [c("a", leases=1, idle_s=10_000), c("b", idle_s=1)], "b"),
    ("every model leased: none", [c("a", leases=1), c("b", leases=3)], None),
    ("requests waiting for it keep it", [c("a", queued=2, idle_s=10_000), c("b", idle_s=1)], "b"),
    ("a busy model is not idle", [c("a", state="busy", idle_s=10_000), c("b", idle_s=1)], "b"),
    ("a loading model is not idle", [c("a", state="loading"), c("b", idle_s=1)], "b"),
    ("a draining model goes first, however it scores",
     [c("a", draining=True, queued=3, idle_s=0, size=MIB), c("b", idle_s=1000, size=900 * MIB)], "a"),
    ("a draining model still serving waits", [c("a", draining=True, leases=1), c("b")], "b"),
]


@pytest.mark.parametrize("candidates,victim", [(cs, v) for _, cs, v in VICTIMS],
                         ids=[name for name, _, _ in VICTIMS])
def test_choose_victim(candidates, victim):
    chosen = choose_victim(candidates)
    assert (chosen.model if chosen else None) == victim


DRAINS = [
    ("nothing serving", [c("a", pinned=True, leases=1)], None),
    ("the busiest big model", [c("a", leases=1, size=50 * MIB), c("b", leases=1, size=500 * MIB)], "b"),
    ("a model only waited for is not drained", [c("a", queued=1), c("b", leases=1)], "b"),
    ("one drain at a time", [c("a", leases=1, draining=True), c("b", leases=1)], None),
    ("a loading model is not drained", [c("a", state="loading", leases=1)], None),
    ("a busy model may be drained", [c("a", state="busy", leases=1)], "a"),
]


@pytest.mark.parametrize("candidates,drain", [(cs, d) for _, cs, d in DRAINS],
                         ids=[name for name, _, _ in DRAINS])
def test_choose_drain(candidates, drain):
    chosen = choose_drain(candidates)
    assert (chosen.model if chosen else None) == drain


def test_score_is_idle_size_and_reload_cost():
    assert score(c("a", idle_s=9, size=100, reload_ms=0)) == pytest.approx(10 * 100 / 100)
    assert is_idle(c("a")) and not is_idle(c("a", pinned=True)) and not is_idle(c("a", leases=1))


@pytest.mark.parametrize("candidate,ttl,gone", [
    (c("a", idle_s=901), 900.0, True),
    (c("a", idle_s=899), 900.0, False),
    (c("a", idle_s=10**6), None, False),  # no TTL: kept however long it idles
    (c("a", idle_s=10**6, pinned=True), 1.0, False),
    (c("a", idle_s=10**6, leases=1), 1.0, False),
    (c("a", idle_s=10**6, queued=1), 1.0, False),
])
def test_idle_ttl(candidate, ttl, gone):
    assert expired(candidate, ttl) is gone
