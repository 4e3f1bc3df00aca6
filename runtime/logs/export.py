"""The log as fine-tuning data: `outpost logs export`.

Each logged request that has a trustworthy answer becomes one chat+tools example:
the agent's messages, the tools it offered, and the answer as the assistant's last
turn. Which answer is the target:

    the request was escalated and the cloud answered validly  ->  the cloud's (distillation)
    an agent reported the answer bad                          ->  none: skipped
    an agent reported it good                                 ->  the local answer
    the local answer's confidence >= min_confidence           ->  the local answer
    otherwise                                                 ->  none: skipped

A local answer whose calls failed validation, or were closed early by the loop or
length guard (`repaired`), is a target only with an agent's "good".

Then every string is redacted (redact.py), exact duplicates are dropped, and each
example goes to the training or the validation file by a hash of its content, so
the split is the same on every run and a re-export never moves an example across.

Formats, one JSON object per line:
  openai  {"messages": [...], "tools": [...], "parallel_tool_calls": bool}; tool-call
          arguments are JSON strings (OpenAI's fine-tuning format).
  hf      {"messages": [...], "tools": [...]}; tool-call arguments are objects, as
          Hugging Face chat templates and TRL's SFTTrainer take them.

What this module must not do: send anything off the device; it writes files, and
the sync layer (later) decides what leaves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import Counter
from datetime import datetime
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from outpost.manifests.errors import BadRequest

from .retention import set_watermark
from .schema import insert
from .redact import Redactor

FORMATS = ("openai", "hf")


@dataclass(frozen=True)
class Filters:
    task: str | None = None
    model: str | None = None
    since: float | None = None  # unix time
    escalated: bool = False  # only requests that went to the cloud

    @property
    def none(self) -> bool:
        return not (self.task or self.model or self.since is not None or self.escalated)


@dataclass
class Report:
    examples: int = 0
    train: int = 0
    val: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> requests
    sources: Counter[str] = field(default_factory=Counter)  # local | cloud
    redacted: Counter[str] = field(default_factory=Counter)  # kind -> replacements
    max_request_id: int = 0
    train_path: str = ""
    val_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "train": self.train, "val": self.val,
                "duplicates": self.duplicates, "skipped": dict(self.skipped),
                "sources": dict(self.sources), "redacted": dict(self.redacted),
                "max_request_id": self.max_request_id,
                "train_path": self.train_path, "val_path": self.val_path}


def parse_since(text: str) -> float:
    """`7d`, `12h`, `30m` ago, or an ISO date/time; as unix time."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"--since {text!r}: give an age (7d, 12h, 30m) or an ISO date "
                         f"(2026-11-01 or 2026-11-01T08:00)", field="since") from None
    return moment.timestamp()


def val_path_for(out: Path) -> Path:
    """train.jsonl -> train.val.jsonl (next to it)."""
    return out.with_name(f"{out.stem}.val{out.suffix or '.jsonl'}")


# -- choosing the target ------------------------------------------------------------------
def _all_valid(validation: Any) -> bool:
    return all(v.get("valid") for v in validation or [])


def _usable(attempt: dict[str, Any]) -> bool:
    return (not attempt.get("error_code") and _all_valid(attempt.get("validation"))
            and (attempt.get("output") is not None or attempt.get("tool_calls")))


def choose_target(local: dict[str, Any] | None, cloud: dict[str, Any] | None,
                  feedback: str | None, min_confidence: float,
                  escalated_only: bool) -> tuple[dict[str, Any] | None, str]:
    """(attempt to learn from, its source) or (None, why not)."""
    if cloud is not None and _usable(cloud):
        return cloud, "cloud"
    if escalated_only:
        return None, "not escalated" if cloud is None else "cloud answer invalid"
    if local is None:
        return None, "no local answer"
    if feedback == "bad":
        return None, "feedback bad"
    if feedback == "good":
        return (local, "local") if not local.get("error_code") else (None, "error")
    if not _usable(local):
        return None, "local answer invalid"
    if local.get("repaired"):
        return None, "local answer repaired"
    confidence = local.get("confidence")
    if confidence is None or confidence < min_confidence:
        return None, "low confidence"
    return local, "local"


# -- reading the log ------------------------------------------------------------------------
def _rows(db: sqlite_utils.Database, filters: Filters, up_to: int) -> Iterator[dict[str, Any]]:
    where, args = ["r.error_code is null", "r.id <= ?"], [up_to]
    if filters.model:
        where.append("r.model = ?")
        args.append(filters.model)
    if filters.task:
        where.append("r.task = ?")
        args.append(filters.task)
    if filters.since is not None:
        where.append("r.created_at >= ?")
        args.append(filters.since)
    if filters.escalated:
        where.append("exists (select 1 from attempts c where c.request_id = r.id and c.kind = 'cloud')")
    sql = (f"select r.id, r.messages, r.params, t.tools from requests r "
           f"left join tools t on t.hash = r.tools_hash where {' and '.join(where)} order by r.id")
    for row in db.query(sql, args):
        yield row


