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
always names a row on disk. Migrations are plain functions applied in order and
recorded in `_migrations`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
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

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


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

    def __init__(self, path: Path) -> None:
        self.path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        opened: concurrent.futures.Future[sqlite_utils.Database] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._writer, args=(opened,), name="outpost-log",
                                        daemon=True)
        self._thread.start()
        self._db: sqlite_utils.Database = opened.result()  # raises what opening raised

    # -- the writer thread --------------------------------------------------------------
    def _writer(self, opened: concurrent.futures.Future[sqlite_utils.Database]) -> None:
        try:
            db = open_db(self.path)
        except BaseException as exc:
            opened.set_exception(exc)
            return
        opened.set_result(db)
        held: _Job | None = None  # a job taken while gathering a batch, run next
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is None:
                break
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

    def _one(self, job: _Job) -> None:
        try:
            result = job.fn(*job.args)
        except BaseException as exc:
            job.settle(None, exc)
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
        db = self._db
        tools = request.get("tools")
        now = time.time()
        with db.conn if transaction else contextlib.nullcontext():
            if transaction:  # one transaction: the request and its attempts, or nothing
                db.conn.execute("BEGIN IMMEDIATE")
            tools_hash = None
            if tools:
                blob = json.dumps(tools, sort_keys=True, separators=(",", ":"))
                tools_hash = _tools_hash(blob)
                db["tools"].insert({"hash": tools_hash, "tools": blob, "created_at": now}, ignore=True)
            row = {k: (_json(v) if isinstance(v, (dict, list)) else v)
                   for k, v in request.items() if k != "tools"}
            row.update(created_at=now, tools_hash=tools_hash)
            request_id = db["requests"].insert(row).last_pk
            for attempt in attempts:
                arow = {k: (_json(v) if isinstance(v, (dict, list)) else v) for k, v in attempt.items()}
                arow.update(request_id=request_id, created_at=now, tools_hash=tools_hash)
                db["attempts"].insert(arow)
        return int(request_id)

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

    async def record_event(self, kind: str, model: str, version: str, reason: str,
                           ram_bytes: int | None = None, load_ms: float | None = None) -> None:
        row = {"created_at": time.time(), "kind": kind, "model": model, "version": version,
               "reason": reason, "ram_bytes": ram_bytes, "load_ms": load_ms}
        await self._run(lambda: self._db["pool_events"].insert(row))

    def close(self) -> None:
        """Finish what is queued, then close the database."""
        self._jobs.put(None)
        self._thread.join()


def _tools_hash(blob: str) -> str:
    return hashlib.sha256(blob.encode()).hexdigest()


# -- reading (CLI side, synchronous) ----------------------------------------------------
def list_requests(db: sqlite_utils.Database, limit: int = 20) -> list[dict[str, Any]]:
    return list(db.query(
        "select id, created_at, model, model_version, finish_reason, error_code, content, "
        "tool_calls, timings from requests order by id desc limit ?", [limit]))


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
