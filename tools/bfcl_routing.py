"""The escalation replay of a BFCL run: what routing by confidence would have done.

Every local answer carries Outpost's confidence; per threshold t, the calls at or
above t stay local and the rest go to the cloud. From one run this gives, for every
threshold, the share kept local, their accuracy, and (when the cloud was asked too)
the end-to-end accuracy and the cloud tokens; over all thresholds, the AUROC of
confidence as a predictor of a right call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class Scored(Protocol):
    """One question's outcome as the replay reads it (tools/bfcl.py's `Outcome`)."""

    score: float | None  # the local answer's confidence
    ast: bool  # the local answer was right
    cloud_ast: bool | None  # the cloud's was (None: not asked)
    cloud_tokens: int


def auroc(scores: list[float], correct: list[bool]) -> float | None:
    """Probability that a right answer scores above a wrong one (ties count half)."""
    pos = [s for s, c in zip(scores, correct) if c]
    neg = [s for s, c in zip(scores, correct) if not c]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def routing(outcomes: Sequence[Scored], thresholds: list[float]) -> dict[str, Any]:
    scored = [o for o in outcomes if o.score is not None]
    n = len(scored)
    rows = []
    for t in thresholds:
        kept = [o for o in scored if o.score >= t]
        row: dict[str, Any] = {
            "threshold": t, "kept_share": len(kept) / n if n else None,
            "kept_accuracy": sum(o.ast for o in kept) / len(kept) if kept else None}
        if any(o.cloud_ast is not None for o in scored):
            sent = [o for o in scored if o.score < t]
            row["end_to_end_accuracy"] = (sum(o.ast for o in kept) + sum(bool(o.cloud_ast) for o in sent)) / n
            row["cloud_tokens"] = sum(o.cloud_tokens for o in sent)
        rows.append(row)
    return {"n": n, "local_accuracy": sum(o.ast for o in scored) / n if n else None,
            "auroc": auroc([o.score for o in scored], [o.ast for o in scored]), "thresholds": rows}


def routing_table(r: dict[str, Any]) -> str:
    cloud = r["thresholds"] and "end_to_end_accuracy" in r["thresholds"][0]
    auc = "-" if r["auroc"] is None else f"{r['auroc']:.3f}"
    lines = [f"escalation replay over {r['n']} calls: local accuracy {100 * r['local_accuracy']:.1f}%, "
             f"AUROC of confidence {auc}",
             f"{'threshold':>9}  {'kept local':>10}  {'accuracy kept':>13}"
             + (f"  {'end-to-end':>10}  {'cloud tokens':>12}" if cloud else "")]
    for row in r["thresholds"]:
        acc = "-" if row["kept_accuracy"] is None else f"{100 * row['kept_accuracy']:.1f}%"
        line = f"{row['threshold']:>9.2f}  {100 * row['kept_share']:>9.1f}%  {acc:>13}"
        if cloud:
            line += f"  {100 * row['end_to_end_accuracy']:>9.1f}%  {row['cloud_tokens']:>12}"
        lines.append(line)
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib  # the `curate` extra; only --plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [row for row in r["thresholds"] if row["kept_accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([100 * row["kept_share"] for row in rows], [100 * row["kept_accuracy"] for row in rows],
            marker="o", label="accuracy of the calls kept local")
    if rows and "end_to_end_accuracy" in rows[0]:
        ax.plot([100 * row["kept_share"] for row in rows],
                [100 * row["end_to_end_accuracy"] for row in rows], marker="s", label="end to end (rest to the cloud)")
    ax.axhline(100 * r["local_accuracy"], color="grey", linestyle="--", label="everything local")
    last = None
    for row in rows:  # label thresholds where the curve has moved on visibly
        if last is not None and abs(row["kept_share"] - last) < 0.06:
            continue
        last = row["kept_share"]
        ax.annotate(f"{row['threshold']:.2f}", (100 * row["kept_share"], 100 * row["kept_accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("calls kept local (%)")
    ax.set_ylabel("AST accuracy (%)")
    auc = "-" if r["auroc"] is None else f"{r['auroc']:.2f}"
    ax.set_title(f"{title} (AUROC {auc})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
