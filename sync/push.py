"""Logs up: the log's new rows, redacted, in immutable batches on the hub.

    requests above the "sync" watermark, oldest first, `batch_rows` at a time
      -> one JSON line per request (its attempts and feedback inside), redacted with
         the export's redaction; a row that cannot be redacted is withheld (fail closed)
      -> outbox:  <data>/sync/outbox/<first id>-<hash>-<last id>.jsonl.zst  (tmp, fsync, rename)
      -> hub:     logs/<device>/<first id>-<hash>.jsonl.zst,  written only if absent
      -> watermark "sync" = the batch's last id, then the outbox file goes

Requests younger than `min_age_s` ([sync] push_delay_s) wait for a later push, so the
cloud's shadow answer and an agent's feedback, which arrive after the reply, go with
their request; what arrives later still stays on the device (docs/fleet.md).

A batch is fixed when it lands in the outbox, so a push killed at any moment sends the
same bytes under the same key next time: the hub answers "already there" (S3's
`If-None-Match: *` → 412; link() on a folder), which confirms it, and nothing is
duplicated. The watermark moves only after the hub confirmed, so nothing is lost; and
the log's retention prunes only at or below it (runtime/logs/retention.py). The key's
sequence is the batch's first request id: increasing, and the same on every retry.
One pusher at a time (a lock file): two would cut different batches from the same rows.

What this module must not do: write the log (it reads it, and moves its own watermark),
or send anything unredacted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
import zstandard

from outpost.runtime.logs.redact import Redactor
from outpost.runtime.logs.retention import set_watermark

from .deadline import as_sync_error
from .errors import SyncError
from .remotes import Remote
from .transfer import backoff

log = logging.getLogger("outpost.sync")
WATERMARK = "sync"
LEVEL = 10  # zstd: ~4x better than level 3 on log JSON for ~3x the CPU, still far below the link's cost

# The columns that hold what agents and models said: redacted. The rest (ids, times,
# model names, codes, counts) are Outpost's own and go as they are.
REDACTED = {"requests": ("messages", "content", "tool_calls", "error_message"),
            "attempts": ("output", "tool_calls", "prompt", "error_message"),
            "feedback": ("note",)}
JSON_COLUMNS = ("messages", "tool_calls", "params", "timings", "validation", "confidence_parts")


@dataclass(frozen=True)
class Pushed:
    batches: int = 0  # confirmed by the hub in this push (resent ones included)
    rows: int = 0  # requests in them
    withheld: int = 0  # requests not sent because they could not be redacted
    bytes: int = 0  # compressed bytes sent
    watermark: int = 0  # the highest request id the hub has now


def pending(db: sqlite_utils.Database) -> tuple[int, int]:
    """Requests not yet on the hub, and their size in the log (bytes, before compression)."""
    mark = sync_watermark(db)
    rows, size = db.execute(
        "select count(*), coalesce(sum(length(messages) + coalesce(length(content), 0) "
        "+ coalesce(length(tool_calls), 0)), 0) from requests where id > ?", [mark]).fetchone()
    return int(rows), int(size)


def sync_watermark(db: sqlite_utils.Database) -> int:
    row = db.execute("select request_id from watermarks where name = ?", [WATERMARK]).fetchone()
    return int(row[0]) if row else 0


class LogPusher:
    def __init__(self, db: sqlite_utils.Database, remote: Remote, device_id: str, outbox: Path,
                 batch_rows: int = 500, redact: dict[str, str] | None = None, retries: int = 5,
                 backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep,
                 prefix: str = "logs", min_age_s: float = 0.0) -> None:
        if not remote.writable:
            raise SyncError(f"{remote.url} is read-only: logs go to a file:// or s3:// hub",
                            hub=remote.url)
        self.db, self.remote, self.device_id = db, remote, device_id
        self.outbox = outbox
        self.batch_rows = batch_rows
        self.redact = dict(redact or {})
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self.prefix = prefix
        # Requests younger than this wait for the next push: a shadow-mode cloud answer
        # or an agent's feedback lands on its request after the reply, and a pushed
        # request is not sent again.
        self.min_age_s = min_age_s

    def push(self, max_batches: int | None = None) -> Pushed:
        """Send the outbox, then new batches until the log is on the hub (or `max_batches`)."""
        self.outbox.mkdir(parents=True, exist_ok=True)
        with open(self.outbox / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SyncError("another push is under way", path=str(self.outbox)) from None
            with as_sync_error("push"):  # the batch stays in the outbox for the next run
                return self._push(max_batches)

    def _push(self, max_batches: int | None) -> Pushed:
        totals = {"batches": 0, "rows": 0, "withheld": 0, "bytes": 0}
        for stale in self.outbox.glob("*.tmp"):  # a batch a kill left half-written
            stale.unlink()
        for path in sorted(self.outbox.glob("*.jsonl.zst")):  # made before a kill: sent as made
            self._send(path, totals)
        while max_batches is None or totals["batches"] < max_batches:
            path = self._make_batch(totals)
            if path is None:
                break
            self._send(path, totals)
        return Pushed(watermark=sync_watermark(self.db), **totals)

    # -- making a batch ---------------------------------------------------------------------
    def _make_batch(self, totals: dict[str, int]) -> Path | None:
        mark = sync_watermark(self.db)
        rows = list(self.db.query("select r.*, t.tools as tools_json from requests r left join tools t "
                                  "on t.hash = r.tools_hash where r.id > ? order by r.id limit ?",
                                  [mark, self.batch_rows]))
        # Ids in order, up to the first request still settling: the watermark must never
        # pass a row it did not send.
        cutoff = time.time() - self.min_age_s
        young = next((i for i, r in enumerate(rows) if (r["created_at"] or 0) > cutoff), len(rows))
        rows = rows[:young]
        if not rows:
            return None
        lines, withheld = [], 0
        for row in rows:
            try:
                lines.append(json.dumps(self.record(row), ensure_ascii=False, sort_keys=True))
            except Exception as exc:  # noqa: BLE001 (fail closed: whatever broke, the row stays home)
                log.warning("request %s withheld from the push: cannot redact it (%s)", row["id"], exc)
                withheld += 1
        totals["withheld"] += withheld
        body = ("\n".join(lines) + "\n").encode() if lines else b""
        digest = hashlib.sha256(body).hexdigest()[:16]
        path = self.outbox / f"{rows[0]['id']:012d}-{digest}-{rows[-1]['id']:012d}.jsonl.zst"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(zstandard.ZstdCompressor(level=LEVEL).compress(body))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        """What one request (a `requests` row joined with its tools) becomes on the hub."""
        redactor = Redactor(self.redact)
        request = {k: v for k, v in row.items() if k != "tools_json"}
        attempts = list(self.db.query("select * from attempts where request_id = ? order by id", [row["id"]]))
        feedback = list(self.db.query("select * from feedback where request_id = ? order by id", [row["id"]]))
        for table, items in (("requests", [request]), ("attempts", attempts), ("feedback", feedback)):
            for item in items:
                for key in JSON_COLUMNS:
                    if isinstance(item.get(key), str):
                        item[key] = json.loads(item[key])
                for key in REDACTED[table]:
                    if item.get(key) is not None:
                        item[key] = redactor.value(item[key])
        tools = redactor.value(json.loads(row["tools_json"])) if row.get("tools_json") else None
        return {"device": self.device_id, "request": request, "tools": tools,
                "attempts": attempts, "feedback": feedback}

    # -- sending it -------------------------------------------------------------------------
    def _send(self, path: Path, totals: dict[str, int]) -> None:
        first, digest, last = path.name.split(".", 1)[0].split("-")
        if int(last) <= sync_watermark(self.db):  # confirmed before a kill took the file's removal
            path.unlink()
            return
        key = f"{self.prefix}/{self.device_id}/{first}-{digest}.jsonl.zst"
        data = path.read_bytes()
        for attempt in range(self.retries + 1):
            try:
                created = self.remote.write(key, data, exclusive=True)
                break
            except SyncError as exc:
                if attempt == self.retries:
                    raise
                delay = backoff(attempt, self.backoff_s, 30.0)
                log.info("push of %s failed (%s); retrying in %.1f s", key, exc, delay)
                self.sleep(delay)
        # Created, or there already (an earlier try got through before the link or the
        # process died): either way the hub has exactly these bytes under this key.
        set_watermark(self.db, WATERMARK, int(last))
        path.unlink()
        totals["batches"] += 1
        totals["rows"] += len(zstandard.ZstdDecompressor().decompress(data).splitlines())
        totals["bytes"] += len(data) if created else 0
