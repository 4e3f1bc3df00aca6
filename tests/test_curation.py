"""The log as training data: export (targets, formats, redaction, dedupe, split),
task clustering, stats, retention. Rows are written through the LogStore, the same
writer the daemon uses, into a real SQLite file; the CLI reads it as a user would."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from outpost.runtime.logs import retention, schema
from outpost.runtime.logs import store as logstore
from outpost.runtime.logs.records import AttemptRecord, RequestRecord
from outpost.runtime.cli import main
from outpost.runtime.logs.clusters import clusters
from outpost.runtime.logs.export import Filters, choose_target, export, val_path_for
from outpost.runtime.logs.stats import stats
from outpost.runtime.logs.redact import Redactor, luhn_ok

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MAIL = [{"type": "function", "function": {"name": "send_mail", "parameters": {
    "type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
    "required": ["to", "body"]}}}]


def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def log(store: logstore.LogStore, text: str, tools: list | None, calls: list | None = None,
        content: str | None = None, confidence: float | None = 0.95, valid: bool = True,
        cloud: dict[str, Any] | None = None, model: str = "smollm2-135m-instruct",
        task: str = "tool_call", error: str | None = None, total_ms: float = 100.0) -> int:
    request = RequestRecord(method="chat", model_requested=None, model=model, model_version="1",
                            task=task, policy=None, messages=[{"role": "user", "content": text}],
                            tools=tools, tool_choice=None, params={"parallel_tool_calls": False},
                            tool_calls=calls, content=content, error_code=error,
                            timings={"total": total_ms})
    attempts = [] if error else [AttemptRecord(
        kind="local", model=model, model_version="1", output=content or json.dumps(calls),
        tool_calls=calls, confidence=confidence, prompt_tokens=40, completion_tokens=10,
        validation=[{"name": c["function"]["name"], "valid": valid, "errors": []} for c in calls or []])]
    if cloud is not None:
        attempts.append(AttemptRecord(kind="cloud", model="gpt-cloud", model_version="", output="",
                                      tool_calls=cloud.get("calls"), cost_usd=cloud.get("cost", 0.01),
                                      error_code=cloud.get("error"),
                                      validation=[{"name": c["function"]["name"], "valid": True, "errors": []}
                                                  for c in cloud.get("calls") or []]))
    return asyncio.run(store.record(request, attempts))


@pytest.fixture
def store(tmp_path):
    s = logstore.LogStore(tmp_path / "data" / "logs.db")
    yield s
    s.close()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- redaction -------------------------------------------------------------------------------
PLANTED = {
    "email": ["ana.lopez@example.com", "ops+alerts@fleet.example.org"],
    "phone": ["+1 415-555-0132", "(030) 1234 5678"],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004"],
    "ip": ["10.0.3.17", "fe80::1ff:fe23:4567:890a"],
    "api_key": ["sk-proj-abcDEF1234567890abcdEFGH", "ghp_" + "a1B2" * 9],
    "badge": ["BADGE-004211"],
}
INNOCENT = ("order 1234567890 qty 12, version 1.2.3, at 10:30:00, card 4111111111111112, "
            "sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("5500000000000004")
    assert not luhn_ok("4111111111111112")


def test_redaction_counts_every_planted_kind_and_spares_lookalikes():
    r = Redactor({"badge": r"BADGE-\d{6}"})
    text = " | ".join(v for vs in PLANTED.values() for v in vs)
    out = r.text(text + " | " + INNOCENT)
    assert dict(r.counts) == {k: len(v) for k, v in PLANTED.items()}
    for values in PLANTED.values():
        for v in values:
            assert v not in out
    assert INNOCENT in out  # nothing that only looks like PII was touched


# -- export ------------------------------------------------------------------------------------
def fill(store: logstore.LogStore) -> dict[str, int]:
    """A session with one request of each kind of outcome; returns name -> log id."""
    ids = {}
    ids["confident"] = log(store, "Weather in Lyon? reply to ana.lopez@example.com", WEATHER,
                           [call("get_weather", {"city": "Lyon"})])
    ids["duplicate"] = log(store, "Weather in Lyon? reply to ana.lopez@example.com", WEATHER,
                           [call("get_weather", {"city": "Lyon"})])
    ids["doubtful"] = log(store, "Weather in Oslo?", WEATHER, [call("get_weather", {"city": "Oslo"})],
                          confidence=0.3)
    ids["good_feedback"] = log(store, "Weather in Kyiv?", WEATHER, [call("get_weather", {"city": "Kyiv"})],
                               confidence=0.2)
    ids["bad_feedback"] = log(store, "Weather in Rome?", WEATHER, [call("get_weather", {"city": "Rome"})])
    ids["invalid"] = log(store, "Weather in Bonn?", WEATHER, [call("get_weather", {"town": "Bonn"})],
                         valid=False)
    ids["escalated"] = log(store, "Mail 10.0.3.17 status to ops+alerts@fleet.example.org", MAIL,
                           [call("send_mail", {"to": "ops", "body": "x"})], confidence=0.1,
                           cloud={"calls": [call("send_mail", {"to": "ops+alerts@fleet.example.org",
                                                               "body": "10.0.3.17 is up; card 4111 1111 1111 1111"})]})
    ids["text"] = log(store, "Say hi, my number is +1 415-555-0132", None, content="Hi! I'll call +1 415-555-0132.")
    ids["error"] = log(store, "boom", WEATHER, error="timeout")
    for name, outcome in (("good_feedback", "good"), ("bad_feedback", "bad")):
        asyncio.run(store.record_feedback(ids[name], outcome, None))
    return ids


def test_export_picks_targets_redacts_dedupes_and_round_trips(tmp_path, store, capsys):
    fill(store)
    out = tmp_path / "ft" / "train.jsonl"
    code = main(["logs", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    examples = lines(out) + lines(val_path_for(out))
    # confident, good feedback, escalated (cloud target), text; the duplicate dropped.
    assert report["examples"] == len(examples) == 4 and report["duplicates"] == 1
    assert report["sources"] == {"local": 3, "cloud": 1}
    assert report["skipped"] == {"low confidence": 1, "feedback bad": 1, "local answer invalid": 1}
    # planted PII: one email in the user turn (kept once, the duplicate is gone), the
    # escalated request's email + IP in its prompt and in the cloud's arguments, a
    # card in the arguments, the phone number twice in the text example.
    assert report["redacted"] == {"email": 3, "ip": 2, "card": 1, "phone": 2}
    blob = out.read_text() + val_path_for(out).read_text()
    for secret in ("ana.lopez@example.com", "10.0.3.17", "4111 1111 1111 1111", "415-555-0132"):
        assert secret not in blob
    by_first = {e["messages"][0]["content"][:12]: e for e in examples}
    cloud = by_first["Mail [IP] st"]
    target = cloud["messages"][-1]
    assert target["role"] == "assistant" and target["tool_calls"][0]["function"]["name"] == "send_mail"
    args = json.loads(target["tool_calls"][0]["function"]["arguments"])  # openai: a JSON string
    assert args == {"to": "[EMAIL]", "body": "[IP] is up; card [CARD]"}
    assert cloud["tools"] == MAIL and cloud["parallel_tool_calls"] is False
    text = by_first["Say hi, my n"]
    assert "tools" not in text and text["messages"][-1]["content"] == "Hi! I'll call [PHONE]."

    # Unfiltered: the watermark moves to the newest request considered.
    db = schema.open_db(tmp_path / "data" / "logs.db")
    assert retention.watermark(db) == report["max_request_id"]

    # hf: arguments are objects; the split is the same on every run.
    hf = tmp_path / "ft" / "hf.jsonl"
    again = export(db, hf, "hf", min_confidence=0.8)
    assert again.train == report["train"] and again.val == report["val"]
    for e in lines(hf) + lines(val_path_for(hf)):
        for m in e["messages"]:
            for c in m.get("tool_calls", []):
                assert isinstance(c["function"]["arguments"], dict)
    repeat = export(db, tmp_path / "ft" / "again.jsonl", "openai")
    assert (tmp_path / "ft" / "again.jsonl").read_text() == out.read_text()
    assert repeat.val == report["val"]


def test_export_filters_and_escalated_only(tmp_path, store):
    fill(store)
    log(store, "Weather in Gent?", WEATHER, [call("get_weather", {"city": "Gent"})], model="other")
    db = schema.open_db(tmp_path / "data" / "logs.db")
    only_other = export(db, tmp_path / "o.jsonl", filters=Filters(model="other"))
    assert only_other.examples == 1
    assert retention.watermark(db) == 0  # a filtered export is not a backup of the log
    esc = export(db, tmp_path / "e.jsonl", filters=Filters(escalated=True))
    assert esc.examples == 1 and esc.sources == {"cloud": 1}
    future = export(db, tmp_path / "f.jsonl", filters=Filters(since=time.time() + 60))
    assert future.examples == 0


def test_choose_target_rules():
    ok = {"output": "x", "tool_calls": [call("f", {})], "validation": [{"valid": True}], "confidence": 0.9}
    assert choose_target(ok, None, None, 0.8, False)[1] == "local"
    assert choose_target({**ok, "repaired": 1}, None, None, 0.8, False) == (None, "local answer repaired")
    assert choose_target({**ok, "repaired": 1}, None, "good", 0.8, False)[1] == "local"
    assert choose_target(ok, {**ok, "error_code": "timeout"}, None, 0.8, True) == (None, "cloud answer invalid")


def test_cli_export_refuses_a_bad_since(tmp_path, store, capsys):
    fill(store)
    code = main(["logs", "export", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "x.jsonl"),
                 "--since", "last tuesday"])
    assert code == 1 and "--since" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


# -- clustering ------------------------------------------------------------------------------
def test_clustering_separates_two_task_families(tmp_path, store, capsys):
    cities = ["Lyon", "Oslo", "Kyiv", "Rome", "Bonn", "Gent", "Riga", "Lima", "Pune", "Oulu", "Turin", "Porto"]
    for i, city in enumerate(cities * 2):
        log(store, f"What is the weather like in {city} today? Is it going to rain at {i} pm?", WEATHER,
            [call("get_weather", {"city": city})], cloud={"calls": [call("get_weather", {"city": city})]}
            if i % 2 else None)
    for i, city in enumerate(cities * 2):
        log(store, f"How many hours of daylight does {city} get in winter compared to {i} years ago?",
            WEATHER, [call("get_weather", {"city": city})])
    for i in range(6):
        log(store, f"Send the report number {i} to the team", MAIL, [call("send_mail", {"to": "t", "body": "r"})])
    result = clusters(schema.open_db(tmp_path / "data" / "logs.db"))
    found = result["clusters"]
    assert result["requests"] == 54
    weather = [c for c in found if c["tools"] == "get_weather"]
    assert sorted(c["size"] for c in weather) == [24, 24]
    rainy = next(c for c in weather if "rain" in c["label"] or "weather" in c["label"])
    assert all("weather like" in e for e in rainy["examples"])
    assert rainy["escalation_rate"] == 0.5 and rainy["suggestion"].startswith("specialise")
    assert [c["size"] for c in found if c["tools"] == "send_mail"] == [6]
    # the CLI prints the same table
    assert main(["logs", "clusters", "--data-dir", str(tmp_path / "data")]) == 0
    assert "specialise an SLM" in capsys.readouterr().out


# -- stats -------------------------------------------------------------------------------------
def test_stats_per_model_and_task(tmp_path, store, capsys):
    fill(store)
    result = stats(schema.open_db(tmp_path / "data" / "logs.db"), local_per_1k_tokens=0.001)
    total = result["total"]
    assert total["requests"] == 9 and total["errors"] == 1
    assert total["escalation_rate"] == round(1 / 9, 4)
    # local attempts with calls: 7, of which one invalid
    assert total["validity_rate"] == round(6 / 7, 4)
    # successes: good feedback 1; no feedback: confident, duplicate, doubtful (valid), escalated (cloud valid), text
    assert total["success_rate"] == round(6 / 9, 4)
    cost = 0.01 + 8 * 50 / 1000 * 0.001
    assert total["cost_per_success_usd"] == round(cost / 6, 6)
    assert total["latency_ms"]["p50"] == 100.0
    assert main(["logs", "stats", "--data-dir", str(tmp_path / "data")]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


# -- retention ---------------------------------------------------------------------------------
def test_retention_keeps_what_has_not_left_the_device(tmp_path, store):
    ids = [log(store, f"Weather in city {i}? " + "padding " * 400, WEATHER,
               [call("get_weather", {"city": str(i)})]) for i in range(60)]
    db = schema.open_db(tmp_path / "data" / "logs.db")
    db.execute("update requests set created_at = created_at - 100 * 86400 where id <= ?", [ids[29]])
    db.conn.commit()
    # Nothing exported yet: old rows are held, not deleted.
    first = retention.prune(db, 90 * 86400, None, time.time())
    assert first["deleted_by_age"] == 0 and first["held"] == 30
    retention.set_watermark(db, "export", ids[19])
    second = retention.prune(db, 90 * 86400, None, time.time())
    assert second["deleted_by_age"] == 20 and second["held"] == 10
    left = [r[0] for r in db.execute("select id from requests order by id")]
    assert left == ids[20:]
    assert db.execute("select count(*) from attempts where request_id <= ?", [ids[19]]).fetchone()[0] == 0
    # Size: prune the oldest until under the cap, never past the watermark.
    retention.set_watermark(db, "sync", ids[49])
    third = retention.prune(db, None, 1, time.time())  # a cap no log can meet
    assert third["deleted_by_size"] == 30 and third["held"] == 10
    assert [r[0] for r in db.execute("select id from requests order by id")] == ids[50:]
    retention.set_watermark(db, "sync", ids[59])
    cap = retention.used_bytes(db) - 12_000  # a few rows' worth
    fourth = retention.prune(db, None, cap, time.time())
    assert 0 < fourth["deleted_by_size"] < 10 and fourth["bytes"] <= cap
    assert [r[0] for r in db.execute("select id from requests order by id")] == ids[60 - (10 - fourth["deleted_by_size"]):]
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_export_to_an_unwritable_place_is_a_typed_error_and_leaves_nothing(tmp_path, store, capsys):
    fill(store)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "train.jsonl"  # its parent is a file
    code = main(["logs", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert code == 1 and "[bad_request]" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"
    db = schema.open_db(tmp_path / "data" / "logs.db")
    assert retention.watermark(db) == 0  # nothing exported, nothing may be pruned
