"""`outpost logs …`: read, export, cluster, summarise and prune the interaction log.

The commands read the log file directly (WAL lets them beside a running daemon),
except `feedback`, which goes through the daemon so the verdict is written by the
log's one writer. docs/log.md describes what each command does with the log.

What this module must not do: write the log itself, except through the
log's own functions (export and prune record what they did), or talk to SQLite directly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sqlite_utils
from tqdm import tqdm

from . import cli_format as fmt
from .client import OutpostClient
from .config import Settings
from .errors import ConfigError, NotFound
from .logs import queries, retention, schema
from .logs.clusters import clusters
from .logs.export import Filters, export, parse_since
from .logs.stats import stats


def add_logs_commands(logs: argparse._SubParsersAction, common: argparse.ArgumentParser,
                      client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
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
                        help="per model and task: escalation, validity, latency, cost per success, "
                        "and how often tool_choice auto decided as the cloud did",
                        description="Per model and task, from the log: requests, errors, escalation "
                        "rate, validity of the local calls, success rate, p50/p95 latency, cost per "
                        "success, and under tool_choice auto the turns the local model decided "
                        "(DECIDED) and how often it decided as the cloud did on those the cloud also "
                        "answered (RIGHT). Definitions: docs/log.md#stats.")
    p.add_argument("--since", metavar="WHEN", help="an age (7d, 12h) or an ISO date")
    p.set_defaults(run=cmd_logs_stats)

    p = logs.add_parser("prune", parents=[common, as_json],
                        help="apply the retention caps now ([logs] max_age_days, max_size)")
    p.add_argument("--dry-run", action="store_true", help="count what age would remove; delete nothing")
    p.set_defaults(run=cmd_logs_prune)


def _open_log(settings: Settings) -> sqlite_utils.Database:
    if not settings.log_path.exists():
        raise ConfigError(f"no log at {settings.log_path} yet; the daemon writes it")
    return schema.open_db(settings.log_path, settings.logs.busy_timeout_s)


def _since(args: argparse.Namespace) -> float | None:
    return parse_since(args.since) if args.since else None


def cmd_logs_export(args: argparse.Namespace, settings: Settings) -> int:
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
        fmt.print_json(report.to_dict())
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
    result = clusters(_open_log(settings), _since(args))
    if args.json:
        fmt.print_json(result)
        return 0
    print(f"{result['requests']} requests in {len(result['clusters'])} clusters")
    print(f"{'SIZE':>5} {'SHARE':>6} {'VALID':>6} {'CONF':>5} {'ESC':>5} {'CLOUD $':>8}  TOOLS / LABEL")
    for c in result["clusters"]:
        print(f"{c['size']:>5} {fmt.share(c['share'], 0):>6} {fmt.share(c['local_validity'], 0):>6} "
              f"{fmt.num(c['mean_confidence'], 2):>5} {fmt.share(c['escalation_rate'], 0):>5} "
              f"{c['cloud_cost_usd']:>8.4f}  {c['tools']} / {c['label']}")
        if c["suggestion"] != "-":
            print(f"{'':>41}-> {c['suggestion']}")
    return 0


def cmd_logs_stats(args: argparse.Namespace, settings: Settings) -> int:
    result = stats(_open_log(settings), _since(args), settings.costs.local_per_1k_tokens)
    if args.json:
        fmt.print_json(result)
        return 0
    print(f"{'MODEL':<24} {'TASK':<12} {'REQS':>6} {'ERR':>5} {'ESC':>6} {'VALID':>6} {'OK':>6} "
          f"{'P50 MS':>7} {'P95 MS':>7} {'$/SUCCESS':>10} {'DECIDED':>8} {'RIGHT':>6}")
    for g in [*result["groups"], {"model": "all", "task": "", **result["total"]}]:
        print(f"{g['model']:<24} {g['task']:<12} {g['requests']:>6} {g['errors']:>5} "
              f"{fmt.share(g['escalation_rate']):>6} {fmt.share(g['validity_rate']):>6} "
              f"{fmt.share(g['success_rate']):>6} {fmt.num(g['latency_ms']['p50'], 0):>7} "
              f"{fmt.num(g['latency_ms']['p95'], 0):>7} {fmt.num(g['cost_per_success_usd'], 6):>10} "
              f"{g['decisions']:>8} {fmt.share(g['decision_accuracy']):>6}")
    return 0


def cmd_logs_prune(args: argparse.Namespace, settings: Settings) -> int:
    cfg = settings.logs
    result = retention.prune(_open_log(settings),
                            cfg.max_age_days * 86400 if cfg.max_age_days else None,
                            int(cfg.max_size) if cfg.max_size else None, time.time(), args.dry_run)
    if args.json:
        fmt.print_json(result)
    else:
        print(f"deleted {result['deleted_by_age']} by age, {result['deleted_by_size']} by size; "
              f"{result['held']} held (not exported or synced yet, watermark {result['watermark']}); "
              f"{fmt.mib(result['bytes'])} in use")
    return 0


def cmd_logs_list(args: argparse.Namespace, settings: Settings) -> int:
    db = _open_log(settings)
    rows = queries.list_requests(db, args.n)
    if args.json:
        for r in rows:
            for key in ("tool_calls", "timings"):
                if isinstance(r.get(key), str):
                    r[key] = json.loads(r[key])
        fmt.print_json(rows)
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
        print(f"{r['id']:>6}  {when:<19}  {by:<24} {fmt.num(r['confidence'], 2):>5} {total:>7.0f}  {out[:80]}")
    return 0


def cmd_logs_feedback(args: argparse.Namespace, settings: Settings) -> int:
    with OutpostClient(settings.endpoint, timeout_s=args.timeout, curve=settings.client_keys()) as client:
        result = client.feedback(args.id, args.outcome, args.note)
    if args.json:
        fmt.print_json(result)
    else:
        print(f"request {args.id}: {args.outcome} (feedback {result['feedback_id']})")
    return 0


def cmd_logs_show(args: argparse.Namespace, settings: Settings) -> int:
    row = queries.get_request(_open_log(settings), args.id)
    if row is None:
        raise NotFound("request", args.id)
    fmt.print_json(row)
    return 0
