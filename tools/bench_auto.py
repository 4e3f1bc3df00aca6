"""Tool calls under `tool_choice: auto` on BFCL v4: does the model decide right between
calling and answering, and are the calls it makes right? Outpost before and after
calibration, beside the peers on the same GGUF and questions, in one run, one table.

    python -m outpost.tools.bench_auto [--limit N] [--calibration-limit M] [--follow-ups K]
                                       [--prompts bfcl plain] [--peers [PEER ...]] [--out DIR]
                                       [--threads T]

Questions: BFCL v4 categories where a call is expected (simple_python, multiple,
live_simple, live_multiple) and where none is (irrelevance, live_irrelevance), each
split in two by a hash of the question's id. The calibration half fits Outpost's rule
through `outpost models calibrate --data` (run as a command, on the labelled turns
this writes to DIR/calibration.jsonl); the scored half is all the table reports, so
no scored question is in the fit. Besides BFCL's questions, a `follow_up` turn is made
of every call question: its reference call made, the tool's result returned (`{"result":
"ok"}`), and the right decision now an answer (an agent loop's second turn).

Systems, each asked every scored question the same way (BFCL's system prompt, the
functions as `tools`, greedy, 256 tokens at most):
  outpost-uncalibrated  SmolLM2-135M without a rule: a call when the model itself puts
                        even odds on opening one
  outpost-auto          SmolLM2-135M with the rule fitted on the calibration half
  outpost-required      the same, tool_choice required, on the call categories: what AST
                        accuracy under auto is compared with
  llama-cpp-python      its OpenAI server, --chat_format chatml-function-calling
  llama-server          llama.cpp's server (--jinja), built from the source llama-cpp-python
                        vendors (once, a few minutes; as tools/bench_batching.py does)
The peers run on the same GGUF file, context (2048) and threads. With `--prompts ...
plain` (the default) the calibration half is asked both ways, and outpost-auto and the
peers answer the scored half a second time without the system prompt, as agents on
the OpenAI SDK and its frameworks ask: the rows `<system>/plain`.

Columns, per system and category: `decision` a call made where one is expected, none
where none is; `AST` BFCL's checker accepts the answer (no call, where none is
expected; under auto a missed call is an AST miss); `AST|call` the same over the answers
that made a call; `valid` every call parses and
passes its schema (and an expected call came); `p50 ms` per request, seen by the client.
The summary, per system: the call rate over the call categories, the no-call rate on
each irrelevance category and on the follow-ups, the balanced decision accuracy (the
mean of the call rate and the no-call rate over BFCL's irrelevance categories), AST
under auto and under required, and for Outpost the AUROC of its decision score.

Answers are kept in DIR (outcomes-<system>.jsonl): a run stopped part way resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from tqdm import tqdm

from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore
from outpost.models.toolcalls import validate_calls
from outpost.runtime.client import OutpostClient
from outpost.runtime.errors import OutpostError
from outpost.runtime.logs.stats import percentile

from . import bfcl
from .bench_batching import build_llama_cpp, threads_batch
from .bench_specialise import REPO_STORE, link_model
from .decision_fit import auroc
from .serve_process import ServeProcess, http_server

MODEL = "smollm2-135m-instruct"
UNCALIBRATED, CALIBRATED = "smollm2-uncalibrated", "smollm2-calibrated"
CALLS = ("simple_python", "multiple", "live_simple", "live_multiple")
NO_CALLS = ("irrelevance", "live_irrelevance")
FOLLOW_UP = "follow_up"
TOOL_RESULT = json.dumps({"result": "ok"})
MAX_TOKENS = 256
N_CTX = 2048  # SmolLM2's manifest: every system gets the same context
PEERS = ("llama-cpp-python", "llama-server")


def half(item_id: str) -> str:
    """`calibration` or `scored`, by a hash of the question's id: the same on every run."""
    return "calibration" if int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % 2 == 0 else "scored"


PROMPTS = ("bfcl", "plain")  # BFCL's system prompt first; or none, as agents on the SDKs send


@dataclass(frozen=True)
class Question:
    id: str  # BFCL's (a plain variant: with "~plain")
    category: str  # a BFCL category, or follow_up
    item: bfcl.Item  # BFCL's question, functions and answers (a follow-up: its call question's)
    messages: list[dict[str, Any]]  # as every system is asked
    tools: list[dict[str, Any]]
    prompt: str = "bfcl"  # bfcl: BFCL's system prompt first; plain: no system prompt

    @property
    def expects_call(self) -> bool:
        return self.category != FOLLOW_UP and bfcl.expects_call(self.category)


