"""`outpost specialise TASK`: S4 select, S5 train, S6 gate and promote, in one command.

    examples (the log's export for TASK, or --examples FILE with its .val sibling)
      -> S4: every candidate base scored on the held-out examples; the best is chosen
      -> S5: a LoRA adapter trained on the training examples, on the chosen base
      -> the adapter written (GGUF), its manifest staged in the store as a new version
      -> its rule for tool_choice auto fitted on its training examples (when they hold
         both calls and text answers), as `outpost models calibrate` fits one
      -> S6: the adapter and the incumbent (the adapter promoted before, or the base)
         answer the held-out examples under auto, each deciding by its own rule;
         gate.py decides
      -> promoted: activated after its smoke test (live when a daemon runs); kept out:
         staged only, and `models evals` says why

Every evaluation goes to the log's `evals` table. The heavy work runs in this process;
`--threads` bounds it (half the cores by default) so a daemon beside it keeps answering.

What this module must not do: serve requests, or write the log beyond `evals`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import BadRequest
from outpost.manifests.schema import DecisionRule, Manifest, Training
from outpost.manifests.store import ModelStore
from outpost.models.backend import AdapterRef
from outpost.models.decision import Rule
from outpost.runtime.config import Settings
from outpost.runtime.daemon.memory import available_ram
from outpost.runtime.logs import schema
from outpost.runtime.logs.export import Filters, export, val_path_for
from outpost.runtime.logs.records import EvalRecord

from .. import calibrate, decision_fit
from . import adapter as adapters
from . import data, evaluate, gate
from .augment import augment
from .train import ALL_PROJECTIONS, TrainSettings, default_threads, train
from .world import World

if TYPE_CHECKING:
    # Imported where the command runs: `outpost serve` builds this parser too, and
    # llama_cpp with xgrammar (and torch under it) would add ~200 MiB to the daemon.
    from outpost.models.llama import LlamaModel

log = logging.getLogger("outpost.specialise")


@dataclass(frozen=True)
class Options:
    """One specialisation run: the command line's flags, typed (the benchmark builds one too)."""

    task: str
    examples: Path | None = None  # an exported JSONL (held-out: its .val sibling); None: export the log
    heldout_share: float = 0.2
    min_confidence: float | None = None
    bases: list[str] = field(default_factory=list)
    train: TrainSettings = field(default_factory=TrainSettings)
    max_tokens: int = 256
    significance: float = gate.ALPHA
    workdir: Path | None = None
    promote: bool = True
    augment: int = 0  # variants of each training example with its copied values swapped (augment.py)


