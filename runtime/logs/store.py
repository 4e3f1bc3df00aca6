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
`insert` introspects the table on every call: a third of the writer's time). The rows
come in as typed records (records.py); the schema and its migrations are in schema.py.

Failures are typed: a database another process holds past the busy timeout raises
`LogLocked`, a full disk (or file-size limit) `LogDiskFull`; SQLite rolls the
transaction back, so what was committed before stays.

Retention runs here, on the writer thread (`prune`, see retention.py); reading for the
CLI is in queries.py. What this module must not do: decide what goes in a row (the
daemon and the escalation flow build the records) or raise sqlite3's own errors.
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

from outpost.manifests.errors import NotFound

from .errors import from_sqlite
from .records import AttemptRecord, Footprint, PoolEvent, RequestRecord
from .retention import prune
from .schema import insert, open_db

log = logging.getLogger("outpost.logstore")
CHECKPOINT_EVERY = 64  # writer jobs between checkpoints (and one a second when idle)
CHECKPOINT_IDLE_S = 1.0
KNOWN_TOOLS_CAP = 4096  # tool-set hashes remembered as already stored


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
            opened.set_exception(from_sqlite(exc, self.path))
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
            job.settle(None, from_sqlite(exc, self.path))
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
    async def record(self, request: RequestRecord, attempts: list[AttemptRecord]) -> int:
        """Commit a request and its attempts; returns the request's id once on disk."""
        return await self._run(self._record, request, attempts, batchable=True)

    def _record(self, request: RequestRecord, attempts: list[AttemptRecord],
                transaction: bool = True) -> int:
        conn = self._db.conn
        now = time.time()
        with conn if transaction else contextlib.nullcontext():
            if transaction:  # one transaction: the request and its attempts, or nothing
                conn.execute("BEGIN IMMEDIATE")
            tools_hash = None
            if request.tools:
                blob = json.dumps(request.tools, sort_keys=True, separators=(",", ":"))
                tools_hash = _tools_hash(blob)
                if tools_hash not in self._known_tools:
                    insert(conn, "tools", {"hash": tools_hash, "tools": blob, "created_at": now},
                           ignore=True)
            request_id = insert(conn, "requests",
                                {**request.columns(), "created_at": now, "tools_hash": tools_hash})
            for attempt in attempts:
                insert(conn, "attempts", {**attempt.columns(), "request_id": request_id,
                                          "created_at": now, "tools_hash": tools_hash})
        if tools_hash:
            # Later requests skip the insert. In a batch the commit is still to come;
            # a batch that fails forgets every hash (`_batch`). Agents that send a new
            # tool set each time must not grow it for ever: past the cap it starts over
            # (a hash forgotten costs one INSERT OR IGNORE).
            if len(self._known_tools) >= KNOWN_TOOLS_CAP:
                self._known_tools.clear()
            self._known_tools.add(tools_hash)
        return int(request_id)

    async def record_attempt(self, request_id: int, attempt: AttemptRecord) -> int:
        """A later attempt at a logged request (a shadow-mode cloud answer)."""
        return await self._run(self._attempt, request_id, attempt)

    def _attempt(self, request_id: int, attempt: AttemptRecord) -> int:
        conn = self._db.conn
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            return insert(conn, "attempts", {**attempt.columns(), "request_id": request_id,
                                             "created_at": time.time()})

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

    # -- the pool's memory records (the pool's `PoolRecorder`) ----------------------------
    def footprints(self) -> dict[tuple[str, str], Footprint]:
        """(model, version) -> its stored footprint; read once at start."""
        rows = self._call(lambda: list(self._db["footprints"].rows))
        return {(r["model"], r["version"]): Footprint(
            model=r["model"], version=r["version"], ram_bytes=int(r["ram_bytes"]),
            vram_bytes=int(r["vram_bytes"] or 0), load_ms=float(r["load_ms"] or 0.0),
            n_layer=r["n_layer"], n_slots=int(r["n_slots"] or 1)) for r in rows}

    async def record_footprint(self, footprint: Footprint) -> None:
        await self._run(self._upsert_footprint, footprint)

    def _upsert_footprint(self, fp: Footprint) -> None:
        with self._db.conn:
            self._db.conn.execute("BEGIN IMMEDIATE")
            self._db.conn.execute(
                "insert into footprints (model, version, ram_bytes, vram_bytes, load_ms, n_layer, "
                "n_slots, samples, updated_at) values (?, ?, ?, ?, ?, ?, ?, 1, ?) on conflict (model, version) "
                "do update set ram_bytes = excluded.ram_bytes, vram_bytes = excluded.vram_bytes, "
                "load_ms = excluded.load_ms, n_layer = excluded.n_layer, n_slots = excluded.n_slots, "
                "samples = samples + 1, updated_at = excluded.updated_at",
                [fp.model, fp.version, fp.ram_bytes, fp.vram_bytes, fp.load_ms, fp.n_layer, fp.n_slots,
                 time.time()])

    async def record_event(self, event: PoolEvent) -> None:
        await self._run(self._event, event)

    def _event(self, event: PoolEvent) -> None:
        with self._db.conn:
            self._db.conn.execute("BEGIN IMMEDIATE")
            insert(self._db.conn, "pool_events", {**event.columns(), "created_at": time.time()})

    # -- retention ---------------------------------------------------------------------
    async def prune(self, max_age_s: float | None, max_bytes: int | None) -> dict[str, Any]:
        return await self._run(prune, self._db, max_age_s, max_bytes, time.time())

    def close(self) -> None:
        """Finish what is queued, checkpoint, then close the database."""
        self._jobs.put(None)
        self._thread.join()
        self._closing.set()
        self._checkpoint_due.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()


def _tools_hash(blob: str) -> str:
    return hashlib.sha256(blob.encode()).hexdigest()

