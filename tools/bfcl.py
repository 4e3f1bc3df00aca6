"""BFCL v4 against Outpost: grammar-constrained vs unconstrained tool calls, side by side.

    python -m outpost.tools.bfcl [--model M [M ...]] [--limit N] [--categories C ...] [--json]
                                 [--endpoint URL | --in-process]

Data and scoring come from the `bfcl-eval` package (BFCL v4 question files, possible
answers and its AST checker). Install it without its dependencies; it is a benchmark
input, not part of the runtime:

    .venv/bin/pip install --no-deps bfcl-eval

Each question is asked twice through the real wire protocol, with the same prompt:
  constrained     Outpost's xgrammar grammar: every call is well-formed and follows
                  its tool's JSON Schema;
  unconstrained   the same model and prompt, decoded freely (`constrained: false`);
                  calls are parsed from the text afterwards.

Prompt. BFCL's own system prompt for prompted models (its "classic" persona, task
and multi-turn text) is sent as the system message, and the functions go in `tools`
(converted to JSON Schema with BFCL's own type mapping, as BFCL does for
function-calling models). Deviation: the function list and the output format are
those of Outpost's tools block (`<tool_call>{"name", "arguments"}</tool_call>`, the
format the grammar enforces), not BFCL's Python-call list.

tool_choice. A category whose answers are calls (simple_python, multiple, parallel,
parallel_multiple) asks with `required`; `irrelevance`, where the right answer is
not to call, asks with `auto`. `parallel_tool_calls` is true only for the parallel
categories.

Several --model ids are asked the same questions one model after another (each is
loaded once) and reported in one table, a row per model, category and mode; --json
gives `results[model][category][mode]`.

Columns, per model, category and mode:
  ast          BFCL's AST checker accepts the answer (irrelevance: no call was made)
  valid        every call parses and validates against its schema (and, where calls
               are expected, there is at least one)
  executable   every call names an offered function and its arguments bind to that
               function's signature (required present, none unknown), checked
               against BFCL's function docs rather than Outpost's schemas
  repaired     calls that were cut short after a degenerate repetition and closed
  p50/p95 ms   wall time per request, seen by the client
  tokens       generated tokens, mean per request

--escalation (constrained mode). Every local answer carries Outpost's confidence
(runtime/escalation/confidence.py); the requests ask with `escalation: "off"`, so the daemon
answers locally and the harness replays the routing for every threshold from the
one run. Per threshold t: the share of calls kept local (confidence >= t), the local
accuracy on those, and over all thresholds the AUROC of confidence as a predictor of
a correct call (selective prediction: 1.0 ranks every right call above every wrong
one, 0.5 is chance). With a cloud (--cloud-url, or [cloud] in the config) each
question is also asked there once, with the same messages and tools, and scored by
the same checker: the table then adds end-to-end accuracy (kept calls local, the
rest from the cloud) and the cloud tokens spent. `--plot FILE` draws the curve (PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from outpost.runtime.errors import CloudError, OutpostError
from outpost.runtime.client import OutpostClient
from outpost.runtime.escalation.cloud import CloudClient
from outpost.runtime.config import Settings
from outpost.runtime.embedded import EmbeddedDaemon
from outpost.runtime.logs.stats import percentile

from .bfcl_routing import auroc, plot, routing, routing_table  # noqa: F401 (auroc: the harness's API)

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
MODES = ("constrained", "unconstrained")
CHECKER_MODEL = "outpost"  # the model name handed to BFCL's checker (see _checker)


@dataclass
class Item:
    id: str
    category: str
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    answer: list[dict[str, Any]] | None  # possible answers; None for irrelevance


@dataclass
class Outcome:
    id: str
    category: str
    mode: str
    ast: bool
    valid: bool
    executable: bool
    repaired: int
    latency_ms: float
    tokens: int
    calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    confidence: dict[str, Any] = field(default_factory=dict)
    score: float | None = None  # outpost.confidence
    cloud_ast: bool | None = None  # the cloud's answer to the same question, scored
    cloud_tokens: int = 0
    model: str | None = None  # the manifest asked (None: the daemon's default)


# -- BFCL data and checker ----------------------------------------------------------------
def expects_call(category: str) -> bool:
    """Whether a category's right answers are calls (`irrelevance`, `live_irrelevance`: none)."""
    return "irrelevance" not in category


