"""What the last pull and push did, in `<data>/sync/state.json`: read by `outpost sync
status` and by `outpost status` (which reads the JSON file; runtime never imports sync).

    {"pull": {"attempt_at", "ok_at", "error": {"code", "message"} | null, "models": {...}},
     "push": {"attempt_at", "ok_at", "error", "rows", "batches", "bytes", "watermark"}}

It lives in runtime because both sides write it: the sync commands after each run, and
the daemon's schedule (sync_schedule.py) for a child it had to end.

`ok_at` of a pull is when the device last verified the hub's metadata: while refreshes
fail (offline past expiry, a wrong clock, a hub under attack) the device keeps serving
what it verified then, and `error` says why it could not refresh.

What this module must not do: decide anything; it records.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from outpost.manifests.errors import OutpostError

FILE = "state.json"


def read(trust_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((trust_dir / FILE).read_text())
    except (OSError, ValueError):
        return {}


def record(trust_dir: Path, kind: str, detail: dict[str, Any] | None = None,
           error: OutpostError | None = None) -> None:
    """Note a pull's or push's outcome (atomically: a reader never sees half a file)."""
    state = read(trust_dir)
    entry = state.setdefault(kind, {})
    now = time.time()
    entry["attempt_at"] = now
    if error is None:
        entry["ok_at"] = now
        entry["error"] = None
        entry.update(detail or {})
    else:
        entry["error"] = {"code": error.code, "message": str(error)}
    _write(trust_dir, state)


def record_failure(trust_dir: Path, kind: str, code: str, message: str) -> None:
    """Note a failed pull or push by its error's code (for a run that could not say it
    itself: the schedule ended it)."""
    state = read(trust_dir)
    state.setdefault(kind, {}).update(attempt_at=time.time(), error={"code": code, "message": message})
    _write(trust_dir, state)


def _write(trust_dir: Path, state: dict[str, Any]) -> None:
    trust_dir.mkdir(parents=True, exist_ok=True)
    tmp = trust_dir / f".{FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, trust_dir / FILE)
