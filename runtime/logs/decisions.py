"""The log's turns whose right call-or-answer decision is known: what `outpost models
calibrate` fits a model's decision rule on, and what `logs stats` scores decisions by.

A turn counts when the agent offered tools and left the choice to the model
(`tool_choice: auto`). Its right decision, the label, comes from:

    the cloud answered it (escalated, or asked in shadow)   ->  the cloud's: did it call?
    an agent's latest feedback on it is "good"              ->  the local model's own decision
    otherwise                                               ->  unlabelled: left out

"bad" feedback labels nothing: it says the answer was wrong, not whether calling was.
A cloud attempt that failed (an error, or a call that failed its schema) labels nothing
either.

What this module must not do: write to the log, or run a model (calibrate does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import sqlite_utils

Source = Literal["cloud", "feedback"]


def label(local: str | None, cloud: str | None, cloud_error: str | None, cloud_validation: str | None,
          feedback: str | None) -> tuple[bool, Source] | None:
    """(a call was the right decision, where that is known from), or None: unlabelled.
    `local` and `cloud` are the attempts' recorded decisions ("call" / "answer");
    `cloud_validation` the cloud attempt's validation column (JSON: one entry a call)."""
    cloud_valid = all(v.get("valid") for v in json.loads(cloud_validation)) if cloud_validation else True
    if cloud is not None and not cloud_error and cloud_valid:
        return cloud == "call", "cloud"
    if feedback == "good" and local is not None:
        return local == "call", "feedback"
    return None


@dataclass(frozen=True)
class LabelledTurn:
    """One logged auto turn with its right decision."""

    request_id: int
    model: str  # the id that answered (a task adapter's, or the model's)
    version: str
    task: str | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    parallel_tool_calls: bool
    call: bool  # the right decision was a call
    source: Source
    local: str | None  # what the local model decided then ("call" / "answer"), if it did
    local_rule: str | None  # whose rule decided it


# The latest local and cloud attempt of each auto request with tools, and its feedback.
_SQL = """
    select r.id, r.model, r.model_version, r.task, r.messages, r.params, t.tools,
           l.decision as l_decision, l.decision_rule as l_rule,
           c.decision as c_decision, c.error_code as c_error, c.validation as c_validation,
           (select outcome from feedback f where f.request_id = r.id order by f.id desc limit 1)
               as outcome
    from requests r
    join tools t on t.hash = r.tools_hash
    left join attempts l on l.id = (select max(id) from attempts
                                    where request_id = r.id and kind = 'local')
    left join attempts c on c.id = (select max(id) from attempts
                                    where request_id = r.id and kind = 'cloud')
    where r.tool_choice = 'auto' {where}
    order by r.id"""


def labelled_turns(db: sqlite_utils.Database, model: str | None = None, task: str | None = None,
                   since: float | None = None) -> Iterator[LabelledTurn]:
    """Every labelled auto turn, oldest first; `model`: those it answered (any version)."""
    where, args = [], []
    for column, value in (("r.model", model), ("r.task", task)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("r.created_at >= ?")
        args.append(since)
    sql = _SQL.format(where="".join(f" and {w}" for w in where))
    for r in db.query(sql, args):
        known = label(r["l_decision"], r["c_decision"], r["c_error"], r["c_validation"], r["outcome"])
        if known is None:
            continue
        params = json.loads(r["params"]) if r["params"] else {}
        yield LabelledTurn(
            request_id=r["id"], model=r["model"], version=r["model_version"], task=r["task"],
            messages=json.loads(r["messages"]), tools=json.loads(r["tools"]),
            parallel_tool_calls=bool(params.get("parallel_tool_calls", True)), call=known[0],
            source=known[1], local=r["l_decision"], local_rule=r["l_rule"])
