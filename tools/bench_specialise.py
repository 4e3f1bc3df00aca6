"""The conversion loop, measured: BFCL `simple_python` through the daemon in shadow mode,
an oracle teacher as the cloud, then export -> specialise -> gate -> promote, and the
held-out half asked with the base and with the adapters, in one run.

    python -m outpost.tools.bench_specialise [--sizes 25,50,100,200] [--epochs 3]
        [--threads 2] [--limit N] [--out DIR] [--json] [--svg PLOT.svg]
        [--also-log multiple,live_simple]

1. BFCL's 400 `simple_python` questions are split into halves by a hash of their id.
2. The training half is asked through a real daemon (a fresh data dir, SmolLM2 linked
   from the model store) with `[escalation] policy = "shadow"`: the agent gets the local
   answer; the cloud, an *oracle teacher* on 127.0.0.1 that answers with BFCL's ground
   truth (tools/oracle_server.py), is asked too, and its answer goes to the log.
3. `outpost logs export` of the task makes the examples (the cloud's answers are the
   targets); `specialise` selects a base, trains an adapter on all of them, gates it on
   the export's held-out share and promotes it.
4. The learning curve: adapters trained on the first 25, 50, 100, 200 examples (a point
   at or above the number exported is the full adapter of step 3).
5. The BFCL held-out half, which the loop never saw, is asked with the base and with each
   adapter, through the daemon, scored by BFCL's AST checker; confidence per answer gives
   the share of calls that stay local at the escalation threshold, before and after.
6. Serving cost: decode tok/s and p50 of base vs adapter, and a stream alternating two
   adapters vs one adapter (the switch overhead, and the re-prefill it forces).

`--base gemma-3-270m` runs steps 3-5 on Gemma-3-270M alone (S4 has no other candidate)
and asks the held-out half of Gemma as the base row: a larger base, measured on the same
loop and questions.

`--also-log` adds neighbouring traffic to step 2: the questions of other BFCL categories,
logged under the same task, with any question `simple_python` asks left out (`multiple`
repeats some of them), so the held-out half stays unseen.

Every table says "oracle teacher": the targets are right by construction. Replace the
oracle with any OpenAI-compatible URL (--cloud-url, --cloud-model, --cloud-key-env) to
measure a real teacher.

A run again with the same --out resumes: the log, the base's and each adapter's held-out
answers, the full `specialise` result and each curve point are kept there as JSON, and a
training interrupted resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from outpost.manifests.catalog import Catalog
from outpost.manifests.schema import Training
from outpost.manifests.store import ModelStore
from outpost.models.backend import AdapterRef
from outpost.models.llama import LlamaModel
from outpost.runtime.client import OutpostClient
from outpost.runtime.config import Settings
from outpost.runtime.embedded import EmbeddedDaemon
from outpost.runtime.logs import schema
from outpost.runtime.logs.export import Filters, export, val_path_for

from . import bfcl
from .bench_specialise_report import curve_svg, table
from .oracle_server import OracleServer, question_of
from .specialise import adapter as adapters
from .specialise import cli as specialise
from .specialise import data
from .specialise.augment import augment
from .specialise.train import TrainSettings, train

TASK = "bfcl-simple"
BASE = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
REPO_STORE = Path(__file__).resolve().parent.parent / ".cache" / "store"


def split(items: list[bfcl.Item]) -> tuple[list[bfcl.Item], list[bfcl.Item]]:
    """(training half, held-out half) by the parity of a hash of each id: stable across runs."""
    train_half, heldout = [], []
    for item in items:
        (train_half if hashlib.sha256(item.id.encode()).digest()[0] % 2 == 0 else heldout).append(item)
    return train_half, heldout


def neighbours(category: list[bfcl.Item], seen: list[bfcl.Item]) -> list[bfcl.Item]:
    """A neighbouring category's questions that ask nothing already asked: BFCL's `multiple`
    repeats some of `simple_python`'s questions (with more functions to choose from), and one
    of those logged would leak a held-out question into training. The oracle also answers by
    the question's text, so a repeat would be answered with the other's call."""
    asked = {question_of(i.messages) for i in seen}
    fresh = []
    for item in category:
        question = question_of(item.messages)
        if question not in asked:
            asked.add(question)
            fresh.append(item)
    return fresh


def request(item: bfcl.Item, route: dict[str, Any], max_tokens: int, escalation: str) -> dict[str, Any]:
    return {"escalation": escalation, "messages": [{"role": "system", "content": bfcl.system_prompt()},
                                                   *item.messages],
            "tools": bfcl.to_tools(item.functions), "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": max_tokens, **route}


@dataclass
class Asked:
    ast: bool
    valid: bool
    confidence: float | None
    latency_ms: float
    tokens: int
    decode_ms: float
    id: str = ""  # the BFCL question, and the calls answered: what a failure analysis reads
    calls: list[dict[str, Any]] = field(default_factory=list)


def ask(client: OutpostClient, item: bfcl.Item, route: dict[str, Any], check: Any, max_tokens: int) -> Asked:
    t0 = time.perf_counter()
    reply = client.request("chat", request(item, route, max_tokens, "off"))
    latency = (time.perf_counter() - t0) * 1e3
    calls = []
    for call in reply["choices"][0]["message"].get("tool_calls") or []:
        try:
            calls.append({call["function"]["name"]: json.loads(call["function"]["arguments"])})
        except json.JSONDecodeError:
            calls.append({call["function"]["name"]: call["function"]["arguments"]})
    parsed = bool(calls) and all(isinstance(next(iter(c.values())), dict) for c in calls)
    report = reply["outpost"]["validation"]
    return Asked(ast=bfcl.score_calls(item, calls, parsed, check),
                 valid=bool(calls) and all(r["valid"] for r in report),
                 confidence=reply["outpost"].get("confidence"), latency_ms=latency,
                 tokens=reply["usage"]["completion_tokens"],
                 decode_ms=reply["outpost"]["timings_ms"].get("decode", 0.0), id=item.id, calls=calls)


def kept(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON at `path` if a run before wrote it, else `compute()` written there: what lets
    an interrupted or repeated benchmark skip the hours it has already spent."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value))
    return value


def asked_rows(path: Path, ask_all: Callable[[], list[Asked]]) -> list[Asked]:
    return [Asked(**row) for row in kept(path, lambda: [asdict(r) for r in ask_all()])]


def summary(rows: list[Asked], threshold: float) -> dict[str, Any]:
    n = len(rows)
    kept = [r for r in rows if r.confidence is not None and r.confidence >= threshold]
    decode_s = sum(r.decode_ms for r in rows) / 1e3
    return {"n": n, "ast": sum(r.ast for r in rows) / n, "valid": sum(r.valid for r in rows) / n,
            "local_share": len(kept) / n, "local_ast": sum(r.ast for r in kept) / len(kept) if kept else None,
            "p50_ms": statistics.median(r.latency_ms for r in rows),
            "decode_tok_s": sum(r.tokens for r in rows) / decode_s if decode_s else None}


def _bar(items: list[Any], label: str) -> Any:
    return tqdm(items, desc=label, file=sys.stderr, disable=None, leave=False)


def _train_bar(label: str) -> Any:
    return lambda done, total: tqdm(total=total, initial=done, desc=label, file=sys.stderr, disable=None,
                                    leave=False)


def _train_point(store: ModelStore, base: Any, base_path: Path, subset: list[data.Example],
                 settings_t: TrainSettings, root: Path, curve_id: str, n: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One learning-curve point: the full run's training on the first `n` examples, written
    and staged as `curve_id a1` (not promoted: the curve asks it by model id)."""
    trained_on = [*subset, *augment(subset, args.augment, settings_t.seed)]
    trained = train(base, base_path, trained_on, settings_t, store.cache, root / "work" / f"n{n}",
                    data.fingerprint(trained_on), progress=_train_bar(f"train n={n}"))
    gguf = adapters.write(root / f"{curve_id}.gguf", trained.state, base_path, args.alpha, curve_id)
    adapters.stage(store, adapters.manifest_text(base, curve_id, "a1", [f"{TASK}-n{n}"], gguf, Training(
        data_sha256=data.fingerprint(subset), train_examples=trained.examples, heldout_examples=0,
        rank=args.rank, alpha=args.alpha, targets=list(settings_t.targets), epochs=args.epochs,
        learning_rate=args.lr, max_seq_len=settings_t.max_seq_len, steps=trained.steps,
        threads=trained.threads, wall_s=round(trained.wall_s, 1), augment=args.augment)))
    return {"train_wall_s": round(trained.wall_s, 1), "steps": trained.steps,
            "adapter_bytes": gguf.stat().st_size}