def reference_call(item: bfcl.Item) -> dict[str, Any] | None:
    """The first of BFCL's possible answers as an OpenAI tool call (each argument's first
    accepted value; an optional one BFCL accepts absent is left out)."""
    if not item.answer:
        return None
    (name, options), = item.answer[0].items()
    args = {k: v[0] for k, v in options.items() if v and v[0] != ""}
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def questions(categories: list[str], which: str, limit: int | None, follow_ups: int,
              prompts: tuple[str, ...] = ("bfcl",)) -> list[Question]:
    """One half of each category, the first `limit` by hash order (None: all), and the
    follow-ups of the first `follow_ups` call questions among them; asked with each of
    `prompts` (a plain question is the same turn without BFCL's system prompt)."""
    out: list[Question] = []
    for prompt in prompts:
        asked: list[Question] = []
        follow: list[Question] = []
        tag = "" if prompt == "bfcl" else f"~{prompt}"
        for category in categories:
            # A question offering no function has nothing to decide (a few in live_irrelevance).
            items = sorted((i for i in bfcl.load(category) if half(i.id) == which and i.functions),
                           key=lambda i: hashlib.sha256(i.id.encode()).hexdigest())[:limit]
            for item in items:
                system = [{"role": "system", "content": bfcl.system_prompt()}] if prompt == "bfcl" else []
                messages = [*system, *item.messages]
                q = Question(item.id + tag, category, item, messages, bfcl.to_tools(item.functions), prompt)
                asked.append(q)
                call = reference_call(item) if q.expects_call else None
                if call is not None:
                    follow.append(Question(f"{item.id}+result{tag}", FOLLOW_UP, item, [
                        *messages, {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_1", "content": TOOL_RESULT}], q.tools, prompt))
        out += asked + follow[:follow_ups]
    return out


def labelled_line(q: Question) -> str:
    return json.dumps({"id": q.id, "messages": q.messages, "tools": q.tools, "call": q.expects_call,
                       "parallel_tool_calls": False}, ensure_ascii=False)


# -- answers and their scores ----------------------------------------------------------------
@dataclass
class Answer:
    system: str
    id: str
    category: str
    called: bool
    decision_right: bool
    ast: bool
    valid: bool
    latency_ms: float
    error: str | None = None
    score: float | None = None  # Outpost's decision score (log-odds that a call is needed)
    calls: list[Any] = field(default_factory=list)


def judge(system: str, q: Question, message: dict[str, Any], latency_ms: float, check: Any,
          score: float | None = None, error: str | None = None) -> Answer:
    tool_calls = message.get("tool_calls") or []
    calls, parsed = [], True
    for call in tool_calls:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            args, parsed = fn.get("arguments"), False
        parsed = parsed and isinstance(args, dict)
        calls.append({fn.get("name"): args})
    valid = all(r["valid"] for r in validate_calls(tool_calls, q.tools)) and (bool(calls) or not q.expects_call)
    if error is not None:  # no answer at all: right about nothing
        return Answer(system, q.id, q.category, called=False, decision_right=False, ast=False, valid=False,
                      latency_ms=latency_ms, error=error)
    if q.expects_call:
        try:
            ast = bool(calls) and parsed and bfcl.score_calls(q.item, calls, parsed, check)
        except Exception:  # noqa: BLE001 (the checker on an answer it cannot read: wrong)
            ast = False
    else:
        ast = not calls
    return Answer(system, q.id, q.category, called=bool(calls), decision_right=bool(calls) == q.expects_call,
                  ast=ast, valid=valid, latency_ms=latency_ms, error=error, score=score, calls=calls)


def ask_outpost(client: OutpostClient, model: str, choice: str) -> Callable[[Question, Any], Answer]:
    def ask(q: Question, check: Any) -> Answer:
        t0 = time.perf_counter()
        try:
            reply = client.request("chat", {"model": model, "messages": q.messages, "tools": q.tools,
                                            "tool_choice": choice, "parallel_tool_calls": False,
                                            "max_tokens": MAX_TOKENS, "temperature": 0.0, "escalation": "off"})
        except OutpostError as exc:
            return judge(f"{model}/{choice}", q, {}, (time.perf_counter() - t0) * 1e3, check,
                         error=f"{exc.code}: {exc.message}")
        decision = reply["outpost"].get("decision") or {}
        return judge(f"{model}/{choice}", q, reply["choices"][0]["message"], (time.perf_counter() - t0) * 1e3,
                     check, score=decision.get("score"))
    return ask


def ask_http(url: str, name: str) -> Callable[[Question, Any], Answer]:
    http = httpx.Client(timeout=300)

    def ask(q: Question, check: Any) -> Answer:
        # An assistant turn that only called says `content: ""` rather than null: llama-cpp-
        # python's server refuses null there, and its chatml-function-calling template a
        # missing key (OpenAI's API takes null; the two mean the same).
        messages = [{**m, "content": ""} if m.get("content", "") is None else m for m in q.messages]
        body = {"model": MODEL, "messages": messages, "tools": q.tools, "tool_choice": "auto",
                "max_tokens": MAX_TOKENS, "temperature": 0.0}
        t0 = time.perf_counter()
        try:
            resp = http.post(f"{url}/v1/chat/completions", json=body)
            latency = (time.perf_counter() - t0) * 1e3
            if resp.status_code != 200:
                return judge(name, q, {}, latency, check, error=f"HTTP {resp.status_code}: {resp.text[:200]}")
            return judge(name, q, resp.json()["choices"][0]["message"], latency, check)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return judge(name, q, {}, (time.perf_counter() - t0) * 1e3, check, error=repr(exc))
    return ask


def run_system(name: str, ask: Callable[[Question, Any], Answer], asked: list[Question], out: Path,
               check: Any) -> list[Answer]:
    """Every question asked once; answers kept in `out` as they come (a rerun resumes)."""
    done: dict[str, Answer] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            a = Answer(**json.loads(line))
            done[a.id] = a
    todo = [q for q in asked if q.id not in done]
    with open(out, "a") as fh, tqdm(total=len(asked), initial=len(asked) - len(todo), desc=name,
                                     unit="q", file=sys.stderr, disable=None) as bar:
        for q in todo:
            a = ask(q, check)
            a.system = name
            done[q.id] = a
            fh.write(json.dumps(asdict(a)) + "\n")
            fh.flush()
            bar.update()
    return [done[q.id] for q in asked]


def variant(text: str, model_id: str, rule: dict[str, Any] | None) -> str:
    """The catalog manifest of SmolLM2 under another id, with `rule` (None: without one)."""
    import tomli_w  # noqa: PLC0415

    doc = tomllib.loads(text)
    doc["id"] = model_id
    doc.pop("decision", None)
    if rule is not None:
        doc["decision"] = rule
    out = tomli_w.dumps(doc)
    Manifest.from_toml(out, model_id)
    return out


def fit(data: Path, lines: list[str], out: Path, threads: int) -> dict[str, Any]:
    """`outpost models calibrate --data` on the calibration half: its report (cached in
    `out` by the labelled turns' sha256)."""
    text = "\n".join(lines) + "\n"
    sha = hashlib.sha256(text.encode()).hexdigest()
    cached = out / "calibration.json"
    if cached.exists() and (report := json.loads(cached.read_text())).get("data_sha256") == sha:
        return report
    (out / "calibration.jsonl").write_text(text)
    exe = str(Path(sys.executable).with_name("outpost"))
    env = {**os.environ, "OUTPOST_DATA_DIR": str(data)}
    proc = subprocess.run([exe, "models", "calibrate", MODEL, "--data", str(out / "calibration.jsonl"),
                           "--threads", str(threads), "--json"], env=env, stdout=subprocess.PIPE, check=True)
    report = {**json.loads(proc.stdout), "data_sha256": sha}
    cached.write_text(json.dumps(report, indent=2))
    return report


# -- the report ------------------------------------------------------------------------------
def summarize(answers: list[Answer]) -> dict[str, Any]:
    n = len(answers)
    made = [a for a in answers if a.called]
    return {"n": n, "decision": sum(a.decision_right for a in answers) / n, "ast": sum(a.ast for a in answers) / n,
            "ast_of_calls": sum(a.ast for a in made) / len(made) if made else None,
            "valid": sum(a.valid for a in answers) / n, "errors": sum(a.error is not None for a in answers),
            "p50_ms": percentile([a.latency_ms for a in answers], 0.5)}


def system_summary(answers: list[Answer]) -> dict[str, Any]:
    calls = [a for a in answers if a.category in CALLS]
    irrelevant = [a for a in answers if a.category in NO_CALLS]
    out: dict[str, Any] = {
        "call_rate": sum(a.called for a in calls) / len(calls) if calls else None,
        "ast": sum(a.ast for a in calls) / len(calls) if calls else None,
        # An error decided nothing: it counts against the system, as in the per-category rows.
        **{f"no_call_{c}": (sum(a.decision_right for a in mine) / len(mine)
                            if (mine := [a for a in answers if a.category == c]) else None)
           for c in (*NO_CALLS, FOLLOW_UP)}}
    if calls and irrelevant:
        out["balanced"] = (out["call_rate"] + sum(a.decision_right for a in irrelevant) / len(irrelevant)) / 2
    scored = [a for a in answers if a.score is not None and a.category != FOLLOW_UP]
    if scored:
        out["auroc"] = auroc(np.array([a.score for a in scored]), np.array([a.category in CALLS for a in scored]))
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    def cell(value: Any, width: int, form: str = ".1%") -> str:
        return f"{value:>{width}{form}}" if isinstance(value, float) else f"{'-':>{width}}"

    head = (f"{'system':<22} {'category':<17} {'n':>4} {'decision':>9} {'AST':>6} {'AST|call':>9} {'valid':>6} "
            f"{'p50 ms':>7}")
    lines = [head, "-" * len(head)]
    for system, r in results.items():
        for category, s in r["categories"].items():
            lines.append(f"{system:<22} {category:<17} {s['n']:>4} {s['decision']:>9.1%} {s['ast']:>6.1%} "
                         f"{cell(s['ast_of_calls'], 9)} {s['valid']:>6.1%} {s['p50_ms']:>7.0f}"
                         + (f"  ({s['errors']} errors)" if s["errors"] else ""))
    lines += ["", f"{'system':<22} {'calls':>6} {'no call: irr':>12} {'live_irr':>9} {'follow-up':>10} "
                  f"{'balanced':>9} {'AST':>6} {'AUROC':>6}"]

    for system, r in results.items():
        s = r["summary"]
        lines.append(f"{system:<22} {cell(s.get('call_rate'), 6)} {cell(s.get('no_call_irrelevance'), 12)} "
                     f"{cell(s.get('no_call_live_irrelevance'), 9)} {cell(s.get('no_call_follow_up'), 10)} "
                     f"{cell(s.get('balanced'), 9)} {cell(s.get('ast'), 6)} {cell(s.get('auroc'), 6, '.3f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m outpost.tools.bench_auto", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--limit", type=int, default=100, help="scored questions per category (default 100)")
    ap.add_argument("--calibration-limit", type=int, default=None,
                    help="calibration questions per category (default: the whole calibration half)")
    ap.add_argument("--follow-ups", type=int, default=100,
                    help="follow-up turns in each half (default 100)")
    ap.add_argument("--categories", nargs="+", default=[*CALLS, *NO_CALLS], choices=[*CALLS, *NO_CALLS])
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=PROMPTS,
                    help="how questions are asked: bfcl (BFCL's system prompt first) and plain (no system "
                         "prompt, as agents on the SDKs ask); the fit sees each, and the scored half asked "
                         "plain is a row of its own for outpost-auto and the peers (default both)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads, every system")
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, metavar="PEER",
                    help=f"the peers to ask beside Outpost: {' '.join(PEERS)} (default both; none: Outpost only)")
    ap.add_argument("--store", type=Path, default=REPO_STORE, help="where SmolLM2 is pulled already")
    ap.add_argument("--out", type=Path, default=Path(".cache/bench_auto"), help="answers and the report")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    check = bfcl._checker()

    data = out / "data"
    store = ModelStore(data / "models")
    link_model(store, ModelStore(args.store), MODEL)
    entry_text = (store.manifests / f"{MODEL}.toml").read_text()
    prompts = tuple(p for p in PROMPTS if p in args.prompts)
    calibration = questions(args.categories, "calibration", args.calibration_limit, args.follow_ups, prompts)
    scored = questions(args.categories, "scored", args.limit, args.follow_ups)
    plain = questions(args.categories, "scored", args.limit, args.follow_ups, ("plain",)) if "plain" in prompts else []
    print(f"calibration half: {len(calibration)} turns; scored half: {len(scored)} questions"
          + (f", {len(plain)} asked plain too" if plain else ""), flush=True)
    report = fit(data, [labelled_line(q) for q in calibration], out, args.threads)
    print(f"rule fitted on the calibration half: AUROC {report['auroc']:.3f} held out, threshold "
          f"{report['operating_point']['threshold']:.3f}", flush=True)
    for model_id, rule in ((UNCALIBRATED, None), (CALIBRATED, report["rule"])):
        text = variant(entry_text, model_id, rule)
        store.pull(Manifest.from_toml(text, model_id), text)  # the blob is there: nothing is fetched

    answers: dict[str, list[Answer]] = {}
    config = (f'default_model = "{MODEL}"\npreload = []\n[llama]\nn_threads = {args.threads}\n'
              f'[server]\nrequest_timeout_s = 600\n')
    # The calibrated answers are kept by the fit that made their rule: a new fit asks again.
    fitted = report["data_sha256"][:12]
    with ServeProcess(data, config, "bench-auto", start_timeout_s=300) as d, d.client(timeout_s=600) as client:
        answers["outpost-uncalibrated"] = run_system(
            UNCALIBRATED, ask_outpost(client, UNCALIBRATED, "auto"), scored,
            out / f"outcomes-{UNCALIBRATED}.jsonl", check)
        answers["outpost-auto"] = run_system(
            CALIBRATED, ask_outpost(client, CALIBRATED, "auto"), scored,
            out / f"outcomes-{CALIBRATED}-{fitted}.jsonl", check)
        if plain:
            answers["outpost-auto/plain"] = run_system(
                f"{CALIBRATED}/plain", ask_outpost(client, CALIBRATED, "auto"), plain,
                out / f"outcomes-{CALIBRATED}-{fitted}-plain.jsonl", check)
        answers["outpost-required"] = run_system(
            "required", ask_outpost(client, CALIBRATED, "required"),
            [q for q in scored if q.category in CALLS], out / "outcomes-required.jsonl", check)
    gguf = str(store.weights_path(Manifest.from_toml(entry_text, MODEL)))
    if "llama-cpp-python" in args.peers:
        with http_server([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(args.threads),
                          "--n_ctx", str(N_CTX), "--host", "127.0.0.1", "--chat_format", "chatml-function-calling"],
                         "/v1/models", "llama_cpp.server") as url:
            answers["llama-cpp-python"] = run_system("llama-cpp-python", ask_http(url, "llama-cpp-python"), scored,
                                                     out / "outcomes-llama-cpp-python.jsonl", check)
            if plain:
                answers["llama-cpp-python/plain"] = run_system(
                    "llama-cpp-python/plain", ask_http(url, "llama-cpp-python"), plain,
                    out / "outcomes-llama-cpp-python-plain.jsonl", check)
    if "llama-server" in args.peers:
        bin_dir = build_llama_cpp()
        with http_server([str(bin_dir / "llama-server"), "-m", gguf, "--host", "127.0.0.1", "-t", str(args.threads),
                          "-tb", str(threads_batch(args.threads)), "-c", str(N_CTX), "--parallel", "1", "--jinja",
                          "--no-webui"], "/health", "llama-server") as url:
            answers["llama-server"] = run_system("llama-server", ask_http(url, "llama-server"), scored,
                                                 out / "outcomes-llama-server.jsonl", check)
            if plain:
                answers["llama-server/plain"] = run_system(
                    "llama-server/plain", ask_http(url, "llama-server"), plain,
                    out / "outcomes-llama-server-plain.jsonl", check)

    results = {}
    for system, mine in answers.items():
        cats = {c: summarize(rows) for c in [*args.categories, FOLLOW_UP] if (rows := [a for a in mine if a.category == c])}
        results[system] = {"categories": cats, "summary": system_summary(mine)}
    doc = {"machine": f"{platform.machine()}, {psutil.cpu_count(logical=False)} cores, threads {args.threads}",
           "scored_per_category": args.limit, "prompts": list(prompts),
           "calibration": {k: report.get(k) for k in ("turns", "calls", "auroc", "auroc_open_only",
                                                      "operating_point", "left_out", "evidence_s",
                                                      "evidence_cached")},
           "results": results}
    (out / "bench_auto.json").write_text(json.dumps(doc, indent=2))
    print(table(results))
    print(f"\nfull report: {out / 'bench_auto.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
