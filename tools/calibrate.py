"""`outpost models calibrate ID`: fit a model's (or a task adapter's) rule for deciding,
under `tool_choice: auto`, between calling a tool and answering; show its ROC, the
operating point and what it would change; with `--apply`, serve it as a new version.

    labelled turns: the log's auto turns whose right decision is known (the cloud's
      decision on escalated and shadow requests, and "good" feedback:
      runtime/logs/decisions.py), or --data FILE (JSON lines, public data)
      -> evidence: each turn's prompt through the model, read as serving reads it
         (models/decision.py; the prompt is evaluated, nothing is generated)
      -> fit: logistic regression, cross-validated (decision_fit.py)
      -> report: AUROC held out, the ROC, the operating point, the decisions that change
      -> --apply: version `<v>+cal<N>` = the same files and the new rule, activated after
         its smoke test; `outpost models rollback ID` brings the rule before back

A --data line is `{"messages": [...], "tools": [...], "call": true}` (`call`: a call
was the right decision), optionally with "id" and "parallel_tool_calls"; a line of
`outpost logs export` (the answer as the last message) is labelled by its answer.

What this module must not do: serve requests, or write the log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sqlite3
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import BadRequest, OutpostError
from outpost.manifests.schema import DecisionRule, Manifest
from outpost.manifests.store import ModelStore
from outpost.models.backend import AdapterRef, GenerationRequest
from outpost.models.decision import UNCALIBRATED, Evidence, Rule, probe_layout
from outpost.runtime.config import Settings
from outpost.runtime.logs import schema
from outpost.runtime.logs.decisions import labelled_turns

from . import decision_fit as fitting

RECALL_ROWS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)  # the ROC points the table shows


class NotEnoughLabels(BadRequest):
    """Too few labelled turns of one kind to fit a rule."""

    code = "not_enough_labels"

    def __init__(self, model: str, calls: int, answers: int) -> None:
        super().__init__(f"{model}: {calls} labelled turns needed a call and {answers} did not; a fit "
                         f"needs {fitting.MIN_EACH} of each (log more with escalation shadow or "
                         f"on_low_confidence, or give --data)", model=model, calls=calls, answers=answers)


@dataclass(frozen=True)
class Labelled:
    """A turn and its right decision, from the log or a file."""

    key: str  # stable: what the cross-validation folds hash
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    parallel_tool_calls: bool
    call: bool
    source: str  # cloud | feedback | file


def from_log(settings: Settings, model_id: str, task: str | None = None) -> list[Labelled]:
    db = schema.open_db(settings.log_path, settings.logs.busy_timeout_s)
    return [Labelled(key=f"request {t.request_id}", messages=t.messages, tools=t.tools,
                     parallel_tool_calls=t.parallel_tool_calls, call=t.call, source=t.source)
            for t in labelled_turns(db, model=model_id, task=task)]


def from_file(path: Path) -> list[Labelled]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{where}: not JSON: {exc.msg}", path=str(path), line=number) from None
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise BadRequest(f"{where}: not an object with a non-empty `messages` list", path=str(path), line=number)
        tools = row.get("tools")
        if not isinstance(tools, list) or not tools:
            raise BadRequest(f"{where}: a turn without `tools` has nothing to decide", path=str(path), line=number)
        messages, call = row["messages"], row.get("call")
        if call is None:  # an exported example: the answer is the last message
            *messages, answer = messages
            if not isinstance(answer, dict) or answer.get("role") != "assistant":
                raise BadRequest(f"{where}: no `call` label, and the last message is not an answer",
                                 path=str(path), line=number)
            call = bool(answer.get("tool_calls"))
        if not isinstance(call, bool):
            raise BadRequest(f"{where}: `call` must be true or false", path=str(path), line=number)
        out.append(Labelled(key=str(row.get("id", where)), messages=messages, tools=tools,
                            parallel_tool_calls=bool(row.get("parallel_tool_calls", True)), call=call,
                            source="file"))
    return out


@dataclass
class Read:
    """The evidence of the turns that could be read (the rest left out, with why). Each
    turn's turn-end logits are kept as the fit reads them (`stride`, `width`: the model's
    probe_layout), not whole: 2 KiB a turn rather than the vocabulary's 192 KiB."""

    stride: int
    width: int
    turns: list[Labelled] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)  # turn_end: the `width` readings
    left_out: Counter[str] = field(default_factory=Counter)  # error code -> turns
    cached: int = 0  # turns whose evidence came from the cache, not the model
    wall_s: float = 0.0

    def features(self) -> fitting.Features:
        """The fit's columns: every turn's open log-odds and its turn-end readings."""
        return fitting.Features(open_logodds=np.array([e.open_logodds for e in self.evidence]),
                                probe=np.stack([e.probe(1, self.width) for e in self.evidence]),
                                stride=self.stride)

    def rule_as_read(self, rule: Rule, model: str) -> Rule:
        """`rule`, reading these compact readings as it reads a model's whole row."""
        if not rule.reads_turn_end:
            return rule
        step, reach = divmod(rule.probe_stride, self.stride)
        if reach or step * (len(rule.probe_weights) - 1) >= self.width:
            raise BadRequest(f"{model}: its rule reads {len(rule.probe_weights)} logits at stride "
                             f"{rule.probe_stride}, which calibration (stride {self.stride}, {self.width} logits) "
                             "does not read: was it written by hand?", model=model)
        return replace(rule, probe_stride=step)

    @property
    def labels(self) -> np.ndarray:
        return np.array([t.call for t in self.turns], dtype=bool)


