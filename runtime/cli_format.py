"""How the CLI prints: JSON for scripts, numbers for people.

Nothing here talks to the daemon or reads the log: it only formats.
"""

from __future__ import annotations

import json
import time
from typing import Any


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def share(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def ago(at: float | None) -> str:
    """A past unix time as 'never', '42 s ago', '5 min ago', '3 h ago', '2 days ago'."""
    if not at:
        return "never"
    s = max(0.0, time.time() - at)
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def print_sync(sync: dict[str, Any] | None) -> None:
    """One line per direction: when it last worked, and why it failed since, if it did."""
    for kind, label in (("pull", "models last verified"), ("push", "logs last pushed")):
        entry = (sync or {}).get(kind)
        if not entry:
            continue
        line = f"sync: {label} {ago(entry.get('ok_at'))}"
        if entry.get("error"):
            line += f"; the last try failed ({entry['error']['code']}: {entry['error']['message']})"
        print(line)


def print_quarantined(rows: list[dict[str, Any]] | None) -> None:
    for q in rows or []:
        print(f"quarantined {q['model']} {q['version']}: {q['failures']} failed loads in a row, "
              f"retried in {q['retry_in_s']:.0f} s (last: {q['last_error']})")


def print_workers(workers: list[dict[str, Any]]) -> None:
    if not workers:
        print("no models loaded")
        return
    print(f"{'MODEL':<26} {'BACKEND':<10} {'STATE':<8} {'PID':>7} {'MEMORY':>8} {'SHARE':>6} {'IDLE':>7} "
          f"{'SERVED':>6} {'LOAD':>8} {'GRAMMARS HIT/MISS':>17}")
    for w in workers:
        pin = "*" if w.get("pinned") else ""
        share = f"{w['budget_share'] * 100:.0f}%" if w.get("budget_share") is not None else "-"
        cache = w.get("grammar_cache") or {}
        grammars = f"{cache.get('hits', 0)}/{cache.get('misses', 0)}"
        backend = f"{w.get('backend', '?')}:{w.get('runs_on', '?')}"
        print(f"{w['model'] + pin:<26} {backend:<10} {w['state']:<8} {w['pid'] or '-':>7} "
              f"{mib(w['ram_bytes']):>8} {share:>6} {w['idle_s']:>6.0f}s {w['served']:>6} "
              f"{w['load_ms']:>6.0f}ms {grammars:>17}")
        if w.get("slots", 1) > 1:  # a batching worker: its requests decoding now, of how many
            print(f"  batch: {w.get('generating', 0)} of {w['slots']} slots generating")
        if w.get("adapters"):
            # Task adapters served by this base: the one applied now is marked `>`.
            names = ", ".join(f"{'>' if a == w.get('adapter') else ''}{a}" for a in w["adapters"])
            print(f"  adapters: {names}; {w.get('adapter_switches', 0)} switches, "
                  f"{w.get('grouped', 0)} requests served ahead to save a switch")
        if w.get("batch_turns") or w.get("overtaken"):
            print(f"  priority: {w.get('batch_turns', 0)} batch requests served, "
                  f"{w.get('overtaken', 0)} times an interactive one went ahead")
