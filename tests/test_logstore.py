"""The log's schema and its migrations, and feedback through the daemon."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlite_utils

from outpost.runtime.errors import BadRequest, NotFound
from outpost.runtime.logs import queries, schema
from outpost.runtime.logs import store as logstore
from outpost.runtime.logs.records import AttemptRecord, RequestRecord


def columns(db: sqlite_utils.Database) -> dict[str, set[str]]:
    return {t: {c.name for c in db[t].columns} for t in db.table_names()}


def test_a_blank_database_gets_every_migration(tmp_path):
    db = schema.open_db(tmp_path / "logs.db")
    assert [r["name"] for r in db["_migrations"].rows] == [m.__name__ for m in schema.MIGRATIONS]
    cols = columns(db)
    assert {"prompt", "tools_hash", "grammar", "confidence", "confidence_parts", "repaired"} <= cols["attempts"]
    assert {"request_id", "outcome", "note"} <= cols["feedback"]
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("applied", range(1, len(schema.MIGRATIONS)))
def test_every_older_schema_migrates_and_keeps_its_rows(tmp_path, applied):
    """A database as an older Outpost left it (the first `applied` migrations), with a
    logged request in it, opens under this version with nothing lost."""
    path = tmp_path / "logs.db"
    old = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    old["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    for fn in schema.MIGRATIONS[:applied]:
        fn(old)
        old["_migrations"].insert({"name": fn.__name__, "applied_at": 0.0})
    old["requests"].insert({"id": 7, "created_at": 1.0, "method": "chat", "model": "m",
                            "messages": json.dumps([{"role": "user", "content": "hi"}])})
    old["attempts"].insert({"request_id": 7, "kind": "local", "model": "m", "output": "hello",
                            "created_at": 1.0})
    old.conn.close()

    db = schema.open_db(path)
    assert [r["name"] for r in db["_migrations"].rows] == [m.__name__ for m in schema.MIGRATIONS]
    assert columns(db) == columns(schema.open_db(tmp_path / "fresh.db"))
    row = queries.get_request(db, 7)
    assert row["messages"] == [{"role": "user", "content": "hi"}]
    assert row["attempts"][0]["output"] == "hello" and row["feedback"] == []


def test_feedback_is_stored_against_the_request(client, tiny_daemon):
    reply = client.chat([{"role": "user", "content": "hi"}], max_tokens=4)
    log_id = reply["outpost"]["log_id"]
    result = client.feedback(log_id, "bad", note="called the wrong tool")
    assert result["log_id"] == log_id and result["outcome"] == "bad"
    db = schema.open_db(tiny_daemon.settings.log_path)
    [fb] = queries.get_request(db, log_id)["feedback"]
    assert fb["outcome"] == "bad" and fb["note"] == "called the wrong tool"


def test_feedback_for_an_unknown_request_or_outcome_is_a_typed_error(client):
    with pytest.raises(NotFound):
        client.feedback(10**9, "good")
    with pytest.raises(BadRequest) as err:
        client.request("feedback", {"log_id": 1, "outcome": "meh"})
    assert err.value.data["errors"][0]["field"] == "outcome"
    assert client.ping()["pong"]


def test_cli_logs_feedback(client, tiny_daemon):
    log_id = client.chat([{"role": "user", "content": "hi"}], max_tokens=4)["outpost"]["log_id"]
    exe = str(Path(sys.executable).with_name("outpost"))
    done = subprocess.run([exe, "logs", "feedback", str(log_id), "good", "--note", "worked",
                           "--endpoint", tiny_daemon.settings.endpoint, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "good"
    missing = subprocess.run([exe, "logs", "feedback", str(10**9), "good",
                              "--endpoint", tiny_daemon.settings.endpoint],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no request" in missing.stderr


def test_concurrent_records_share_commits_and_a_bad_row_fails_alone(tmp_path):
    """Records that queue up together commit in one transaction; one that cannot be
    written fails its own request only, and every other row is on disk."""
    import asyncio

    store = logstore.LogStore(tmp_path / "logs.db")

    async def burst() -> list:
        def request(i: int, params: dict) -> RequestRecord:
            return RequestRecord(method="chat", model_requested=None, model="m", model_version="1",
                                 task=None, policy=None, tools=None, tool_choice=None, params=params,
                                 messages=[{"role": "user", "content": str(i)}])

        # Row 123 cannot be written: its params are not JSON (a typed record refuses a
        # misspelt column where it is built, so a bad value is what is left to fail).
        rows = [(request(i, {"bad": object()} if i == 123 else {}),
                 [AttemptRecord(kind="local", model="m", model_version="1", output=str(i))])
                for i in range(200)]
        return await asyncio.gather(*(store.record(r, a) for r, a in rows), return_exceptions=True)

    try:
        results = asyncio.run(burst())
    finally:
        store.close()
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [123]
    ids = [r for r in results if not isinstance(r, BaseException)]
    assert len(set(ids)) == 199
    db = schema.open_db(tmp_path / "logs.db")
    assert db["requests"].count == 199 and db["attempts"].count == 199
    assert queries.get_request(db, ids[0])["attempts"][0]["output"] == "0"