def reading_rule(n_vocab: int) -> Rule:
    """A rule that reads everything a fitted one can: its weights are not used."""
    stride, width = probe_layout(n_vocab)
    return Rule(probe_stride=stride, probe_weights=(0.0,) * width, name="reading")


class EvidenceCache:
    """Each turn's evidence, kept by what decides it: the model's files and adapter
    (sha256), the reading layout, and the turn as the model sees it (the rendered
    prompt, the tools, parallel_tool_calls). A refit reads through the model only the
    turns it has not read before (1,560 BFCL turns took 58 min on 2 cores). An SQLite
    file under the data dir's cache/; losing it costs only time."""

    def __init__(self, path: Path, model_key: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path)
        self.conn.execute("create table if not exists evidence (model text, turn text, open_logodds real, "
                          "readings blob, primary key (model, turn))")
        self.model_key = model_key

    @staticmethod
    def turn_key(prompt: str, request: GenerationRequest) -> str:
        return hashlib.sha256(json.dumps([prompt, request.tools, request.parallel_tool_calls],
                                         sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> Evidence | None:
        row = self.conn.execute("select open_logodds, readings from evidence where model = ? and turn = ?",
                                [self.model_key, key]).fetchone()
        return None if row is None else Evidence(row[0], np.frombuffer(row[1], dtype="<f4").copy())

    def put(self, key: str, evidence: Evidence) -> None:
        assert evidence.turn_end is not None
        self.conn.execute("insert or replace into evidence values (?, ?, ?, ?)",
                          [self.model_key, key, evidence.open_logodds,
                           evidence.turn_end.astype("<f4").tobytes()])

    def close(self) -> None:
        self.conn.commit()
        self.conn.close()


def read_evidence(model: Any, turns: Iterable[Labelled], adapter: AdapterRef | None,
                  progress: Callable[[], Any] | None = None, cache: EvidenceCache | None = None) -> Read:
    """Each turn's evidence through `model` (a loaded Decoder), or from `cache`; a turn
    the model cannot take (too long for its context, a schema it cannot enforce) is left
    out and counted."""
    rule = reading_rule(model.n_vocab)
    out = Read(stride=rule.probe_stride, width=len(rule.probe_weights))
    t0 = time.perf_counter()
    for n, turn in enumerate(turns):
        request = GenerationRequest(messages=turn.messages, tools=turn.tools, tool_choice="auto",
                                    parallel_tool_calls=turn.parallel_tool_calls, adapter=adapter)
        try:
            key = EvidenceCache.turn_key(model.render(request), request) if cache is not None else ""
            evidence = cache.get(key) if cache is not None else None
            if evidence is None:
                whole = model.evidence(request, rule)
                assert whole.turn_end is not None
                evidence = Evidence(whole.open_logodds, whole.turn_end[::out.stride][:out.width].copy())
                if cache is not None:
                    cache.put(key, evidence)
                    if n % 50 == 0:
                        cache.conn.commit()  # a read stopped part way keeps what it read
            else:
                out.cached += 1
            out.evidence.append(evidence)
            out.turns.append(turn)
        except OutpostError as exc:
            out.left_out[exc.code] += 1
        if progress is not None:
            progress()
    out.wall_s = time.perf_counter() - t0
    return out


@dataclass(frozen=True)
class Calibration:
    """A fit and what it means: enough to print, to write as JSON, and to apply."""

    model: str
    version: str
    rule: DecisionRule
    fit: fitting.Fit
    point: fitting.Point
    open_only_auroc: float  # the open log-odds alone, for comparison
    labels: np.ndarray
    current: Rule  # the version's rule now
    current_calls: np.ndarray  # its decisions on the same turns
    sources: Counter[str]
    left_out: Counter[str]
    wall_s: float
    cached: int = 0  # turns whose evidence the cache had

    @property
    def new_calls(self) -> np.ndarray:
        return self.fit.heldout >= self.point.threshold

    def changes(self) -> dict[str, Any]:
        """What the new rule would decide differently on these turns (held-out scores)."""
        new, old, y = self.new_calls, self.current_calls, self.labels
        return {"turns": int(len(y)), "answer_to_call": int((new & ~old).sum()),
                "call_to_answer": int((~new & old).sum()),
                "right_before": float((old == y).mean()), "right_after": float((new == y).mean())}

    def to_dict(self) -> dict[str, Any]:
        y = self.labels
        return {"model": self.model, "version": self.version, "turns": int(len(y)), "calls": int(y.sum()),
                "sources": dict(self.sources), "left_out": dict(self.left_out), "evidence_s": round(self.wall_s, 1),
                "evidence_cached": self.cached,
                "auroc": round(self.fit.auroc, 4), "auroc_open_only": round(self.open_only_auroc, 4),
                "penalty": self.fit.penalty,
                "operating_point": {"threshold": round(self.point.threshold, 4), "recall": self.point.recall,
                                    "specificity": self.point.specificity},
                "current_rule": self.current.name, "changes": self.changes(),
                "roc": [{"threshold": p.threshold, "recall": p.recall, "specificity": p.specificity}
                        for p in fitting.roc(self.fit.heldout, y)[1:]],
                "rule": self.rule.model_dump()}


def calibrate(manifest: Manifest, read: Read, fitted_on: str, min_recall: float | None) -> Calibration:
    """Fit `manifest`'s rule to the turns read; the operating point from held-out scores."""
    y = read.labels
    calls, answers = int(y.sum()), int((~y).sum())
    if calls < fitting.MIN_EACH or answers < fitting.MIN_EACH:
        raise NotEnoughLabels(manifest.id, calls, answers)
    features = read.features()
    fit = fitting.fit(features, y, [t.key for t in read.turns])
    point = fitting.operating_point(fit.heldout, y, min_recall)
    current = Rule.of(manifest)
    as_read = read.rule_as_read(current, manifest.id)
    current_calls = np.array([as_read.decide(e).choice == "call" for e in read.evidence], dtype=bool)
    return Calibration(model=manifest.id, version=manifest.version,
                       rule=fit.rule(point.threshold, features.stride, fitted_on, calls), fit=fit, point=point,
                       open_only_auroc=fitting.auroc(features.open_logodds, y), labels=y, current=current,
                       current_calls=current_calls, sources=Counter(t.source for t in read.turns),
                       left_out=read.left_out, wall_s=read.wall_s, cached=read.cached)


# -- a new version with the rule ------------------------------------------------------------
def next_version(store: ModelStore, manifest: Manifest) -> str:
    """`<v>+cal<N>`: the version the rule was fitted for, one more than any fit of it."""
    base = re.sub(r"\+cal\d+$", "", manifest.version)
    folder = store.versions / manifest.id
    seen = [int(m.group(1)) for p in (folder.glob("*.toml") if folder.is_dir() else [])
            if (m := re.fullmatch(re.escape(base) + r"(?:%2B|\+)cal(\d+)", p.stem))]
    return f"{base}+cal{max(seen, default=0) + 1}"


def with_rule(text: str, version: str, rule: DecisionRule, origin: str) -> str:
    """A manifest's TOML as another version with `rule`; the rest as it was."""
    import tomli_w  # noqa: PLC0415 (only --apply writes a manifest)

    doc = tomllib.loads(text)
    doc["version"] = version
    doc["decision"] = rule.model_dump(exclude_none=True)
    out = tomli_w.dumps(doc)
    Manifest.from_toml(out, origin)  # what is written must read back
    return out


# -- the command ----------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "calibrate", parents=[common, as_json],
        help="fit how a model decides between calling a tool and answering (tool_choice auto)",
        description="Fit a model's (or a task adapter's) call-or-answer rule to turns whose right "
        "decision is known: by default the log's auto turns that the cloud also answered "
        "(escalated or shadow) or that an agent called good. Shows the rule's ROC on held-out "
        "turns, the operating point and the decisions it would change; --apply serves it as a "
        "new version (`models rollback` restores the one before). docs/tool-calls.md#the-decision.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("id", help="the model or task adapter whose rule to fit")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, metavar="FILE",
                        help="labelled turns from this JSONL file instead of the log")
    source.add_argument("--task", help="only the log's turns of this task")
    point = p.add_mutually_exclusive_group()
    point.add_argument("--min-recall", type=float, default=0.9, metavar="R",
                       help="the operating point: the highest threshold that calls on at least this "
                       "share of the turns that needed a call (default 0.9)")
    point.add_argument("--balanced", action="store_true",
                       help="the operating point of the best balanced accuracy instead of --min-recall")
    p.add_argument("--threads", type=int, default=None, help="threads for the model (default half the cores)")
    p.add_argument("--apply", action="store_true",
                   help="stage the rule as a new version and activate it after its smoke test")
    p.set_defaults(run=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    if not 0.0 < args.min_recall <= 1.0:
        print("outpost models calibrate: --min-recall must be in (0, 1]", file=sys.stderr)
        return 2
    store = ModelStore(settings.store_dir)
    catalog = Catalog.load(store, settings.manifest_dirs, settings.default_model)
    manifest = catalog.get(args.id)
    turns = from_file(args.data) if args.data else from_log(settings, manifest.id, args.task)
    where = str(args.data) if args.data else f"the log ({manifest.id}{', task ' + args.task if args.task else ''})"
    y = np.array([t.call for t in turns], dtype=bool)
    if int(y.sum()) < fitting.MIN_EACH or int((~y).sum()) < fitting.MIN_EACH:
        raise NotEnoughLabels(manifest.id, int(y.sum()), int((~y).sum()))
    read = read_model(settings, store, catalog, manifest, turns, args.threads)
    fitted_on = f"{len(read.turns)} labelled turns from {where}, {time.strftime('%Y-%m-%d')}"
    result = calibrate(manifest, read, fitted_on, None if args.balanced else args.min_recall)
    applied: dict[str, Any] | None = None
    if args.apply:
        applied = apply(settings, store, catalog, manifest, result.rule)
    if args.json:
        print(json.dumps({**result.to_dict(), "applied": applied}, indent=2))
    else:
        print_report(result, where)
        if applied is not None:
            print_applied(applied, manifest)
    return 0 if applied is None or applied["active"] else 1


def read_model(settings: Settings, store: ModelStore, catalog: Catalog, manifest: Manifest,
               turns: list[Labelled], threads: int | None) -> Read:
    """Load `manifest` (a task adapter: on its base) as a worker would, read every turn."""
    # Imported here: llama.cpp and xgrammar (torch under it) load only when this runs.
    from outpost.models.backend import LoadOptions  # noqa: PLC0415
    from outpost.runtime.daemon.adapters import resolve  # noqa: PLC0415
    from outpost.runtime.daemon.worker_process import load  # noqa: PLC0415

    base, ref = resolve(catalog, manifest)
    model = load(base, store, LoadOptions(n_threads=threads, n_gpu_layers=settings.llama.n_gpu_layers))
    files = "+".join(f.sha256 for f in base.files) + (f"/{ref.sha256}@{ref.scale}" if ref is not None else "")
    stride, width = probe_layout(model.n_vocab)
    cache = EvidenceCache(settings.data_dir / "cache" / "evidence.db", f"{files}/{stride}x{width}")
    bar = tqdm(total=len(turns), desc=f"evidence {manifest.id}", unit="turn", disable=None, file=sys.stderr)
    try:
        return read_evidence(model, turns, ref, progress=lambda: bar.update(1), cache=cache)
    finally:
        bar.close()
        cache.close()
        model.close()


def apply(settings: Settings, store: ModelStore, catalog: Catalog, manifest: Manifest,
          rule: DecisionRule) -> dict[str, Any]:
    from outpost.runtime.activation import activate  # noqa: PLC0415 (may start a private daemon)

    version = next_version(store, manifest)
    text = with_rule(catalog.entry(manifest.id).text, version, rule, f"calibration of {manifest.id}")
    store.stage(Manifest.from_toml(text, f"calibration of {manifest.id}"), text)
    done = activate(settings, manifest.id, version)
    return {"version": version, "previous": manifest.version, "active": done.active, "refused": done.refused,
            "where": done.where}


def print_report(c: Calibration, where: str) -> None:
    y = c.labels
    print(f"{c.model} {c.version}: {len(y):,} labelled turns from {where} "
          f"({int(y.sum()):,} needed a call, {int((~y).sum()):,} did not)")
    sources = ", ".join(f"{k} {v:,}" for k, v in sorted(c.sources.items()))
    left = ", ".join(f"{k} {v}" for k, v in sorted(c.left_out.items()))
    print(f"  labels: {sources}; evidence read in {c.wall_s:.0f} s"
          + (f" ({c.cached:,} turns from the cache)" if c.cached else "")
          + (f"; left out: {left}" if left else ""))
    print(f"  AUROC {c.fit.auroc:.3f} on held-out turns ({fitting.FOLDS}-fold); "
          f"the call-opening probability alone: {c.open_only_auroc:.3f}")
    print("  ROC (held out):   threshold   calls on needed   answers on the rest   balanced")
    points = fitting.roc(c.fit.heldout, y)[1:]
    for want in RECALL_ROWS:
        p = next((q for q in points if q.recall >= want), points[-1])
        print(f"                   {p.threshold:>9.3f}   {p.recall:>15.1%}   {p.specificity:>19.1%}   {p.balanced:>8.1%}")
    p = c.point
    print(f"  operating point: threshold {p.threshold:.3f}: a call on {p.recall:.1%} of the turns that "
          f"needed one, an answer on {p.specificity:.1%} of the rest (balanced {p.balanced:.1%})")
    ch = c.changes()
    rule_now = "uncalibrated" if c.current.name == UNCALIBRATED else f"the rule of {c.current.name}"
    print(f"  against {rule_now}: {ch['answer_to_call'] + ch['call_to_answer']:,} of {ch['turns']:,} decisions "
          f"change ({ch['answer_to_call']:,} answer -> call, {ch['call_to_answer']:,} call -> answer); "
          f"right {ch['right_before']:.1%} -> {ch['right_after']:.1%}")


def print_applied(applied: dict[str, Any], manifest: Manifest) -> None:
    if applied["active"]:
        print(f"  applied: {manifest.id} {applied['version']} serves now, with this rule "
              f"(`outpost models rollback {manifest.id}` restores {applied['previous']})")
    else:
        print(f"  not applied: {manifest.id} {applied['version']} failed its smoke test "
              f"({applied['refused']}); {applied['previous']} keeps serving", file=sys.stderr)
