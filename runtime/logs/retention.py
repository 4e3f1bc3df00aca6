"""Retention: how far the log has left the device, and pruning what has.

The watermark is the highest request id that an export or a sync has taken off the
device (the sync's alone once the device pushes to a fleet hub). `prune` removes rows older than `max_age_days`, then the oldest rows while
the file is over `max_size`, but only rows at or below the watermark: what has not
left the device yet is never lost to a cap.

`keep` is the daemon's loop that applies the caps now and every `prune_interval_s`.

What this module must not do: delete a row above the watermark.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import sqlite_utils

from .settings import LogSettings

if TYPE_CHECKING:
    from .store import LogStore

log = logging.getLogger("outpost.logs")


def watermark(db: sqlite_utils.Database) -> int:
    """The highest request id that has left the device. On a device that pushes its log
    to the fleet, that is the sync watermark alone: a row exported to a local file has
    not reached the hub yet. Otherwise, the highest of any export's."""
    row = db.execute("select request_id from watermarks where name = 'sync'").fetchone()
    if row is None:
        row = db.execute("select max(request_id) from watermarks").fetchone()
    return int(row[0] or 0)


def set_watermark(db: sqlite_utils.Database, name: str, request_id: int) -> None:
    """Advance (never lower) the watermark `name` ("export", "sync")."""
    with db.conn:
        db.conn.execute("BEGIN IMMEDIATE")
        db.conn.execute(
            "insert into watermarks (name, request_id, updated_at) values (?, ?, ?) "
            "on conflict (name) do update set request_id = max(request_id, excluded.request_id), "
            "updated_at = excluded.updated_at", [name, request_id, time.time()])


def used_bytes(db: sqlite_utils.Database) -> int:
    """Bytes of the database in use (pages on the freelist are reused, not counted)."""
    pages, free, size = (db.execute(f"pragma {p}").fetchone()[0]
                         for p in ("page_count", "freelist_count", "page_size"))
    return (pages - free) * size


PRUNE_BATCH = 500


def _delete_requests(conn: sqlite3.Connection, ids: list[int]) -> None:
    marks = ",".join("?" * len(ids))
    for table in ("feedback", "attempts"):
        conn.execute(f"delete from {table} where request_id in ({marks})", ids)
    conn.execute(f"delete from requests where id in ({marks})", ids)


def prune(db: sqlite_utils.Database, max_age_s: float | None, max_bytes: int | None,
          now: float, dry_run: bool = False) -> dict[str, Any]:
    """Apply the retention caps; rows above the watermark are never removed.

    Returns what it did: rows deleted by age and by size, rows it kept only because
    they have not left the device yet (`held`), and the bytes in use after.
    """
    conn = db.conn
    mark = watermark(db)
    out = {"watermark": mark, "deleted_by_age": 0, "deleted_by_size": 0, "held": 0}
    if max_age_s is not None:
        cutoff = now - max_age_s
        ids = [r[0] for r in conn.execute(
            "select id from requests where created_at < ? and id <= ?", [cutoff, mark])]
        out["held"] += conn.execute("select count(*) from requests where created_at < ? and id > ?",
                                    [cutoff, mark]).fetchone()[0]
        out["deleted_by_age"] = len(ids)
        if ids and not dry_run:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                for i in range(0, len(ids), PRUNE_BATCH):
                    _delete_requests(conn, ids[i:i + PRUNE_BATCH])
                conn.execute("delete from pool_events where created_at < ?", [cutoff])
    if max_bytes is not None and not dry_run:
        while (used := used_bytes(db)) > max_bytes:
            # As many of the oldest rows as the excess is worth, at the average row size.
            rows = conn.execute("select count(*) from requests").fetchone()[0] or 1
            want = min(PRUNE_BATCH, max(1, -(-(used - max_bytes) * rows // used)))
            ids = [r[0] for r in conn.execute(
                "select id from requests where id <= ? order by id limit ?", [mark, want])]
            if not ids:
                out["held"] = conn.execute("select count(*) from requests where id > ?", [mark]).fetchone()[0]
                break
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                _delete_requests(conn, ids)
            out["deleted_by_size"] += len(ids)
    if (out["deleted_by_age"] or out["deleted_by_size"]) and not dry_run:
        with conn:  # tool sets no request refers to any more
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("delete from tools where hash not in (select tools_hash from requests "
                         "where tools_hash is not null)")
    out["bytes"] = used_bytes(db)
    return out


async def keep(logs: LogStore, cfg: LogSettings) -> None:
    """Apply the log's retention caps now and every `prune_interval_s` (the daemon runs it)."""
    if cfg.max_age_days is None and cfg.max_size is None:
        return
    warned = False
    while True:
        try:
            result = await logs.prune(cfg.max_age_days * 86400 if cfg.max_age_days else None,
                                      int(cfg.max_size) if cfg.max_size else None)
        except Exception:
            log.exception("pruning the log failed; will try again")
        else:
            if result["deleted_by_age"] or result["deleted_by_size"]:
                log.info("log retention: deleted %d requests by age, %d by size",
                         result["deleted_by_age"], result["deleted_by_size"])
            over = cfg.max_size is not None and result["bytes"] > int(cfg.max_size)
            if result["held"] and over and not warned:
                log.warning("the log is over its size cap, but %d requests have not been "
                            "exported or synced yet and are kept: run `outpost logs export`",
                            result["held"])
                warned = True
        await asyncio.sleep(cfg.prune_interval_s)