def _bfcl_root() -> Any:
    try:
        return resources.files("bfcl_eval")
    except ModuleNotFoundError:
        sys.exit("bfcl-eval is not installed: .venv/bin/pip install --no-deps bfcl-eval")


def load(category: str, limit: int | None = None) -> list[Item]:
    data = _bfcl_root() / "data"
    questions = [json.loads(line) for line in
                 (data / f"BFCL_v4_{category}.json").read_text().splitlines() if line.strip()]
    answers: dict[str, Any] = {}
    if expects_call(category):
        for line in (data / "possible_answer" / f"BFCL_v4_{category}.json").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                answers[row["id"]] = row["ground_truth"]
    items = []
    for q in questions[:limit]:
        # Single-turn categories: one turn, possibly with its own system message.
        items.append(Item(id=q["id"], category=category, messages=q["question"][0],
                          functions=q["function"], answer=answers.get(q["id"])))
    return items


def _checker() -> Any:
    """BFCL's AST checker, imported without the model-client packages bfcl-eval pulls.

    The checker imports `MODEL_CONFIG_MAPPING` only to ask whether a model's function
    names had their dots rewritten to underscores. Outpost keeps dots, so a registry
    that answers "no" for every model stands in for the real one, which would import
    every vendor SDK BFCL supports.
    """
    name = "bfcl_eval.constants.model_config"
    if name not in sys.modules:
        registry = types.ModuleType(name)

        class _KeepsDots(dict):
            def __missing__(self, key: str) -> Any:
                return types.SimpleNamespace(underscore_to_dot=False)

        registry.MODEL_CONFIG_MAPPING = _KeepsDots()
        sys.modules[name] = registry
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return lambda item, calls: ast_checker(item.functions, calls, item.answer, Language.PYTHON,
                                           item.category, CHECKER_MODEL)


def system_prompt() -> str:
    """BFCL's classic system prompt, without its output format and function list,
    which Outpost's tools block supplies."""
    from bfcl_eval.constants.default_prompts import PROMPT_STYLE_TEMPLATES

    style = PROMPT_STYLE_TEMPLATES["classic"]
    return f"{style['persona']} {style['task']}\n\n{style['multiturn_behavior']}"


