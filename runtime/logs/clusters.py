"""Task clustering: which kinds of request are worth a specialised model?

    requests --group by tool-set signature--> families --TF-IDF + k-means--> clusters

A tool set is the strongest hint of a task (an agent that offers `get_weather` and
`get_forecast` is doing one job), so requests are first grouped by the sorted names
of the tools they offered. Within a group, the last user message is turned into
TF-IDF vectors (words and word pairs, numbers folded into one token, since "order
1234" and "order 9876" are the same task) and split with k-means. k runs from 1 to
a few and the best cosine silhouette wins; a split that does not reach
`MIN_SILHOUETTE` is not a split. Everything is seeded: the same log gives the same
clusters. No model is downloaded: scikit-learn only (the `curate` extra).

The suggestion per cluster follows the survey's S3 step: a large cluster that
escalates often is where a fine-tuned SLM pays for itself.

What this module must not do: write to the log; it only reads.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from outpost.manifests.errors import ConfigError

MAX_K = 8
MIN_CLUSTER = 5  # no cluster smaller than this is split off
MIN_SILHOUETTE = 0.1
# Suggestion thresholds: share of all traffic, escalation rate, validity.
LARGE_SHARE = 0.10
OFTEN_ESCALATED = 0.25


@dataclass
class Cluster:
    signature: str
    label: str
    ids: list[int]
    rows: list[dict[str, Any]]

    def summary(self, total: int) -> dict[str, Any]:
        n = len(self.rows)
        escalated = sum(r["escalated"] for r in self.rows)
        with_calls = [r for r in self.rows if r["calls"]]
        valid = sum(r["valid"] for r in with_calls)
        conf = [r["confidence"] for r in self.rows if r["confidence"] is not None]
        good = [r for r in self.rows if r["outcome"] is not None]
        share = n / total if total else 0.0
        esc_rate = escalated / n if n else 0.0
        validity = valid / len(with_calls) if with_calls else None
        return {
            "tools": self.signature, "label": self.label, "size": n, "share": round(share, 4),
            "local_validity": None if validity is None else round(validity, 4),
            "mean_confidence": round(sum(conf) / len(conf), 4) if conf else None,
            "feedback_good_rate": (round(sum(r["outcome"] == "good" for r in good) / len(good), 4)
                                   if good else None),
            "escalation_rate": round(esc_rate, 4),
            "cloud_cost_usd": round(sum(r["cost"] for r in self.rows), 6),
            "suggestion": suggest(share, esc_rate, validity),
            "examples": [r["text"][:80] for r in self.rows[:3]],
        }


def suggest(share: float, escalation_rate: float, validity: float | None) -> str:
    if share >= LARGE_SHARE and escalation_rate >= OFTEN_ESCALATED:
        return "specialise an SLM: a large share of traffic that escalates often"
    if validity is not None and validity < 0.7:
        return "look at the tools and prompts: local calls are often invalid"
    if share >= LARGE_SHARE and escalation_rate < 0.05:
        return "served locally: keep"
    return "-"


def _text(messages: str) -> str:
    for m in reversed(json.loads(messages)):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def _normalise(text: str) -> str:
    return re.sub(r"\d+(?:[.,]\d+)*", " num ", text.lower())


def load_rows(db: sqlite_utils.Database, since: float | None = None) -> list[dict[str, Any]]:
    where, args = ("where r.created_at >= ?", [since]) if since is not None else ("", [])
    out = []
    for r in db.query(f"""
            select r.id, r.messages, t.tools, l.tool_calls, l.validation, l.repaired, l.confidence,
                   (select count(*) from attempts c where c.request_id = r.id and c.kind = 'cloud') as esc,
                   (select coalesce(sum(cost_usd), 0) from attempts c where c.request_id = r.id) as cost,
                   (select outcome from feedback f where f.request_id = r.id
                    order by f.id desc limit 1) as outcome
            from requests r left join tools t on t.hash = r.tools_hash
            left join attempts l on l.id = (select max(id) from attempts
                                            where request_id = r.id and kind = 'local')
            {where} order by r.id""", args):
        tools = json.loads(r["tools"]) if r["tools"] else []
        names = sorted(t.get("function", {}).get("name", "?") for t in tools)
        validation = json.loads(r["validation"]) if r["validation"] else []
        out.append({"id": r["id"], "signature": ",".join(names) or "(no tools)",
                    "text": _text(r["messages"]), "calls": bool(r["tool_calls"]),
                    "valid": all(v.get("valid") for v in validation) and not r["repaired"],
                    "confidence": r["confidence"], "escalated": bool(r["esc"]),
                    "cost": float(r["cost"] or 0.0), "outcome": r["outcome"]})
    return out


def _split(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """k-means over TF-IDF of one tool-set family; [(label, rows)]."""
    try:
        from sklearn.cluster import KMeans
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.metrics import silhouette_score
    except ImportError:
        raise ConfigError("task clustering needs scikit-learn: pip install 'outpost[curate]'") from None
    texts = [_normalise(r["text"]) for r in rows]
    try:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, stop_words="english")
        X = vec.fit_transform(texts)
    except ValueError:  # nothing but stop words
        return [("", rows)]
    terms = vec.get_feature_names_out()

    def label(center: Any) -> str:
        return " ".join(terms[i] for i in center.argsort()[::-1][:4] if center[i] > 0)

    best: tuple[float, Any] | None = None
    distinct = len(set(texts))
    for k in range(2, min(MAX_K, len(rows) // MIN_CLUSTER, distinct) + 1):
        with warnings.catch_warnings():  # identical prompts: fewer clusters than asked
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=k, n_init=10, random_state=0).fit(X)
        sizes = [int((km.labels_ == i).sum()) for i in range(k)]
        if min(sizes) < MIN_CLUSTER or len(set(km.labels_)) < 2:
            continue
        score = silhouette_score(X, km.labels_, metric="cosine",
                                 sample_size=min(len(rows), 2000), random_state=0)
        if score >= MIN_SILHOUETTE and (best is None or score > best[0]):
            best = (score, km)
    if best is None:
        center = X.mean(axis=0).A1
        return [(label(center), rows)]
    km = best[1]
    return [(label(km.cluster_centers_[i]), [r for r, lab in zip(rows, km.labels_) if lab == i])
            for i in range(km.n_clusters)]


def clusters(db: sqlite_utils.Database, since: float | None = None) -> dict[str, Any]:
    rows = load_rows(db, since)
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        families.setdefault(r["signature"], []).append(r)
    found: list[Cluster] = []
    for signature, members in families.items():
        for lab, part in _split(members):
            found.append(Cluster(signature, lab, [r["id"] for r in part], part))
    found.sort(key=lambda c: -len(c.rows))
    return {"requests": len(rows), "clusters": [c.summary(len(rows)) for c in found]}
