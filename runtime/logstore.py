"""The interaction log: every request and every attempt at answering it, in SQLite.

Storage design. `requests` holds what the agent asked (messages, tool set by hash,
parameters) and the outcome it saw; `attempts` holds each try at answering it (today
one local attempt; the cloud attempt of an escalated request joins it later), with
the model and version, raw output, parsed calls, validation, timings and tokens;
`tools` stores each distinct tool set once, keyed by the sha256 of its canonical
JSON. This is training data: a row keeps everything a fine-tuning run needs.

One thread owns the connection (WAL, busy timeout) and performs every write in an
explicit transaction, committing the requests that arrive together in one (group
commit); the daemon awaits the commit before replying, so a `log_id` in a reply
always names a row on disk. Rows go in through prepared INSERTs (sqlite-utils'
`insert` introspects the table on every call: a third of the writer's time).
Migrations are plain functions applied in order and recorded in `_migrations`.

Failures are typed: a database another process holds past the busy timeout raises
`LogLocked`, a full disk (or file-size limit) `LogDiskFull`; SQLite rolls the
transaction back, so what was committed before stays.

Retention (`prune`): rows older than `max_age_days`, then the oldest rows while the
file is over `max_size`, but only rows at or below the watermark: the highest
request id that an export or a sync has taken off the device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from outpost.manifests.errors import LogDiskFull, LogLocked, LogUnavailable, NotFound

log = logging.getLogger("outpost.logstore")
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []
CHECKPOINT_EVERY = 64  # writer jobs between checkpoints (and one a second when idle)
CHECKPOINT_IDLE_S = 1.0


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["tools"].create({"hash": str, "tools": str, "created_at": float}, pk="hash")
    db["requests"].create({
        "id": int, "created_at": float, "method": str, "model_requested": str,
        "model": str, "model_version": str, "messages": str, "tools_hash": str,
        "tool_choice": str, "params": str, "content": str, "tool_calls": str,
        "finish_reason": str, "error_code": str, "error_message": str,
        "timings": str, "prompt_tokens": int, "completion_tokens": int,
    }, pk="id", foreign_keys=[("tools_hash", "tools", "hash")])
    db["attempts"].create({
        "id": int, "request_id": int, "kind": str, "model": str, "model_version": str,
        "output": str, "tool_calls": str, "finish_reason": str, "constrained": int,
        "grammar_dead_end": int, "validation": str, "mean_logprob": float,
        "min_logprob": float, "prompt_tokens": int, "completion_tokens": int,
        "prefill_ms": float, "decode_ms": float, "error_code": str, "created_at": float,
    }, pk="id", foreign_keys=[("request_id", "requests", "id")])
    db["requests"].create_index(["created_at"])
    db["requests"].create_index(["model", "created_at"])
    db["attempts"].create_index(["request_id"])


@migration
def m002_footprints_and_pool_events(db: sqlite_utils.Database) -> None:
    # The measured memory of each model version: the next load's estimate.
    db["footprints"].create({
        "model": str, "version": str, "ram_bytes": int, "vram_bytes": int, "load_ms": float,
        "n_layer": int, "samples": int, "updated_at": float}, pk=("model", "version"))
    # Loads, evictions, idle unloads and crashes, with their reason.
    db["pool_events"].create({
        "id": int, "created_at": float, "kind": str, "model": str, "version": str,
        "reason": str, "ram_bytes": int, "load_ms": float}, pk="id")
    db["pool_events"].create_index(["created_at"])


@migration
def m003_attempt_details_and_feedback(db: sqlite_utils.Database) -> None:
    # What fine-tuning and routing analysis need from each attempt beyond m001: the
    # prompt exactly as the model saw it (template and tools block applied), the tool
    # set, the grammar that constrained it, calls closed early, confidence and its
    # parts (scored by the escalation policy), and an error's message.
    attempts = db["attempts"]
    for name, kind in (("prompt", str), ("tools_hash", str), ("grammar", str), ("repaired", int),
                       ("confidence", float), ("confidence_parts", str), ("error_message", str)):
        attempts.add_column(name, kind)
    attempts.create_index(["model", "created_at"])
    attempts.create_index(["kind", "created_at"])
    db["requests"].create_index(["tools_hash"])
    # An agent's verdict on a request's answer: did the call work?
    db["feedback"].create({
        "id": int, "request_id": int, "created_at": float, "outcome": str, "note": str},
        pk="id", foreign_keys=[("request_id", "requests", "id")])
    db["feedback"].create_index(["request_id"])


@migration
def m004_tasks_costs_watermarks(db: sqlite_utils.Database) -> None:
    # The task a request was routed by (stats and export filter on it), the cloud
    # cost of an attempt, and how far exports and syncs have taken the log.
    db["requests"].add_column("task", str)
    db["requests"].create_index(["task", "created_at"])
    # Who answered (a local model id or the cloud model), with what confidence, and
    # why a reply was degraded (the cloud failed and the local answer went out).
    for name, kind in (("answered_by", str), ("confidence", float), ("policy", str), ("degraded", str)):
        db["requests"].add_column(name, kind)
    db["attempts"].add_column("cost_usd", float)
    db["watermarks"].create({"name": str, "request_id": int, "updated_at": float}, pk="name")
    db["exports"].create({
        "id": int, "created_at": float, "path": str, "format": str, "filters": str,
        "examples": int, "max_request_id": int}, pk="id")


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied."""
    if "_migrations" not in db.table_names():
        db["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.conn:  # a migration and its record commit together
            db.conn.execute("BEGIN IMMEDIATE")
            fn(db)
            db["_migrations"].insert({"name": fn.__name__, "applied_at": time.time()})
        applied.append(fn.__name__)
    return applied


def open_db(path: Path, busy_timeout_s: float = 5.0) -> sqlite_utils.Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False,
                           isolation_level=None)
    db = sqlite_utils.Database(conn)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a daemon crash; only an OS crash or power
    # loss may take the last transactions, never the database's integrity.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrate(db)
    return db


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def typed(exc: BaseException, path: Path) -> BaseException:
    """An sqlite3 error as Outpost's error tree (anything else unchanged)."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return LogLocked(f"the log {path} is locked by another process ({exc})", str(path))
    if "full" in text or "disk i/o" in text or "too big" in text:
        return LogDiskFull(f"no room to write the log {path} ({exc})", str(path))
    return LogUnavailable(f"the log {path} failed: {exc}", str(path))


_INSERTS: dict[tuple[str, tuple[str, ...]], str] = {}


def insert(conn: sqlite3.Connection, table: str, row: dict[str, Any], ignore: bool = False) -> int:
    """A prepared INSERT of `row` (keys are column names, always Outpost's own)."""
    cols = tuple(row)
    sql = _INSERTS.get((table, cols))
    if sql is None:
        verb = "insert or ignore" if ignore else "insert"
        sql = _INSERTS[(table, cols)] = (
            f"{verb} into {table} ({', '.join(cols)}) values ({', '.join('?' * len(cols))})")
    return conn.execute(sql, tuple(row.values())).lastrowid or 0


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    settle: Callable[[Any, BaseException | None], None]  # hands the outcome back
    batchable: bool = False  # a request record: may share a transaction with others


def _to_asyncio(future: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
    loop = future.get_loop()

    def done(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting request was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    return lambda result, error: loop.call_soon_threadsafe(done, result, error)


def _to_thread(future: concurrent.futures.Future[Any]) -> Callable[[Any, BaseException | None], None]:
    return lambda result, error: (future.set_exception(error) if error is not None
                                  else future.set_result(result))


class LogStore:
    """Async front of the log: one writer thread owns the connection.

    Requests being logged while the writer is busy are committed together, in one
    transaction (group commit): each reply still waits for its own row to be on disk,
    but a burst of requests pays for one commit instead of one each. If a batch
    fails, its records are retried one by one, so one bad row fails only its request.
    """

    MAX_BATCH = 256

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._known_tools: set[str] = set()  # tool-set hashes already in the table
        self._commits = 0
        self._checkpoint_due = threading.Event()
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoints, name="outpost-log-checkpoint",
                                              daemon=True)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        opened: concurrent.futures.Future[sqlite_utils.Database] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._writer, args=(opened,), name="outpost-log",
                                        daemon=True)
        self._thread.start()
        self._db: sqlite_utils.Database = opened.result()  # raises what opening raised

    # -- the writer thread --------------------------------------------------------------
    def _writer(self, opened: concurrent.futures.Future[sqlite_utils.Database]) -> None:
        try:
            db = open_db(self.path, self.busy_timeout_s)
        except BaseException as exc:
            opened.set_exception(typed(exc, self.path))
            return
        # Checkpoints (copying the WAL into the database, with an fsync) would land on
        # whichever commit crosses the WAL limit: the p99 of a reply. They run on a
        # thread of their own instead, and never block a commit (PASSIVE).
        db.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer.start()
        opened.set_result(db)
        held: _Job | None = None  # a job taken while gathering a batch, run next
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is None:
                break
            self._commits += 1
            if self._commits % CHECKPOINT_EVERY == 0:
                self._checkpoint_due.set()
            if not job.batchable:
                self._one(job)
                continue
            batch = [job]
            while len(batch) < self.MAX_BATCH:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)  # stop, after this batch
                    break
                if not nxt.batchable:
                    held = nxt
                    break
                batch.append(nxt)
            self._batch(batch)
        db.conn.close()

    def _checkpoints(self) -> None:
        """Copy the WAL into the database when the writer says enough has piled up."""
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            while not self._closing.is_set():
                self._checkpoint_due.wait(CHECKPOINT_IDLE_S)
                self._checkpoint_due.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # a full disk: the WAL keeps the rows meanwhile
                    log.warning("log checkpoint failed: %s", exc)
        finally:
            conn.close()

    def _one(self, job: _Job) -> None:
        try:
            result = job.fn(*job.args)
        except BaseException as exc:
            job.settle(None, typed(exc, self.path))
        else:
            job.settle(result, None)

    def _batch(self, batch: list[_Job]) -> None:
        if len(batch) == 1:
            self._one(batch[0])
            return
        db = self._db
        try:
            with db.conn:
                db.conn.execute("BEGIN IMMEDIATE")
                ids = [job.fn(*job.args, transaction=False) for job in batch]
        except Exception:
            self._known_tools.clear()  # rolled back: a tool set noted in it may be missing
            for job in batch:  # find the one that fails; the others still commit
                self._one(job)
            return
        for job, request_id in zip(batch, ids):
            job.settle(request_id, None)

    async def _run(self, fn: Callable[..., Any], *args: Any, batchable: bool = False) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._jobs.put(_Job(fn, args, _to_asyncio(future), batchable))
        return await future

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run on the writer thread and wait for it, from synchronous code."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put(_Job(fn, args, _to_thread(future)))
        return future.result()

    # -- requests -----------------------------------------------------------------------
    async def record(self, request: dict[str, Any], attempts: list[dict[str, Any]]) -> int:
        return await self._run(self._record, request, attempts, batchable=True)

    def _record(self, request: dict[str, Any], attempts: list[dict[str, Any]],
                transaction: bool = True) -> int:
        conn = self._db.conn
        tools = request.get("tools")
        now = time.time()
        with conn if transaction else contextlib.nullcontext():
            if transaction:  # one transaction: the request and its attempts, or nothing
                conn.execute("BEGIN IMMEDIATE")
            tools_hash = None
            if tools:
                blob = json.dumps(tools, sort_keys=True, separators=(",", ":"))
                tools_hash = _tools_hash(blob)
                if tools_hash not in self._known_tools:
                    insert(conn, "tools", {"hash": tools_hash, "tools": blob, "created_at": now},
                           ignore=True)
            row = {k: (_json(v) if isinstance(v, (dict, list)) else v)
                   for k, v in request.items() if k != "tools"}
            row.update(created_at=now, tools_hash=tools_hash)
            request_id = insert(conn, "requests", row)
            for attempt in attempts:
                arow = {k: (_json(v) if isinstance(v, (dict, list)) else v) for k, v in attempt.items()}
                arow.update(request_id=request_id, created_at=now, tools_hash=tools_hash)
                insert(conn, "attempts", arow)
        if tools_hash:
            # Later requests skip the insert. In a batch the commit is still to come;
            # a batch that fails forgets every hash (`_batch`).
            self._known_tools.add(tools_hash)
        return int(request_id)

    async def record_attempt(self, request_id: int, attempt: dict[str, Any]) -> int:
        """A later attempt at a logged request (a shadow-mode cloud answer)."""
        return await self._run(self._attempt, request_id, attempt)

    def _attempt(self, request_id: int, attempt: dict[str, Any]) -> int:
        conn = self._db.conn
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            row = {k: (_json(v) if isinstance(v, (dict, list)) else v) for k, v in attempt.items()}
            row.update(request_id=request_id, created_at=time.time())
            return insert(conn, "attempts", row)

    # -- feedback -----------------------------------------------------------------------
    async def record_feedback(self, request_id: int, outcome: str, note: str | None) -> int:
        return await self._run(self._feedback, request_id, outcome, note)

    def _feedback(self, request_id: int, outcome: str, note: str | None) -> int:
        db = self._db
        with db.conn:
            db.conn.execute("BEGIN IMMEDIATE")
            if not db.execute("select 1 from requests where id = ?", [request_id]).fetchone():
                raise NotFound("request", request_id)
            return int(db["feedback"].insert({"request_id": request_id, "created_at": time.time(),
                                              "outcome": outcome, "note": note}).last_pk)

    def cloud_spent_today(self) -> tuple[int, int]:
        """(cloud requests, cloud tokens) logged since midnight UTC: the daily cap's start."""
        midnight = time.time() // 86400 * 86400
        row = self._call(lambda: self._db.execute(
            "select count(*), coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0) "
            "from attempts where kind = 'cloud' and created_at >= ?", [midnight]).fetchone())
        return int(row[0]), int(row[1])

    # -- the pool's memory records ----------------------------------------------------
    def footprints(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(model, version) -> its stored footprint; read once at start."""
        rows = self._call(lambda: list(self._db["footprints"].rows))
        return {(r["model"], r["version"]): r for r in rows}

    async def record_footprint(self, model: str, version: str, row: dict[str, Any]) -> None:
        await self._run(self._upsert_footprint, model, version, row)

    def _upsert_footprint(self, model: str, version: str, row: dict[str, Any]) -> None:
        with self._db.conn:
            self._db.conn.execute("BEGIN IMMEDIATE")
            self._db.conn.execute(
                "insert into footprints (model, version, ram_bytes, vram_bytes, load_ms, n_layer, "
                "samples, updated_at) values (?, ?, ?, ?, ?, ?, 1, ?) on conflict (model, version) "
                "do update set ram_bytes = excluded.ram_bytes, vram_bytes = excluded.vram_bytes, "
                "load_ms = excluded.load_ms, n_layer = excluded.n_layer, samples = samples + 1, "
                "updated_at = excluded.updated_at",
                [model, version, row["ram_bytes"], row["vram_bytes"], row["load_ms"],
                 row.get("n_layer"), time.time()])

    # -- retention ---------------------------------------------------------------------
    async def prune(self, max_age_s: float | None, max_bytes: int | None) -> dict[str, Any]:
        return await self._run(prune, self._db, max_age_s, max_bytes, time.time())

    async def record_event(self, kind: str, model: str, version: str, reason: str,
                           ram_bytes: int | None = None, load_ms: float | None = None) -> None:
        row = {"created_at": time.time(), "kind": kind, "model": model, "version": version,
               "reason": reason, "ram_bytes": ram_bytes, "load_ms": load_ms}
        await self._run(lambda: self._db["pool_events"].insert(row))

    def close(self) -> None:
        """Finish what is queued, checkpoint, then close the database."""
        self._jobs.put(None)
        self._thread.join()
        self._closing.set()
        self._checkpoint_due.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()


def watermark(db: sqlite_utils.Database) -> int:
    """The highest request id that has left the device (exported or synced)."""
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


def _tools_hash(blob: str) -> str:
    return hashlib.sha256(blob.encode()).hexdigest()


# -- reading (CLI side, synchronous) ----------------------------------------------------
def list_requests(db: sqlite_utils.Database, limit: int = 20) -> list[dict[str, Any]]:
    return list(db.query(
        "select id, created_at, model, model_version, answered_by, confidence, degraded, "
        "finish_reason, error_code, content, tool_calls, timings from requests "
        "order by id desc limit ?", [limit]))


def get_request(db: sqlite_utils.Database, request_id: int) -> dict[str, Any] | None:
    rows = list(db.query("select * from requests where id = ?", [request_id]))
    if not rows:
        return None
    row = rows[0]
    if row.get("tools_hash"):
        tools = list(db.query("select tools from tools where hash = ?", [row["tools_hash"]]))
        row["tools"] = json.loads(tools[0]["tools"]) if tools else None
    row["attempts"] = list(db.query("select * from attempts where request_id = ? order by id",
                                    [request_id]))
    row["feedback"] = list(db.query("select id, created_at, outcome, note from feedback "
                                    "where request_id = ? order by id", [request_id]))
    for key in ("messages", "params", "tool_calls", "timings"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    for attempt in row["attempts"]:
        for key in ("tool_calls", "validation", "confidence_parts"):
            if isinstance(attempt.get(key), str):
                attempt[key] = json.loads(attempt[key])
    return row