def to_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BFCL function docs -> OpenAI tools, with BFCL's own type mapping (dict -> object,
    float -> number, tuple -> array, any -> string)."""
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI

    def schema(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "type" and isinstance(value, str):
                    out[key] = GORILLA_TO_OPENAPI.get(value, value)
                elif key == "properties" and isinstance(value, dict):
                    out[key] = {k: schema(v) for k, v in value.items()}
                elif key in ("items", "additionalProperties"):
                    out[key] = schema(value)
                elif key == "optional":
                    continue  # BFCL's own marker; `required` already says it
                else:
                    out[key] = copy.deepcopy(value)
            return out
        return node

    tools = []
    for fn in functions:
        params = schema(fn.get("parameters") or {})
        params["type"] = "object"
        tools.append({"type": "function", "function": {
            "name": fn["name"], "description": fn.get("description", ""), "parameters": params}})
    return tools


# -- scoring ------------------------------------------------------------------------------
def executable(calls: list[dict[str, Any]], functions: list[dict[str, Any]]) -> bool:
    docs = {f["name"]: f.get("parameters") or {} for f in functions}
    for call in calls:
        ((name, args),) = call.items()
        if name not in docs or not isinstance(args, dict):
            return False
        params = docs[name]
        known = set(params.get("properties", {}))
        if set(args) - known or set(params.get("required", [])) - set(args):
            return False
    return True


def ask(client: OutpostClient, item: Item, mode: str, model: str | None, max_tokens: int,
        check: Any) -> Outcome:
    expected = expects_call(item.category)
    params: dict[str, Any] = {
        "escalation": "off",  # the local answer and its confidence; routing is replayed here
        "messages": [{"role": "system", "content": system_prompt()}, *item.messages],
        "tools": to_tools(item.functions),
        "tool_choice": "required" if expected else "auto",
        "parallel_tool_calls": "parallel" in item.category,
        "max_tokens": max_tokens, "constrained": mode == "constrained"}
    if model:
        params["model"] = model
    t0 = time.perf_counter()
    try:
        reply = client.request("chat", params)
    except OutpostError as exc:
        return Outcome(item.id, item.category, mode, ast=False, valid=False, executable=False,
                       repaired=0, latency_ms=(time.perf_counter() - t0) * 1e3, tokens=0,
                       error=f"{exc.code}: {exc.message}", model=model)
    latency = (time.perf_counter() - t0) * 1e3
    message = reply["choices"][0]["message"]
    report = reply["outpost"]["validation"]
    calls = []
    for call in message.get("tool_calls") or []:
        try:
            args = json.loads(call["function"]["arguments"])
        except json.JSONDecodeError:
            args = call["function"]["arguments"]
        calls.append({call["function"]["name"]: args})
    # An answer that should call but does not is neither valid nor executable.
    parsed = all(isinstance(next(iter(c.values())), dict) for c in calls) and (
        bool(calls) or not expected)
    valid = all(r["valid"] for r in report) and (bool(calls) or not expected)
    ast = score_calls(item, calls, parsed, check)
    return Outcome(item.id, item.category, mode, ast=ast, valid=valid,
                   executable=parsed and executable(calls, item.functions),
                   repaired=sum(bool(r.get("repaired")) for r in report), latency_ms=latency,
                   tokens=reply["usage"]["completion_tokens"], calls=calls,
                   confidence={"logprob": reply["outpost"].get("logprob"), "calls": report,
                               "parts": reply["outpost"].get("confidence_parts")},
                   score=reply["outpost"].get("confidence"), model=model)


def score_calls(item: Item, calls: list[dict[str, Any]], parsed: bool, check: Any) -> bool:
    if not expects_call(item.category):
        return not calls  # BFCL irrelevance: the right answer makes no call
    return bool(calls) and parsed and check(item, calls)["valid"]


def ask_cloud(cloud: Any, loop: asyncio.AbstractEventLoop, item: Item, max_tokens: int,
              check: Any) -> tuple[bool, int]:
    """(the cloud's answer is right, tokens it cost); a failed request counts as wrong."""
    expected = expects_call(item.category)
    tools = to_tools(item.functions)
    choice: Any = "required" if expected else "auto"
    if expected and len(tools) == 1:  # the same demand, in the form every server takes
        choice = {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
    try:
        answer = loop.run_until_complete(cloud.ask([{"role": "system", "content": system_prompt()}, *item.messages],
                                       tools, choice,
                                       "parallel" in item.category, max_tokens))
    except CloudError:
        return False, 0
    calls = []
    for call in answer.tool_calls:
        try:
            calls.append({call["function"]["name"]: json.loads(call["function"]["arguments"])})
        except (KeyError, TypeError, json.JSONDecodeError):
            return False, answer.prompt_tokens + answer.completion_tokens
    return score_calls(item, calls, True, check), answer.prompt_tokens + answer.completion_tokens


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    return {
        "n": n,
        "ast": sum(o.ast for o in outcomes) / n,
        "valid": sum(o.valid for o in outcomes) / n,
        "executable": sum(o.executable for o in outcomes) / n,
        "repaired": sum(o.repaired for o in outcomes),
        "errors": sum(o.error is not None for o in outcomes),
        "p50_ms": percentile([o.latency_ms for o in outcomes], 0.5),
        "p95_ms": percentile([o.latency_ms for o in outcomes], 0.95),
        "tokens_mean": statistics.mean(o.tokens for o in outcomes),
    }


def table(results: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> str:
    """One table: a row per model, category and mode (`results` as `summarize_all` makes)."""
    width = max(len("model"), *(len(m) for m in results))
    head = (f"{'model':<{width}} {'category':<18} {'mode':<13} {'n':>4} {'ast':>6} {'valid':>6} "
            f"{'exec':>6} {'repaired':>8} {'p50 ms':>7} {'p95 ms':>7} {'tokens':>6}")
    lines = [head, "-" * len(head)]
    for model, categories in results.items():
        for category, modes in categories.items():
            for mode, s in modes.items():
                lines.append(f"{model:<{width}} {category:<18} {mode:<13} {s['n']:>4} {s['ast']:>6.1%} "
                             f"{s['valid']:>6.1%} {s['executable']:>6.1%} {s['repaired']:>8} "
                             f"{s['p50_ms']:>7.0f} {s['p95_ms']:>7.0f} {s['tokens_mean']:>6.1f}")
    return "\n".join(lines)


def summarize_all(outcomes: list[Outcome], models: list[str | None], categories: list[str],
                  modes: list[str]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """model -> category -> mode -> summary; the daemon's default model is keyed "default"."""
    results: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for model in models:
        for category in categories:
            for mode in modes:
                mine = [o for o in outcomes
                        if o.model == model and o.category == category and o.mode == mode]
                if mine:
                    results.setdefault(model or "default", {}).setdefault(category, {})[mode] = summarize(mine)
    return results


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m outpost.tools.bfcl",
        description="Run BFCL v4 categories against an Outpost daemon, grammar-constrained "
                    "and unconstrained side by side, scored by BFCL's AST checker.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", nargs="+", default=[None], metavar="ID",
                    help="manifest id (default: the daemon's default model); several ids are "
                         "asked the same questions in turn and reported in one table, e.g. a "
                         "GGUF model and its ONNX conversions")
    ap.add_argument("--limit", type=int, help="first N questions of each category")
    ap.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--max-tokens", type=int, default=256, help="per answer (default 256)")
    ap.add_argument("--endpoint", help="daemon endpoint (default: from config / OUTPOST_ENDPOINT)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the daemon inside this process (configured data dir and models, "
                         "a private socket) instead of connecting to one")
    ap.add_argument("--config", type=Path, help="config file (for the endpoint)")
    ap.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    ap.add_argument("--outcomes", type=Path, help="also write every answer as JSON lines here")
    ap.add_argument("--escalation", action="store_true",
                    help="replay confidence-based routing over thresholds (constrained mode)")
    ap.add_argument("--thresholds", type=float, nargs="+",
                    default=[round(0.05 * i, 2) for i in range(21)], metavar="T")
    ap.add_argument("--cloud-url", help="OpenAI-compatible base URL to score as the cloud "
                                        "(default: [cloud] base_url of the config)")
    ap.add_argument("--cloud-model", help="the cloud's model name (default: [cloud] model)")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="draw the escalation curve here")
    return ap


# The harness's run read top to bottom (daemon, cloud, questions, report): kept whole.
def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.escalation:
        args.modes = ["constrained"]
        if len(args.model) > 1:
            ap.error("--escalation replays one model's answers: give one --model")

    check = _checker()
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        if args.in_process:
            sockets = stack.enter_context(tempfile.TemporaryDirectory(prefix="outpost-bfcl-"))
            settings = Settings.load(args.config, endpoint=f"ipc://{sockets}/outpost.sock")
            endpoint = stack.enter_context(EmbeddedDaemon(settings)).settings.endpoint
        else:
            endpoint = args.endpoint or Settings.load(args.config).endpoint
        client = stack.enter_context(OutpostClient(endpoint, timeout_s=600))
        client.ping(timeout_s=5)  # fail fast, with the daemon_unreachable message
        cloud = None
        if args.escalation:
            cfg = Settings.load(args.config).cloud
            if args.cloud_url or args.cloud_model:
                cfg = cfg.model_copy(update={k: v for k, v in (("base_url", args.cloud_url),
                                                               ("model", args.cloud_model)) if v})
            if cfg.base_url:
                cloud = CloudClient(cfg.model_copy(update={"daily_max_requests": None,
                                                           "daily_max_tokens": None}))
                loop = asyncio.new_event_loop()  # one loop: the client keeps its connections
                stack.callback(loop.close)
                stack.callback(lambda: loop.run_until_complete(cloud.close()))
        for category in args.categories:
            items = load(category, args.limit)
            # Model by model, so that each is loaded once (the pool may hold only one).
            bar = tqdm(total=len(items) * len(args.modes) * len(args.model), desc=category,
                       unit="q", disable=args.json or not sys.stderr.isatty())
            for model in args.model:
                for item in items:
                    for mode in args.modes:
                        outcome = ask(client, item, mode, model, args.max_tokens, check)
                        if cloud is not None:
                            outcome.cloud_ast, outcome.cloud_tokens = ask_cloud(cloud, loop, item, args.max_tokens, check)
                        outcomes.append(outcome)
                        bar.update()
            bar.close()
    results = summarize_all(outcomes, args.model, args.categories, args.modes)
    if args.outcomes:
        with open(args.outcomes, "w") as out:
            for o in outcomes:
                out.write(json.dumps(o.__dict__) + "\n")
    replay = routing(outcomes, sorted(args.thresholds)) if args.escalation else None
    if replay is not None and args.plot:
        plot(replay, args.plot, f"BFCL {', '.join(args.categories)}, {args.model[0] or 'default model'}")
    if args.json:
        print(json.dumps({"models": [m or "default" for m in args.model], "endpoint": endpoint,
                          "results": results, "escalation": replay}, indent=2))
    else:
        print(table(results))
        if replay is not None:
            print()
            print(routing_table(replay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
