"""Production metrics from the log: `outpost logs stats`.

Per model and task: requests, errors, escalation rate, validity rate, p50/p95
latency, and cost per successful task. Definitions, so the figures can be checked:

- escalated: the request has a cloud attempt.
- valid: of the local attempts that produced tool calls, the share whose every call
  validated against its schema and was not closed early by a loop or length guard.
- success: an agent's latest feedback says good; without feedback, the request
  ended without an error and its answer (the cloud's if it was used) was valid.
- cost per successful task: (cloud cost, as logged per attempt, plus local tokens
  times `[costs] local_per_1k_tokens`) summed over all requests, divided by the
  successes; the price of the failures is part of the price of a success.
- decisions (tool_choice auto): the requests whose local attempt decided between
  calling and answering; decision accuracy: of those the cloud also answered (shadow,
  or escalated), the share where the local decision (call or answer) was the cloud's.
  An agent's feedback does not count here: "good" would only ever agree.

What this module must not do: write to the log; it only reads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from .decisions import label


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class _Group:
    requests: int = 0
    errors: int = 0
    escalated: int = 0
    with_calls: int = 0
    valid: int = 0
    successes: int = 0
    feedback: int = 0
    cloud_cost: float = 0.0
    local_tokens: int = 0
    latency: list[float] = field(default_factory=list)
    decisions: int = 0  # auto turns the local model decided
    checked: int = 0  # ... that the cloud answered too
    agreed: int = 0  # ... and the cloud decided the same way

    def row(self, local_per_1k: float) -> dict[str, Any]:
        cost = self.cloud_cost + self.local_tokens / 1000 * local_per_1k
        return {
            "requests": self.requests, "errors": self.errors,
            "escalation_rate": round(self.escalated / self.requests, 4) if self.requests else None,
            "validity_rate": round(self.valid / self.with_calls, 4) if self.with_calls else None,
            "success_rate": round(self.successes / self.requests, 4) if self.requests else None,
            "with_feedback": self.feedback,
            "latency_ms": {"p50": percentile(self.latency, 0.5), "p95": percentile(self.latency, 0.95)},
            "cost_usd": round(cost, 6), "local_tokens": self.local_tokens,
            "cost_per_success_usd": round(cost / self.successes, 6) if self.successes else None,
            "decisions": self.decisions, "decisions_checked": self.checked,
            "decision_accuracy": round(self.agreed / self.checked, 4) if self.checked else None,
        }


def _valid(validation: str | None, repaired: int | None) -> bool:
    items = json.loads(validation) if validation else []
    return all(v.get("valid") for v in items) and not repaired


def stats(db: sqlite_utils.Database, since: float | None = None,
          local_per_1k_tokens: float = 0.0) -> dict[str, Any]:
    """{"groups": [{model, task, ...}], "total": {...}}"""
    where, args = ("where r.created_at >= ?", [since]) if since is not None else ("", [])
    sql = f"""
        select r.id, r.model, r.task, r.error_code, json_extract(r.timings, '$.total') as total_ms,
               l.tool_calls as l_calls, l.validation as l_validation, l.repaired as l_repaired,
               l.decision as l_decision, c.decision as c_decision,
               coalesce(l.prompt_tokens, 0) + coalesce(l.completion_tokens, 0) as l_tokens,
               c.id as c_id, c.error_code as c_error, c.validation as c_validation,
               coalesce(c.cost_usd, 0) as c_cost,
               (select outcome from feedback f where f.request_id = r.id order by f.id desc limit 1)
                   as outcome
        from requests r
        left join attempts l on l.id = (select max(id) from attempts
                                        where request_id = r.id and kind = 'local')
        left join attempts c on c.id = (select max(id) from attempts
                                        where request_id = r.id and kind = 'cloud')
        {where} order by r.id"""
    groups: dict[tuple[str, str], _Group] = defaultdict(_Group)
    total = _Group()
    for r in db.query(sql, args):
        for g in (groups[(r["model"] or "-", r["task"] or "-")], total):
            g.requests += 1
            g.errors += bool(r["error_code"])
            g.escalated += r["c_id"] is not None
            g.cloud_cost += r["c_cost"] or 0.0
            g.local_tokens += r["l_tokens"] or 0
            if r["total_ms"] is not None:
                g.latency.append(float(r["total_ms"]))
            local_valid = _valid(r["l_validation"], r["l_repaired"])
            if r["l_calls"]:
                g.with_calls += 1
                g.valid += local_valid
            if r["l_decision"] is not None:
                g.decisions += 1
                known = label(r["l_decision"], r["c_decision"], r["c_error"], r["c_validation"], None)
                if known is not None:  # the cloud's decision on the same turn (decisions.py)
                    g.checked += 1
                    g.agreed += (r["l_decision"] == "call") == known[0]
            if r["outcome"] is not None:
                g.feedback += 1
                g.successes += r["outcome"] == "good"
            elif not r["error_code"]:
                if r["c_id"] is not None and not r["c_error"]:
                    g.successes += _valid(r["c_validation"], 0)
                else:
                    g.successes += local_valid
    return {"groups": [{"model": m, "task": t, **g.row(local_per_1k_tokens)}
                       for (m, t), g in sorted(groups.items())],
            "total": total.row(local_per_1k_tokens)}
