"""`outpost` command line: serve, call, status, models, logs.

Settings are loaded once here and handed down. Output is for people by default and
JSON with `--json`. Exit codes: 0 ok, 1 the daemon or the store reported an error,
2 bad usage, 3 no daemon answered, 4 `models verify` found a bad file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from outpost.manifests.catalog import Catalog, model_row
from outpost.manifests.errors import ConfigError, DaemonUnreachable, OutpostError
from outpost.manifests.store import ModelStore

from . import logstore
from .client import OutpostClient
from .config import Settings
from . import VERSION

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BAD_FILE = 1, 2, 3, 4
EXAMPLE_TOOLS = "examples/weather_tool.json"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load(args.config, data_dir=args.data_dir,
                                 endpoint=getattr(args, "endpoint", None))
        return args.run(args, settings) or 0
    except DaemonUnreachable as exc:
        print(f"outpost: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ConfigError as exc:
        print(f"outpost: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except (OutpostError, sqlite3.Error) as exc:
        if isinstance(exc, sqlite3.Error):  # the log, read here: locked, full, broken
            exc = logstore.typed(exc, settings.log_path)
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.to_wire()}, default=str))
        else:
            print(f"outpost: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `outpost logs clusters | head`: the reader has all it wanted
        sys.stderr.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML settings file (env: OUTPOST_CONFIG)")
    common.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="model store and logs.db live here (env: OUTPOST_DATA_DIR)")
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--endpoint", metavar="URL",
                        help="daemon endpoint, ipc://PATH or tcp://127.0.0.1:PORT (env: OUTPOST_ENDPOINT)")
    client.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="seconds to wait for the daemon (default 300)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable JSON output")

    parser = argparse.ArgumentParser(
        prog="outpost", description="Edge agent runtime: small language models answering "
        "local agents over ZeroMQ with grammar-constrained tool calls.")
    parser.add_argument("--version", action="version", version=f"outpost {VERSION}")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common, client], help="run the daemon in the foreground",
                       description="Run the daemon in the foreground until Ctrl-C or SIGTERM.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("call", parents=[common, client, as_json], help="send one chat request",
                       description="Send one prompt to the daemon and print the answer. With "
                       "--tools the model must call one of the tools (tool_choice 'required'); "
                       "pass --tool-choice auto to let it answer in text instead.")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", metavar="ID", help="manifest id (default: the configured default model)")
    p.add_argument("--task", metavar="TASK", help="route by task instead of model id")
    p.add_argument("--tools", type=Path, metavar="FILE", help="JSON file with an OpenAI `tools` array")
    p.add_argument("--tool-choice", metavar="CHOICE",
                   help="auto | none | required | a function name (default: required with --tools)")
    p.add_argument("--system", metavar="TEXT", help="a system message")
    p.add_argument("--max-tokens", type=int, metavar="N")
    p.add_argument("--temperature", type=float, metavar="T")
    p.add_argument("--seed", type=int)
    p.set_defaults(run=cmd_call)

    p = sub.add_parser("status", parents=[common, client, as_json], help="what the daemon is running")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("ps", parents=[common, client, as_json],
                       help="loaded models: memory, budget share, state, idle time, requests",
                       description="Models loaded in the daemon, with their measured memory "
                       "and share of the budget.")
    p.set_defaults(run=cmd_ps)

    models = sub.add_parser("models", help="list, pull, verify and remove models").add_subparsers(
        metavar="ACTION")
    p = models.add_parser("list", parents=[common, as_json], help="every model in the catalog")
    p.set_defaults(run=cmd_models_list)
    p = models.add_parser("pull", parents=[common], help="download a model into the store")
    p.add_argument("id", nargs="?", help="manifest id (default: the default model)")
    p.set_defaults(run=cmd_models_pull)
    p = models.add_parser("verify", parents=[common, as_json],
                          help="re-check sizes and sha256 of pulled models (exit 4 if any is bad)")
    p.add_argument("id", nargs="?", help="one model (default: all pulled)")
    p.set_defaults(run=cmd_models_verify)
    p = models.add_parser("rm", parents=[common], help="remove a pulled model")
    p.add_argument("id")
    p.set_defaults(run=cmd_models_rm)

    logs = sub.add_parser("logs", help="read the interaction log").add_subparsers(metavar="ACTION")
    p = logs.add_parser("list", parents=[common, as_json], help="most recent requests first")
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    p.set_defaults(run=cmd_logs_list)
    p = logs.add_parser("show", parents=[common, as_json], help="one request with its attempts")
    p.add_argument("id", type=int)
    p.set_defaults(run=cmd_logs_show)
    p = logs.add_parser("feedback", parents=[common, client, as_json],
                        help="record whether a logged answer worked (through the daemon)")
    p.add_argument("id", type=int, help="the request's log id (a reply's outpost.log_id)")
    p.add_argument("outcome", choices=["good", "bad"])
    p.add_argument("--note", help="free text kept with the verdict")
    p.set_defaults(run=cmd_logs_feedback)

    p = logs.add_parser(
        "export", parents=[common, as_json], help="write chat+tools JSONL for fine-tuning",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write logged requests with a trustworthy answer as fine-tuning examples.\n\n"
                    "Target: the cloud answer of an escalated request (distillation); else the\n"
                    "local answer when an agent said good, or when its confidence reaches\n"
                    "--min-confidence. PII is redacted (counts printed), exact duplicates are\n"
                    "dropped, and a deterministic share goes to FILE's .val sibling\n"
                    "(train.jsonl -> train.val.jsonl). An export without filters advances the\n"
                    "watermark that lets retention prune exported rows.")
    p.add_argument("--format", choices=["openai", "hf"], default="openai",
                   help="openai: arguments as JSON strings; hf: as objects (default openai)")
    p.add_argument("--task", help="only requests routed to this task")
    p.add_argument("--model", help="only requests answered by this model id")
    p.add_argument("--since", metavar="WHEN", help="an age (7d, 12h) or an ISO date")
    p.add_argument("--min-confidence", type=float, metavar="X",
                   help="confidence a local answer without feedback needs ([export] min_confidence)")
    p.add_argument("--escalated", action="store_true",
                   help="only escalated requests, with the cloud's answers as targets")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the training JSONL file")
    p.set_defaults(run=cmd_logs_export)

    p = logs.add_parser("clusters", parents=[common, as_json],
                        help="group requests into tasks; say which deserve a specialised model")
    p.add_argument("--since", metavar="WHEN", help="an age (7d, 12h) or an ISO date")
    p.set_defaults(run=cmd_logs_clusters)

    p = logs.add_parser("stats", parents=[common, as_json],
                        help="per model and task: escalation, validity, latency, cost per success")
    p.add_argument("--since", metavar="WHEN", help="an age (7d, 12h) or an ISO date")
    p.set_defaults(run=cmd_logs_stats)

    p = logs.add_parser("prune", parents=[common, as_json],
                        help="apply the retention caps now ([logs] max_age_days, max_size)")
    p.add_argument("--dry-run", action="store_true", help="count what age would remove; delete nothing")
    p.set_defaults(run=cmd_logs_prune)
    return parser


# -- helpers ---------------------------------------------------------------------------
def _store_and_catalog(settings: Settings) -> tuple[ModelStore, Catalog]:
    store = ModelStore(settings.store_dir)
    return store, Catalog.load(store, settings.manifest_dirs, settings.default_model)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _share(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _load_tools(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read tools from {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("tools", [data])
    if not isinstance(data, list):
        raise ConfigError(f"{path} must hold a JSON array of OpenAI tools")
    return data


# -- commands --------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here, not at the top: the daemon pulls in llama.cpp, xgrammar and torch
    # (seconds of start-up) and the client commands must not pay for that.
    from .server import Daemon  # noqa: PLC0415

    store, catalog = _store_and_catalog(settings)
    catalog.get_default()  # an unknown default model is a config error, found now
    if settings.preload is None:
        pulled = store.is_pulled(catalog.get_default())
        settings = settings.model_copy(update={"preload": [catalog.default] if pulled else []})
    daemon = Daemon(settings, catalog, store)

    def ready(endpoint: str) -> None:
        loaded = ", ".join(daemon.pool.workers) or "none yet (loaded on first request)"
        print(f"outpost {VERSION} listening on {endpoint}", flush=True)
        print(f"  data dir {settings.data_dir}; default model {catalog.default}; loaded: {loaded}")
        print("  try:")
        print(f"    outpost call --endpoint {endpoint} --tools {EXAMPLE_TOOLS} "
              f"\"What is the weather in Paris?\"", flush=True)

    asyncio.run(daemon.serve(on_ready=ready))
    return 0


def cmd_call(args: argparse.Namespace, settings: Settings) -> int:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    params: dict[str, Any] = {}
    tools = _load_tools(args.tools) if args.tools else None
    choice = args.tool_choice or ("required" if tools else None)
    if choice and choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    for key in ("task", "max_tokens", "temperature", "seed"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    with OutpostClient(settings.endpoint, timeout_s=args.timeout) as client:
        reply = client.chat(messages, model=args.model, tools=tools, tool_choice=choice, **params)
    if args.json:
        _print_json(reply)
        return 0
    message = reply["choices"][0]["message"]
    if message.get("content"):
        print(message["content"])
    for call in message.get("tool_calls") or []:
        print(f"{call['function']['name']}({call['function']['arguments']})")
    meta = reply["outpost"]
    t = meta["timings_ms"]
    print(f"[{meta['model']} {meta['model_version']} · {t['total']:.0f} ms "
          f"(load {t['load']:.0f}, prefill {t['prefill']:.0f}, decode {t['decode']:.0f}) · "
          f"{reply['usage']['completion_tokens']} tokens · log {meta['log_id']}]", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    with OutpostClient(settings.endpoint, timeout_s=min(args.timeout, 10.0)) as client:
        status = client.status()
    if args.json:
        _print_json(status)
        return 0
    b = status["budget"]
    print(f"outpost {status['version']} (pid {status['pid']}) on {status['endpoint']}, "
          f"up {status['uptime_s']:.0f} s, {status['requests']} requests")
    print(f"memory {_mib(b['used_bytes'])} of {_mib(b['ram_bytes'])} budget, "
          f"{b['evictions']} evictions; default model {status['default_model']}")
    esc = status.get("escalation") or {}
    cloud = esc.get("cloud")
    line = f"escalation {esc.get('policy', 'off')}"
    if esc.get("policy", "off") != "off":
        line += f" below {esc['threshold']:g}"
    if cloud:
        line += (f"; cloud {cloud['model']} (breaker {cloud['breaker']}, today {cloud['requests_today']} "
                 f"requests, {cloud['tokens_today']} tokens)")
    elif esc.get("policy", "off") != "off":
        line += "; no cloud configured: answers stay local"
    print(line)
    _print_workers(status["loaded"])
    return 0


def cmd_ps(args: argparse.Namespace, settings: Settings) -> int:
    with OutpostClient(settings.endpoint, timeout_s=min(args.timeout, 10.0)) as client:
        status = client.status()
    if args.json:
        _print_json({"budget": status["budget"], "models": status["loaded"]})
        return 0
    b = status["budget"]
    print(f"budget {_mib(b['ram_bytes'])}, in use {_mib(b['used_bytes'])} "
          f"(daemon, forkserver and workers, PSS)")
    _print_workers(status["loaded"])
    return 0


def _print_workers(workers: list[dict[str, Any]]) -> None:
    if not workers:
        print("no models loaded")
        return
    print(f"{'MODEL':<26} {'STATE':<8} {'PID':>7} {'MEMORY':>8} {'SHARE':>6} {'IDLE':>7} "
          f"{'SERVED':>6} {'LOAD':>8} {'GRAMMARS HIT/MISS':>17}")
    for w in workers:
        pin = "*" if w.get("pinned") else ""
        share = f"{w['budget_share'] * 100:.0f}%" if w.get("budget_share") is not None else "-"
        cache = w.get("grammar_cache") or {}
        grammars = f"{cache.get('hits', 0)}/{cache.get('misses', 0)}"
        print(f"{w['model'] + pin:<26} {w['state']:<8} {w['pid'] or '-':>7} "
              f"{_mib(w['ram_bytes']):>8} {share:>6} {w['idle_s']:>6.0f}s {w['served']:>6} "
              f"{w['load_ms']:>6.0f}ms {grammars:>17}")


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    store, catalog = _store_and_catalog(settings)
    rows = [model_row(m, store, catalog) for m in catalog]
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'ID':<28} {'VERSION':<12} {'SIZE':>8}  {'PULLED':<6}  TASKS")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"{r['id'] + mark:<28} {r['version']:<12} {_mib(r['size_bytes']):>8}  "
              f"{'yes' if r['pulled'] else 'no':<6}  {', '.join(r['tasks'])}")
    print("* default model")
    return 0


def cmd_models_pull(args: argparse.Namespace, settings: Settings) -> int:
    store, catalog = _store_and_catalog(settings)
    entry = catalog.entry(args.id or catalog.default)
    if store.is_pulled(entry.manifest):
        print(f"{entry.manifest.id} is already in the store")
        return 0
    bars: list[tqdm] = []

    def progress(label: str, total: int):
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                   file=sys.stderr, disable=None)
        bars.append(bar)
        return bar.update

    t0 = time.monotonic()
    try:
        store.pull(entry.manifest, entry.text, progress)
    finally:
        for bar in bars:
            bar.close()
    print(f"pulled {entry.manifest.id} {entry.manifest.version} "
          f"({_mib(sum(f.size for f in entry.manifest.files))}, sha256 verified) "
          f"in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_models_verify(args: argparse.Namespace, settings: Settings) -> int:
    store, catalog = _store_and_catalog(settings)
    manifests = [catalog.get(args.id)] if args.id else store.pulled()
    report = []
    for m in manifests:
        for status in store.verify(m):
            report.append({"model": m.id, "file": status.name, "present": status.present,
                           "ok": status.ok, "detail": status.detail})
    if args.json:
        _print_json(report)
    else:
        if not report:
            print("no models pulled")
        for r in report:
            verdict = "ok" if r["ok"] else ("MISSING" if not r["present"] else "BAD")
            print(f"{r['model']:<28} {r['file']:<40} {verdict} {r['detail']}")
    return 0 if all(r["ok"] for r in report) else EXIT_BAD_FILE


def cmd_models_rm(args: argparse.Namespace, settings: Settings) -> int:
    store, _ = _store_and_catalog(settings)
    removed = store.remove(args.id)
    print(f"removed {args.id}; freed {len(removed)} file(s)")
    return 0


def _open_log(settings: Settings):
    if not settings.log_path.exists():
        raise ConfigError(f"no log at {settings.log_path} yet; the daemon writes it")
    return logstore.open_db(settings.log_path, settings.logs.busy_timeout_s)


def _since(args: argparse.Namespace) -> float | None:
    from .export import parse_since
    return parse_since(args.since) if args.since else None


def cmd_logs_export(args: argparse.Namespace, settings: Settings) -> int:
    from .export import Filters, export
    db = _open_log(settings)
    filters = Filters(task=args.task, model=args.model, since=_since(args), escalated=args.escalated)
    total = db.execute("select count(*) from requests").fetchone()[0]
    with tqdm(total=total, unit="req", desc="export", disable=args.json or None, leave=False) as bar:
        report = export(db, args.out, args.format, filters,
                        settings.export.min_confidence if args.min_confidence is None
                        else args.min_confidence,
                        settings.export.val_share, settings.export.redact, progress=bar,
                        advance_watermark=filters.none and args.min_confidence is None)
    if args.json:
        _print_json(report.to_dict())
        return 0
    print(f"{report.examples} examples ({report.train} train -> {report.train_path}, "
          f"{report.val} validation -> {report.val_path}); {report.duplicates} duplicates dropped")
    if report.sources:
        print("targets: " + ", ".join(f"{k} {v}" for k, v in sorted(report.sources.items())))
    if report.skipped:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in report.skipped.most_common()))
    print("redacted: " + (", ".join(f"{k} {v}" for k, v in sorted(report.redacted.items())) or "nothing"))
    return 0


def cmd_logs_clusters(args: argparse.Namespace, settings: Settings) -> int:
    from .clusters import clusters
    result = clusters(_open_log(settings), _since(args))
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['requests']} requests in {len(result['clusters'])} clusters")
    print(f"{'SIZE':>5} {'SHARE':>6} {'VALID':>6} {'CONF':>5} {'ESC':>5} {'CLOUD $':>8}  TOOLS / LABEL")
    for c in result["clusters"]:
        print(f"{c['size']:>5} {_share(c['share'], 0):>6} {_share(c['local_validity'], 0):>6} "
              f"{_num(c['mean_confidence'], 2):>5} {_share(c['escalation_rate'], 0):>5} "
              f"{c['cloud_cost_usd']:>8.4f}  {c['tools']} / {c['label']}")
        if c["suggestion"] != "-":
            print(f"{'':>41}-> {c['suggestion']}")
    return 0


def cmd_logs_stats(args: argparse.Namespace, settings: Settings) -> int:
    from .logstats import stats
    result = stats(_open_log(settings), _since(args), settings.costs.local_per_1k_tokens)
    if args.json:
        _print_json(result)
        return 0
    print(f"{'MODEL':<24} {'TASK':<12} {'REQS':>6} {'ERR':>5} {'ESC':>6} {'VALID':>6} {'OK':>6} "
          f"{'P50 MS':>7} {'P95 MS':>7} {'$/SUCCESS':>10}")
    for g in [*result["groups"], {"model": "all", "task": "", **result["total"]}]:
        print(f"{g['model']:<24} {g['task']:<12} {g['requests']:>6} {g['errors']:>5} "
              f"{_share(g['escalation_rate']):>6} {_share(g['validity_rate']):>6} "
              f"{_share(g['success_rate']):>6} {_num(g['latency_ms']['p50'], 0):>7} "
              f"{_num(g['latency_ms']['p95'], 0):>7} {_num(g['cost_per_success_usd'], 6):>10}")
    return 0


def cmd_logs_prune(args: argparse.Namespace, settings: Settings) -> int:
    cfg = settings.logs
    result = logstore.prune(_open_log(settings),
                            cfg.max_age_days * 86400 if cfg.max_age_days else None,
                            int(cfg.max_size) if cfg.max_size else None, time.time(), args.dry_run)
    if args.json:
        _print_json(result)
    else:
        print(f"deleted {result['deleted_by_age']} by age, {result['deleted_by_size']} by size; "
              f"{result['held']} held (not exported or synced yet, watermark {result['watermark']}); "
              f"{_mib(result['bytes'])} in use")
    return 0


def cmd_logs_list(args: argparse.Namespace, settings: Settings) -> int:
    db = _open_log(settings)
    rows = logstore.list_requests(db, args.n)
    if args.json:
        for r in rows:
            for key in ("tool_calls", "timings"):
                if isinstance(r.get(key), str):
                    r[key] = json.loads(r[key])
        _print_json(rows)
        return 0
    print(f"{'ID':>6}  {'WHEN':<19}  {'ANSWERED BY':<24} {'CONF':>5} {'MS':>7}  OUTPUT")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        total = json.loads(r["timings"] or "{}").get("total", 0)
        if r["error_code"]:
            out = f"error: {r['error_code']}"
        elif r["tool_calls"]:
            out = "; ".join(f"{c['function']['name']}({c['function']['arguments']})"
                            for c in json.loads(r["tool_calls"]))
        else:
            out = (r["content"] or "").replace("\n", " ")
        by = r["answered_by"] or r["model"] or "-"
        if r["degraded"]:
            by += f" (degraded: {r['degraded']})"
        print(f"{r['id']:>6}  {when:<19}  {by:<24} {_num(r['confidence'], 2):>5} {total:>7.0f}  {out[:80]}")
    return 0


def cmd_logs_feedback(args: argparse.Namespace, settings: Settings) -> int:
    with OutpostClient(settings.endpoint, timeout_s=args.timeout) as client:
        result = client.feedback(args.id, args.outcome, args.note)
    if args.json:
        _print_json(result)
    else:
        print(f"request {args.id}: {args.outcome} (feedback {result['feedback_id']})")
    return 0


def cmd_logs_show(args: argparse.Namespace, settings: Settings) -> int:
    row = logstore.get_request(_open_log(settings), args.id)
    if row is None:
        raise ConfigError(f"no request {args.id} in the log")
    _print_json(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