def switch_call_ms(base: Any, base_path: Path, ggufs: list[Path], rounds: int = 50) -> float:
    """What one switch costs in llama.cpp itself (the call and the cache clear), in ms."""
    refs = [AdapterRef(id=p.stem, version="x", sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                       size=p.stat().st_size) for p in ggufs]
    paths = {r.sha256: p for r, p in zip(refs, ggufs)}
    model = LlamaModel(base, base_path, n_threads=1, adapter_path=lambda r: paths[r.sha256])
    try:
        for r in refs:
            model.use_adapter(r)  # loaded once, outside the timing
        t0 = time.perf_counter()
        for i in range(rounds):
            model.use_adapter(refs[i % len(refs)])
        return (time.perf_counter() - t0) * 1e3 / rounds
    finally:
        model.close()


def link_model(store: ModelStore, source: ModelStore, model_id: str) -> None:
    """Make a model pulled in `source` pulled in `store` too (hard links: no copy)."""
    entry = Catalog.load(source, [], BASE).entry(model_id)
    if not source.is_pulled(entry.manifest):
        source.pull(entry.manifest, entry.text)
    store.blobs.mkdir(parents=True, exist_ok=True)
    store.manifests.mkdir(parents=True, exist_ok=True)
    for f in entry.manifest.files:
        if not store.blob_path(f.sha256).exists():
            os.link(source.blob_path(f.sha256), store.blob_path(f.sha256))
    (store.manifests / f"{model_id}.toml").write_text(entry.text)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="25,50,100,200", help="learning-curve points (examples)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--augment", type=specialise.non_negative, default=0, metavar="N",
                    help="train on N variants of each example too (`specialise --augment`; default 0)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3, as `specialise`)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="threads for training and the daemon's worker (default: every core)")
    ap.add_argument("--limit", type=int, default=None, help="use only this many BFCL questions")
    ap.add_argument("--heldout-limit", type=int, default=None, help="ask only this many held-out questions")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.85, help="the escalation threshold (default 0.85)")
    ap.add_argument("--store", type=Path, default=REPO_STORE, help="where SmolLM2 is pulled already")
    ap.add_argument("--out", type=Path, default=None, help="keep the run's data dir here")
    ap.add_argument("--switch-requests", type=int, default=40, help="requests per switch-cost stream")
    ap.add_argument("--no-gemma", action="store_true", help="S4 with SmolLM2 alone (no Gemma-3-270M)")
    ap.add_argument("--base", choices=[BASE, GEMMA], default=None,
                    help="specialise this base alone (S4 has no other candidate) and ask the held-out "
                         "half of it as the base row; default: SmolLM2, with Gemma-3-270M a candidate "
                         "unless --no-gemma")
    ap.add_argument("--teacher", choices=["first", "minimal"], default="first",
                    help="the oracle's answers: each argument's first accepted value (default), or "
                         "`minimal`: arguments BFCL accepts absent left out (tools/oracle_server.py)")
    ap.add_argument("--cloud-url", default=None, metavar="URL",
                    help="a real teacher: an OpenAI-compatible base URL asked in shadow instead of the oracle")
    ap.add_argument("--cloud-model", default=None, help="the model to ask at --cloud-url")
    ap.add_argument("--cloud-key-env", default=None, metavar="VAR",
                    help="the environment variable holding --cloud-url's API key")
    ap.add_argument("--also-log", default="", metavar="CATEGORIES",
                    help="also log these BFCL categories' questions (comma-separated, e.g. "
                         "multiple,live_simple) under the same task: neighbouring tool-call traffic, "
                         "more examples. A question simple_python asks is left out; the held-out "
                         "half stays simple_python's")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--svg", type=Path, default=None, help="also draw the learning curve here")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the table (and --svg) of a run saved with --json; runs nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cloud_url and not args.cloud_model:
        parser.error("--cloud-url needs --cloud-model")
    if args.from_json:
        return _report(json.loads(args.from_json.read_text()), args)
    t_start = time.perf_counter()
    items = bfcl.load("simple_python", args.limit)
    train_items, heldout_items = split(items)
    also = [c for c in args.also_log.split(",") if c]
    for category in also:
        try:
            extra = neighbours(bfcl.load(category), items)
        except FileNotFoundError:
            sys.exit(f"--also-log: BFCL has no category {category!r}")
        items += extra
        train_items += extra
    heldout_items = heldout_items[: args.heldout_limit] if args.heldout_limit else heldout_items
    check = bfcl._checker()
    root = args.out or Path(tempfile.mkdtemp(prefix="outpost-specialise-"))
    data_dir = root / "data"
    store = ModelStore(data_dir / "models")
    base_id = args.base or BASE
    candidates = [base_id]
    if args.base is None and not args.no_gemma:  # S4 has a second candidate to choose from
        candidates.append(GEMMA)
    for model_id in candidates:
        link_model(store, ModelStore(args.store), model_id)
    teacher = (f"cloud ({args.cloud_model} at {args.cloud_url})" if args.cloud_url
               else f"oracle (BFCL ground truth, {args.teacher})")
    result: dict[str, Any] = {"teacher": teacher, "oracle": None if args.cloud_url else args.teacher,
                              "machine": os.uname().nodename,
                              "cores": os.cpu_count(), "threads": args.threads, "augment": args.augment,
                              "train_questions": len(train_items), "heldout_questions": len(heldout_items),
                              "also_logged": also, "base_model": base_id}

    teaching = (contextlib.nullcontext(None) if args.cloud_url
                else OracleServer(items, minimal=args.teacher == "minimal"))
    with teaching as oracle:
        cloud = ({"base_url": oracle.base_url, "model": oracle.model, "api_key_env": None} if oracle else
                 {"base_url": args.cloud_url, "model": args.cloud_model, "api_key_env": args.cloud_key_env})
        settings = Settings.load(None, data_dir=data_dir, endpoint=f"ipc://{root}/outpost.sock",
                                 default_model=base_id, escalation={"policy": "shadow"},
                                 cloud={**cloud, "daily_max_requests": None, "daily_max_tokens": None},
                                 llama={"n_threads": args.threads})
        with EmbeddedDaemon(settings) as daemon, daemon.client(timeout_s=600) as client:
            # S1: the training half through the daemon, the oracle asked in shadow (once:
            # a run again with the same --out, or an interrupted one, goes on from the log).
            t0 = time.perf_counter()
            db = schema.open_db(settings.log_path)
            # Counted and exported: the requests the oracle was asked in shadow. The held-out
            # questions asked below are logged under the task too (an adapter's route names
            # it), with local answers that must never become targets of a run again.
            logged = {question_of(json.loads(m)) for (m,) in db.execute(
                "select messages from requests r where task = ? and exists (select 1 from attempts c "
                "where c.request_id = r.id and c.kind = 'cloud')", [TASK]).fetchall()}
            for item in _bar([i for i in train_items if question_of(i.messages) not in logged], "logging (shadow)"):
                client.request("chat", request(item, {"model": base_id, "task": TASK}, args.max_tokens, "shadow"))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and db.execute(
                    "select count(*) from attempts where kind = 'cloud'").fetchone()[0] < len(train_items):
                time.sleep(0.5)
            result["logging_s"] = round(time.perf_counter() - t0, 1)
            cost = db.execute("select avg(cost_usd) from attempts where kind = 'cloud'").fetchone()[0]
            result["cloud_usd_per_request"] = cost  # at [cloud] prices, for the oracle's token counts
            # S2: the export (the cloud's answers are the targets); 20% held out for the gate.
            report = export(db, root / "export" / "examples.jsonl", "openai", Filters(task=TASK, escalated=True),
                            val_share=0.2, advance_watermark=False)
            result["export"] = report.to_dict()
            examples = data.load(root / "export" / "examples.jsonl")
            result["gate_heldout"] = len(data.load(val_path_for(root / "export" / "examples.jsonl")))

            base = daemon.catalog.get(base_id)
            base_path = store.ensure_verified(base.weights)
            heldout_rows: dict[str, list[Asked]] = {}
            n_heldout = len(heldout_items)
            # What is kept in --out names a --base other than SmolLM2, so one dir's runs on
            # two bases never mix (SmolLM2's keep their names: earlier dirs resume).
            tag = "" if base_id == BASE else f"-{base_id}"
            base_file = f"heldout-base-{n_heldout}.json" if not tag else f"heldout{tag}-{n_heldout}.json"
            heldout_rows["base"] = asked_rows(root / base_file, lambda: [
                ask(client, item, {"model": base_id}, check, args.max_tokens)
                for item in _bar(heldout_items, "held-out: base")])

            # S4-S6 on every example, as `outpost specialise` runs them: select, train, gate, promote.
            settings_t = TrainSettings(rank=args.rank, alpha=args.alpha, epochs=args.epochs,
                                       learning_rate=args.lr, threads=args.threads)
            full = kept(root / f"specialise{tag}.json", lambda: specialise.run(settings, specialise.Options(
                task=TASK, examples=root / "export" / "examples.jsonl", bases=candidates,
                train=settings_t, max_tokens=args.max_tokens, augment=args.augment,
                workdir=root / "work" / "full")))
            result["specialise"] = full
            model_id, version = full["adapter"].split()
            if full["decision"] != "promoted":  # measure it anyway: the table says it was kept out
                client.activate(model_id, version)
            full_rows = asked_rows(root / f"heldout-{model_id}-{version}-{n_heldout}.json", lambda: [
                ask(client, item, {"model": model_id}, check, args.max_tokens)
                for item in _bar(heldout_items, f"held-out: n={len(examples)}")])
            heldout_rows["full"] = full_rows
            logged_examples = full["train"]["examples"] - full["train"].get("augmented", 0)  # the curve's x
            curve = [{"examples": logged_examples, "adapter": full["adapter"],
                      "train_wall_s": full["train"]["wall_s"], "steps": full["train"]["steps"],
                      "adapter_bytes": full["gguf_bytes"], **summary(full_rows, args.threshold)}]

            # The learning curve: the same training on the first n examples only, on the
            # base S4 chose (without --base it may be Gemma, not the base row's SmolLM2).
            base = daemon.catalog.get(full["base"].split()[0])
            base_path = store.ensure_verified(base.weights)
            for n in sorted((int(x) for x in args.sizes.split(",") if x), reverse=True):
                if n >= len(examples):
                    continue
                subset = examples[:n]
                curve_id = adapters.adapter_id(f"{TASK}-n{n}", base)
                trained = kept(root / f"curve{tag}-n{n}.json", lambda n=n, subset=subset, curve_id=curve_id: _train_point(
                    store, base, base_path, subset, settings_t, root, curve_id, n, args))
                client.activate(curve_id, "a1")
                rows = asked_rows(root / f"heldout-{curve_id}-a1-{n_heldout}.json", lambda n=n, curve_id=curve_id: [
                    ask(client, item, {"model": curve_id}, check, args.max_tokens)
                    for item in _bar(heldout_items, f"held-out: n={n}")])
                heldout_rows[f"n={n}"] = rows
                curve.append({"examples": n, "adapter": f"{curve_id} a1", **trained,
                              **summary(rows, args.threshold)})
            result["curve"] = sorted(curve, key=lambda c: c["examples"])
            result["base"] = summary(heldout_rows["base"], args.threshold)

            # Serving cost: one adapter throughout vs two alternating (each switch clears the
            # prompt cache, so it costs the call plus a full prefill of the next prompt).
            other = next((c["adapter"].split()[0] for c in curve if c["adapter"].split()[0] != model_id), None)
            if other is not None:
                stream = heldout_items[: args.switch_requests]
                one = [ask(client, item, {"model": model_id}, check, args.max_tokens) for item in stream]
                two = [ask(client, item, {"model": model_id if i % 2 else other}, check, args.max_tokens)
                       for i, item in enumerate(stream)]
                status = client.status()["loaded"]
                result["switching"] = {
                    "requests": len(stream),
                    "one_adapter_p50_ms": statistics.median(r.latency_ms for r in one),
                    "alternating_p50_ms": statistics.median(r.latency_ms for r in two),
                    "switches": sum(w.get("adapter_switches", 0) for w in status),
                    "switch_call_ms": switch_call_ms(base, base_path, [Path(full["gguf"]), root / f"{other}.gguf"]),
                }
            result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return _report(result, args)


def _report(result: dict[str, Any], args: argparse.Namespace) -> int:
    if args.svg:
        args.svg.write_text(curve_svg(result))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