def _attempts(db: sqlite_utils.Database, request_id: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for a in db.query("select kind, output, tool_calls, validation, error_code, repaired, confidence "
                      "from attempts where request_id = ? order by id", [request_id]):
        for key in ("tool_calls", "validation"):
            if isinstance(a.get(key), str):
                a[key] = json.loads(a[key])
        out[a["kind"]] = a  # the last of each kind
    return out


def _feedback(db: sqlite_utils.Database, request_id: int) -> str | None:
    row = db.execute("select outcome from feedback where request_id = ? order by id desc limit 1",
                     [request_id]).fetchone()
    return row[0] if row else None


# -- writing examples ---------------------------------------------------------------------
def _calls(calls: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        fn = call.get("function", {})
        args = fn.get("arguments")
        if fmt == "hf" and isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass  # kept as the string it was
        elif fmt == "openai" and not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        entry = {"type": "function", "function": {"name": fn.get("name"), "arguments": args}}
        if fmt == "openai" and call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _message(msg: dict[str, Any], fmt: str) -> dict[str, Any]:
    out = {k: v for k, v in msg.items() if k in ("role", "content", "name", "tool_call_id")}
    if msg.get("tool_calls"):
        out["tool_calls"] = _calls(msg["tool_calls"], fmt)
    return out


def example(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            target: dict[str, Any], fmt: str, parallel: bool) -> dict[str, Any]:
    answer: dict[str, Any] = {"role": "assistant", "content": None}
    if target.get("tool_calls"):
        answer["tool_calls"] = _calls(target["tool_calls"], fmt)
    else:
        answer["content"] = target.get("output") or ""
    out: dict[str, Any] = {"messages": [_message(m, fmt) for m in messages] + [answer]}
    if tools:
        out["tools"] = tools
    if fmt == "openai" and tools:
        out["parallel_tool_calls"] = parallel
    return out


def _one(db: sqlite_utils.Database, row: dict[str, Any], fmt: str, filters: Filters,
         min_confidence: float, redactor: Redactor, seen: set[str],
         report: Report) -> tuple[str | None, str, str]:
    """(redacted JSONL line or None when skipped or a duplicate, its sha256, source)."""
    attempts = _attempts(db, row["id"])
    target, source = choose_target(attempts.get("local"), attempts.get("cloud"),
                                   _feedback(db, row["id"]), min_confidence, filters.escalated)
    if target is None:
        report.skipped[source] += 1
        return None, "", source
    params = json.loads(row["params"]) if row.get("params") else {}
    tools = json.loads(row["tools"]) if row.get("tools") else None
    ex = example(json.loads(row["messages"]), tools, target, fmt,
                 bool(params.get("parallel_tool_calls", True)))
    before = Counter(redactor.counts)
    line = json.dumps(redactor.value(ex), ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(line.encode()).hexdigest()
    if digest in seen:  # counts are of what was written: a dropped copy's go too
        redactor.counts = before
        report.duplicates += 1
        return None, digest, source
    seen.add(digest)
    return line, digest, source


def export(db: sqlite_utils.Database, out: Path, fmt: str = "openai", filters: Filters = Filters(),
           min_confidence: float = 0.8, val_share: float = 0.1,
           redact: dict[str, str] | None = None, progress: Any = None,
           advance_watermark: bool | None = None) -> Report:
    """Write the training and validation JSONL files; returns what happened.

    An export without filters (the default) advances the `export` watermark to the
    newest request it considered, which lets retention prune what came before.
    """
    if fmt not in FORMATS:
        raise BadRequest(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="format")
    report = Report(train_path=str(out), val_path=str(val_path_for(out)))
    up_to = db.execute("select coalesce(max(id), 0) from requests").fetchone()[0]
    report.max_request_id = up_to
    redactor = Redactor(dict(redact or {}))
    seen: set[str] = set()
    train_tmp = out.with_name(out.name + ".part")
    val_tmp = val_path_for(out).with_name(val_path_for(out).name + ".part")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(train_tmp, "w") as train, open(val_tmp, "w") as val:
            for row in _rows(db, filters, up_to):
                if progress is not None:
                    progress.update(1)
                line, digest, source = _one(db, row, fmt, filters, min_confidence, redactor, seen,
                                            report)
                if line is None:
                    continue
                report.sources[source] += 1
                if int(digest[:8], 16) / 0x1_0000_0000 < val_share:
                    val.write(line + "\n")
                    report.val += 1
                else:
                    train.write(line + "\n")
                    report.train += 1
        train_tmp.replace(out)  # complete files only, never half an export
        val_tmp.replace(val_path_for(out))
    except OSError as exc:
        for part in (train_tmp, val_tmp):
            with contextlib.suppress(OSError):
                part.unlink()
        raise BadRequest(f"cannot write the export to {out}: {exc.strerror or exc}",
                         field="out", path=str(out)) from None
    report.examples = report.train + report.val
    report.redacted = redactor.counts
    with db.conn:
        db.conn.execute("BEGIN IMMEDIATE")
        insert(db.conn, "exports", {
            "created_at": time.time(), "path": str(out), "format": fmt,
            "filters": json.dumps({k: v for k, v in vars(filters).items() if v}),
            "examples": report.examples, "max_request_id": up_to})
    if filters.none if advance_watermark is None else advance_watermark:
        set_watermark(db, "export", up_to)
    return report
