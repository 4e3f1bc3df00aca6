"""Typed records at the boundaries: a misspelt field fails where it is written, and the
records agree with the tables they fill."""

from __future__ import annotations

import sqlite3
from dataclasses import fields

import pytest

from outpost.models.backend import Generation
from outpost.runtime.cli import main
from outpost.runtime.errors import (InternalError, LogDiskFull, LogLocked, LogUnavailable, OutpostError,
                                    error_class, from_wire)
from outpost.runtime.logs.errors import from_sqlite
from outpost.runtime.logs.records import AttemptRecord, PoolEvent, RequestRecord
from outpost.runtime.logs.schema import open_db

BASE = dict(method="chat", model_requested=None, model="m", model_version="1", task=None,
            policy="off", messages=[], tools=None, tool_choice=None, params={})


def test_a_misspelt_field_is_refused_where_the_record_is_built():
    with pytest.raises(TypeError, match="modle"):
        RequestRecord(**{**BASE, "modle": "m"})
    with pytest.raises(TypeError, match="confidance"):
        AttemptRecord(kind="local", model="m", model_version="1", confidance=0.9)
    with pytest.raises(TypeError):  # a required field left out
        AttemptRecord(kind="local", model="m")


# Filled in by the writer, not the record: the row id, when, and the links.
WRITER = {"id", "created_at", "request_id", "tools_hash"}


@pytest.mark.parametrize("record,table", [(RequestRecord, "requests"), (AttemptRecord, "attempts"),
                                          (PoolEvent, "pool_events")])
def test_records_and_tables_have_the_same_columns(tmp_path, record, table):
    db = open_db(tmp_path / "logs.db")
    columns = {c.name for c in db[table].columns} - WRITER
    names = {f.name for f in fields(record)} - {"tools"}  # tools: a table of its own
    assert names == columns


def test_a_generation_crosses_the_worker_boundary_typed():
    gen = Generation(text="hi", content="hi", tool_calls=[], finish_reason="stop", prompt_tokens=1,
                     completion_tokens=1, prefill_ms=1.0, decode_ms=1.0, constrained=False)
    assert Generation.from_dict(gen.to_dict()) == gen
    with pytest.raises(TypeError):
        Generation.from_dict({**gen.to_dict(), "finish": "stop"})


def test_every_wire_code_comes_back_as_its_class():
    assert type(from_wire({"code": "internal", "message": "boom"})) is InternalError
    assert type(from_wire({"code": "log_locked", "message": "x", "data": {"path": "/l"}})) is LogLocked
    assert error_class("no_such_code") is OutpostError
    unknown = from_wire({"code": "brand_new", "message": "later versions"})
    assert unknown.code == "brand_new" and isinstance(unknown, OutpostError)


def _sqlite_error(code: int, text: str) -> sqlite3.Error:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code
    return exc


def test_sqlite_errors_are_mapped_by_their_code_not_their_message(tmp_path):
    path = tmp_path / "logs.db"
    # The message says one thing, the code another: the code decides.
    assert type(from_sqlite(_sqlite_error(13, "database is locked"), path)) is LogDiskFull
    assert type(from_sqlite(_sqlite_error(5, "disk is full"), path)) is LogLocked
    assert type(from_sqlite(_sqlite_error(266, "x"), path)) is LogDiskFull  # SQLITE_IOERR_READ
    assert type(from_sqlite(_sqlite_error(11, "malformed"), path)) is LogUnavailable
    # And a real one: a write while another connection holds the database.
    open_db(path).conn.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("begin exclusive")
    writer = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError) as err:
            writer.execute("insert into tools (hash, tools, created_at) values ('h', '[]', 0)")
        assert type(from_sqlite(err.value, path)) is LogLocked
    finally:
        holder.execute("rollback")
        holder.close()
        writer.close()


def test_cli_logs_show_of_a_missing_id_is_not_found_and_bad_usage_exits_2(tmp_path, capsys):
    open_db(tmp_path / "logs.db").conn.close()
    assert main(["logs", "show", "12345", "--data-dir", str(tmp_path)]) == 1
    assert "[not_found]" in capsys.readouterr().err
    assert main(["logs"]) == 2 and "ACTION" in capsys.readouterr().out  # the group's help
    with pytest.raises(SystemExit) as exit_:
        main(["logs", "show", "not-a-number", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
