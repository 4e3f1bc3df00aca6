"""The log's schema: migrations as plain functions, applied in order and recorded.

Tables: `requests` (what an agent asked and the outcome it saw), `attempts` (each try
at answering it, local or cloud), `tools` (each distinct tool set once, by the sha256
of its canonical JSON), `feedback`, `footprints` and `pool_events` (the pool's
memory records), `watermarks` and `exports` (how far the log has left the device),
`evals` (held-out scores of models and task adapters, and the promotion decisions).
Under tool_choice auto an attempt also records the decision to call or to answer.
The typed records in records.py mirror `requests` and `attempts` column for column.

Also the one prepared-INSERT helper every writer uses.

What this module must not do: hold connections or threads (store.py does).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

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


@migration
def m005_evals(db: sqlite_utils.Database) -> None:
    # Held-out scores of models and task adapters: the selection of a base (S4) and each
    # promotion gate (S6), with the decision and its p-value. `outpost models evals`.
    db["evals"].create({
        "id": int, "created_at": float, "task": str, "purpose": str, "role": str, "model": str,
        "version": str, "base": str, "examples": int, "accuracy": float, "validity": float,
        "p50_ms": float, "decode_tok_s": float, "data_sha256": str, "decision": str,
        "p_value": float, "detail": str}, pk="id")
    db["evals"].create_index(["task", "created_at"])


@migration
def m006_unload_time(db: sqlite_utils.Database) -> None:
    # How long taking a worker down took (an eviction delays the load that asked for it).
    db["pool_events"].add_column("stop_ms", float)


@migration
def m007_batching(db: sqlite_utils.Database) -> None:
    # Continuous batching: the batch a local answer decoded in, and the slots a
    # footprint was measured with (more slots, more KV cache).
    db["attempts"].add_column("batch_size", float)
    db["footprints"].add_column("n_slots", int)


@migration
def m008_decisions(db: sqlite_utils.Database) -> None:
    # Under tool_choice auto, the decision between calling and answering: the local
    # attempt's (its rule's score, threshold and confidence, and whose rule), and the
    # cloud's (whether it called), so the log can say how often the local one was right.
    attempts = db["attempts"]
    for name, kind in (("decision", str), ("decision_score", float), ("decision_threshold", float),
                       ("decision_confidence", float), ("decision_rule", str)):
        attempts.add_column(name, kind)


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
