"""Reading the log (the CLI's side, synchronous): recent requests, one request whole.

What this module must not do: write; the daemon's writer thread owns writes.
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

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