@dataclass(frozen=True)
class Share:
    """What a process of a distributed launch other than 0 did: its share of the
    training. Process 0 reports the run (`run`'s dict)."""

    task: str
    process: int
    steps: int
    wall_s: float


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "specialise", parents=[common, as_json],
        help="train a task adapter on the log, gate it against the incumbent, promote it",
        description="S4-S6 of the conversion loop for one task: choose a base model on the "
        "task's held-out examples, train a LoRA adapter on the rest, and promote it only if "
        "it beats the incumbent by a margin an exact McNemar test supports (docs/specialise.md).")
    p.add_argument("task", help="the task: requests logged with it are the examples")
    p.add_argument("--examples", type=Path, metavar="FILE",
                   help="train on this exported JSONL (held-out: its .val.jsonl sibling) "
                   "instead of exporting the log")
    p.add_argument("--heldout-share", type=float, default=0.2,
                   help="share of the log's examples held out for selection and the gate (default 0.2)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="a local answer is a target at or above this confidence "
                   "(default: [export] min_confidence)")
    p.add_argument("--base", action="append", default=[], metavar="ID",
                   help="candidate base model (repeat); default: every pulled GGUF model")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; the update is scaled by alpha/rank (default 32)")
    p.add_argument("--targets", default=",".join(ALL_PROJECTIONS),
                   help="projections to adapt, comma-separated (default all seven)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training examples (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="padded tokens per optimiser step (default 2048)")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="longer examples are left out, never cut (default 1024)")
    p.add_argument("--augment", type=non_negative, default=0, metavar="N",
                   help="also train on up to N variants of each example, the values its request "
                   "spells out swapped for others of their kind (default 0: none; docs/specialise.md)")
    p.add_argument("--seed", type=int, default=0, help="shuffling and initialisation (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for training and evaluation (default half the cores)")
    p.add_argument("--max-tokens", type=int, default=256, help="per held-out answer (default 256)")
    p.add_argument("--significance", type=float, default=gate.ALPHA,
                   help="the gate's one-sided p-value threshold (default 0.05)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="checkpoints and files (default <data dir>/specialise/<task>)")
    p.add_argument("--no-promote", action="store_true", help="gate, but leave the adapter staged")
    p.set_defaults(run=cmd_specialise)


def non_negative(text: str) -> int:
    """An argparse type: a count."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _examples(args: Options, settings: Settings, workdir: Path) -> tuple[list[data.Example], list[data.Example]]:
    if args.examples is not None:
        return data.load(args.examples), data.load(val_path_for(args.examples))
    db = schema.open_db(settings.log_path, settings.logs.busy_timeout_s)
    out = workdir / "examples.jsonl"
    report = export(db, out, "openai", Filters(task=args.task), min_confidence=settings.export.min_confidence if args.min_confidence is None else args.min_confidence,
                    val_share=args.heldout_share, redact=dict(settings.export.redact),
                    advance_watermark=False)
    log.info("exported %d examples of %s (%d held out; skipped %s)", report.examples, args.task,
             report.val, dict(report.skipped))
    return data.load(out), data.load(val_path_for(out))


def _candidates(args: Options, store: ModelStore, catalog: Catalog, budget: int) -> list[Manifest]:
    chosen = [catalog.get(b) for b in args.bases] if args.bases else [
        m for m in catalog if m.adapter is None and m.backend == "gguf" and store.is_pulled(m)]
    fits = [m for m in chosen if m.adapter is None and int(m.memory_estimate) <= budget]
    if not fits:
        raise BadRequest("no base model to specialise: pull one (`outpost models pull`) that fits "
                         "the memory budget", field="base")
    return fits


def _record(settings: Settings, rows: list[EvalRecord]) -> None:
    db = schema.open_db(settings.log_path, settings.logs.busy_timeout_s)
    with db.conn:
        db.conn.execute("BEGIN IMMEDIATE")
        for row in rows:
            schema.insert(db.conn, "evals", {"created_at": time.time(), **row.columns()})


def _eval_row(task: str, purpose: str, role: str, ev: evaluate.Evaluation, manifest: Manifest,
              heldout_sha: str, **extra: Any) -> EvalRecord:
    base = f"{manifest.adapter.base} {manifest.adapter.base_version}" if manifest.adapter else None
    return EvalRecord(task=task, purpose=purpose, role=role, model=manifest.id, version=manifest.version,
                      base=base, examples=ev.examples, accuracy=ev.accuracy, validity=ev.validity,
                      p50_ms=ev.p50_ms, decode_tok_s=ev.decode_tok_s, data_sha256=heldout_sha, **extra)


def _bar(label: str, total: int, initial: int = 0) -> Any:
    return tqdm(total=total, initial=initial, desc=label, unit="step" if "train" in label else "ex",
                disable=None, leave=False, file=sys.stderr)


def _evaluate(model: LlamaModel, examples: list[data.Example], ref: AdapterRef | None, label: str,
              max_tokens: int, rule: Rule) -> evaluate.Evaluation:
    bar = _bar(label, len(examples))
    try:
        return evaluate.evaluate(model, examples, ref, max_tokens, progress=lambda: bar.update(1), rule=rule)
    finally:
        bar.close()


def _fit_decision(model: LlamaModel, examples: list[data.Example], ref: AdapterRef,
                  name: str) -> DecisionRule | None:
    """The adapter's own rule for tool_choice auto, fitted on its training examples that
    offer tools (a call target or a text one), as `outpost models calibrate` fits one;
    None (it decides by its own odds of opening a call) when they hold too few of either."""
    turns = [calibrate.Labelled(key=hashlib.sha256(ex.line.encode()).hexdigest(), messages=ex.messages,
                                tools=ex.tools, parallel_tool_calls=ex.parallel_tool_calls,
                                call=bool(ex.answer.get("tool_calls")), source="example")
             for ex in examples if ex.tools]
    calls = sum(t.call for t in turns)
    if calls < decision_fit.MIN_EACH or len(turns) - calls < decision_fit.MIN_EACH:
        log.info("%s decides by its own odds: %d training examples call, %d answer (a rule needs %d of each)",
                 name, calls, len(turns) - calls, decision_fit.MIN_EACH)
        return None
    bar = _bar(f"decision {name}", len(turns))
    try:
        read = calibrate.read_evidence(model, turns, ref, progress=lambda: bar.update(1))
    finally:
        bar.close()
    # The examples the adapter learned are the only labelled turns not held out for the
    # gate, so its held-out AUROC here is optimistic; the gate then scores the rule's
    # decisions on the held-out examples, which it never saw.
    try:
        fitted = calibrate.calibrate(model.manifest, read, f"{len(read.turns)} training examples of {name} "
                                     "(the adapter learned them)", 0.9)
    except calibrate.NotEnoughLabels as exc:  # turns the model could not read (too long) left too few
        log.info("%s decides by its own odds: %s", name, exc.message)
        return None
    return fitted.rule


def cmd_specialise(args: argparse.Namespace, settings: Settings) -> int:
    options = Options(
        task=args.task, examples=args.examples, heldout_share=args.heldout_share,
        min_confidence=args.min_confidence, bases=args.base, max_tokens=args.max_tokens,
        significance=args.significance, workdir=args.workdir, promote=not args.no_promote,
        augment=args.augment,
        train=TrainSettings(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")),
                            epochs=args.epochs, learning_rate=args.lr, batch_tokens=args.batch_tokens,
                            max_seq_len=args.max_seq_len, seed=args.seed, threads=args.threads))
    result = run(settings, options)
    if isinstance(result, Share):  # process 0 reports the run
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cand, inc = result["candidate"], result["incumbent"]
        print(f"{result['task']}: {result['adapter']} on {result['base']}: {result['decision']} "
              f"({result['reason']})")
        print(f"  held-out ({cand['examples']}): adapter {cand['accuracy']:.1%} right, {cand['validity']:.1%} "
              f"valid; incumbent {inc['adapter'] or inc['model']} {inc['accuracy']:.1%} right, "
              f"{inc['validity']:.1%} valid")
        t = result["train"]
        variants = f" ({t['augmented']} of them variants)" if t["augmented"] else ""
        print(f"  trained on {t['examples']} examples{variants}, {t['steps']} steps, {t['threads']} threads, "
              f"{t['wall_s']:.0f} s; adapter {result['gguf_bytes'] / 2**20:.1f} MiB")
    return 0 if result["decision"] in ("promoted", "kept") else 1


def run(settings: Settings, args: Options) -> dict[str, Any] | Share:
    """The whole run, or, in a process of a distributed launch other than 0, its share
    of the training (world.py)."""
    world = World.from_env()
    try:
        return _run(settings, args, world)
    finally:
        world.close()


def _run(settings: Settings, args: Options, world: World) -> dict[str, Any] | Share:
    from outpost.models.llama import LlamaModel  # noqa: F811 (see TYPE_CHECKING above)

    t_start = time.perf_counter()
    store = ModelStore(settings.store_dir)
    catalog = Catalog.load(store, settings.manifest_dirs, settings.default_model)
    workdir = args.workdir or settings.data_dir / "specialise" / adapters.slug(args.task)
    threads = args.train.threads or default_threads()
    settings_t = replace(args.train, threads=threads)

    def plan() -> tuple[Any, ...]:  # on process 0 only; the others are told its result
        workdir.mkdir(parents=True, exist_ok=True)
        train_set, heldout = _examples(args, settings, workdir)
        base, base_eval, scores, heldout_sha = _select(settings, args, store, catalog, train_set, heldout, threads)
        return train_set, heldout, base, base_eval, scores, heldout_sha, store.ensure_verified(base.weights)

    train_set, heldout, base, base_eval, scores, heldout_sha, base_path = world.share(plan)
    # The variants follow from the examples and the seed alone: every process makes the same.
    variants = augment(train_set, args.augment, settings_t.seed, exclude=heldout)
    trained_on = [*train_set, *variants]
    if not world.main:  # its share of the training, beside process 0 (the same data dir: world.py)
        trained = train(base, base_path, trained_on, settings_t, store.cache, workdir / base.id,
                        data.fingerprint(trained_on), world=world)
        return Share(task=args.task, process=world.rank, steps=trained.steps, wall_s=round(trained.wall_s, 1))

    # S5: the adapter. The manifest fingerprints the logged examples; `augment` (and the
    # seed) make the variants from them again.
    data_sha = data.fingerprint(train_set)
    trained = train(base, base_path, trained_on, settings_t, store.cache, workdir / base.id,
                    data.fingerprint(trained_on),
                    progress=lambda done, total: _bar(f"S5 train {base.id}", total, done), world=world)
    augmented = len(variants) - sum(1 for i in trained.left_out_at if i >= len(train_set))  # variants kept
    model_id = adapters.adapter_id(args.task, base)
    version = adapters.next_version(store, model_id)
    gguf = adapters.write(workdir / f"{model_id}-{version}.gguf", trained.state, base_path, settings_t.alpha,
                          f"{model_id} {version}")

    # S6: the candidate against the incumbent, on the same base and examples.
    incumbent = catalog.for_task(args.task)
    if incumbent is None or incumbent.adapter is None or incumbent.adapter.base_sha256 != base.weights.sha256:
        incumbent = base
    training = Training(data_sha256=data_sha, train_examples=trained.examples, heldout_examples=len(heldout),
                        rank=settings_t.rank, alpha=settings_t.alpha, targets=list(settings_t.targets),
                        epochs=settings_t.epochs, learning_rate=settings_t.learning_rate,
                        max_seq_len=settings_t.max_seq_len, seed=settings_t.seed,
                        steps=trained.steps, threads=trained.threads, wall_s=round(trained.wall_s, 1),
                        device=trained.device, augment=args.augment)
    text = adapters.manifest_text(base, model_id, version, [args.task], gguf, training)
    candidate = adapters.stage(store, text)
    model = LlamaModel(base, base_path, n_threads=threads, adapter_path=store.ensure_verified)
    try:
        # Its rule for tool_choice auto, from its own evidence: it decides with it in S6.
        rule = _fit_decision(model, train_set, _ref(candidate), f"{model_id} {version}")
        decides = Rule.from_fitted(rule, f"{model_id} {version}") if rule is not None else Rule()
        cand_eval = _evaluate(model, heldout, _ref(candidate), f"S6 {model_id} {version}", args.max_tokens,
                              decides)
        inc_eval = base_eval if incumbent is base else _evaluate(
            model, heldout, _ref(incumbent), f"S6 {incumbent.id} {incumbent.version}", args.max_tokens,
            Rule.of(incumbent))
    finally:
        model.close()
    verdict = gate.decide(cand_eval.pairs(), inc_eval.pairs(), args.significance)
    # The held-out scores belong in the manifest too: restage it with them.
    training = training.model_copy(update={"heldout": {"accuracy": cand_eval.accuracy,
                                                       "validity": cand_eval.validity,
                                                       "decision_accuracy": cand_eval.decision_accuracy,
                                                       "incumbent_accuracy": inc_eval.accuracy}})
    text = adapters.manifest_text(base, model_id, version, [args.task], gguf, training, decision=rule)
    candidate = adapters.stage(store, text)
    decision = "promoted" if verdict.promote and args.promote else "kept"
    detail = {"reason": verdict.reason, "wins": verdict.wins, "losses": verdict.losses,
              "alpha": verdict.alpha, "incumbent": f"{incumbent.id} {incumbent.version}"}
    _record(settings, [
        _eval_row(args.task, "gate", "candidate", cand_eval, candidate, heldout_sha, decision=decision,
                  p_value=verdict.p_value, detail={**detail, "train_wall_s": round(trained.wall_s, 1),
                                                   "threads": trained.threads, "gguf_bytes": gguf.stat().st_size,
                                                   "decision_accuracy": round(cand_eval.decision_accuracy, 4),
                                                   "decision_rule": rule.model_dump() if rule else None}),
        _eval_row(args.task, "gate", "incumbent", inc_eval, incumbent, heldout_sha, decision=decision,
                  p_value=verdict.p_value,
                  detail={**detail, "decision_accuracy": round(inc_eval.decision_accuracy, 4)})])
    activation: dict[str, Any] | None = None
    if decision == "promoted":
        from outpost.runtime.activation import activate  # noqa: PLC0415 (may start a private daemon)

        done = activate(settings, model_id, version)
        activation = asdict(done)
        if not done.active:
            decision = "refused at activation"
    result = {"task": args.task, "base": f"{base.id} {base.version}", "adapter": f"{model_id} {version}",
              "decision": decision, "reason": verdict.reason, "p_value": verdict.p_value,
              "candidate": cand_eval.summary(), "incumbent": inc_eval.summary(),
              "selection": [ev.summary() for _, ev in scores],
              "train": {"examples": trained.examples, "augmented": augmented, "left_out": trained.left_out,
                        "steps": trained.steps,
                        "threads": trained.threads, "wall_s": round(trained.wall_s, 1),
                        "resumed_from": trained.resumed_from, "device": trained.device},
              "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "activation": activation,
              "wall_s": round(time.perf_counter() - t_start, 1)}
    return result


def _select(settings: Settings, args: Options, store: ModelStore, catalog: Catalog,
            train_set: list[data.Example], heldout: list[data.Example],
            threads: int) -> tuple[Manifest, evaluate.Evaluation, list[tuple[Manifest, evaluate.Evaluation]], str]:
    """S4: each candidate base on the held-out examples; (chosen, its evaluation, every
    score, the held-out examples' fingerprint)."""
    from outpost.models.llama import LlamaModel  # noqa: F811 (see TYPE_CHECKING above)

    if not train_set or not heldout:
        raise BadRequest(f"task {args.task!r} has {len(train_set)} training and {len(heldout)} held-out "
                         "examples; both are needed (log more, or lower --min-confidence)", field="task")
    heldout_sha = data.fingerprint(heldout)
    budget = int(settings.budget.ram or available_ram() * settings.budget.ram_share)
    scores: list[tuple[Manifest, evaluate.Evaluation]] = []
    for base in _candidates(args, store, catalog, budget):
        model = LlamaModel(base, store.ensure_verified(base.weights), n_threads=threads,
                           adapter_path=store.ensure_verified)
        try:
            scores.append((base, _evaluate(model, heldout, None, f"S4 {base.id}", args.max_tokens, Rule.of(base))))
        finally:
            model.close()
    base, base_eval, why = choose_base(scores, args.significance)
    _record(settings, [_eval_row(args.task, "select", "candidate", ev, m, heldout_sha,
                                 decision="chosen" if m is base else None,
                                 detail={"memory_estimate": int(m.memory_estimate),
                                         **({"reason": why} if m is base else {})})
                       for m, ev in scores])
    log.info("S4: %s chosen (%.1f%% on %d held-out examples)", base.id, base_eval.accuracy * 100, len(heldout))
    return base, base_eval, scores, heldout_sha


def choose_base(scores: list[tuple[Manifest, evaluate.Evaluation]],
                alpha: float) -> tuple[Manifest, evaluate.Evaluation, str]:
    """S4: the smallest candidate, unless a larger one answers the held-out examples
    better by the gate's own test (exact McNemar, p < alpha). Memory is a certain cost;
    an accuracy gain on a few dozen examples has to be shown, not assumed."""
    ranked = sorted(scores, key=lambda s: (int(s[0].memory_estimate), s[1].p50_ms))
    base, best = ranked[0]
    why = f"the smallest ({int(base.memory_estimate) / 2**20:.0f} MiB), {best.accuracy:.1%} right"
    for manifest, ev in ranked[1:]:
        verdict = gate.decide(ev.pairs(), best.pairs(), alpha)
        if verdict.promote:
            base, best = manifest, ev
            why = (f"{ev.accuracy:.1%} right, better than the smaller candidates "
                   f"({verdict.reason})")
    return base, best, why


def _ref(manifest: Manifest) -> AdapterRef | None:
    if manifest.adapter is None:
        return None
    return AdapterRef(id=manifest.id, version=manifest.version, sha256=manifest.weights.sha256,
                      size=manifest.weights.size, scale=manifest.adapter.scale)
