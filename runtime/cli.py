"""`outpost` command line: serve, call, status, models, logs.

Settings are loaded once here and handed down. Output is for people by default and
JSON with `--json`. Exit codes: 0 ok, 1 the daemon or the store reported an error,
2 bad usage, 3 no daemon answered, 4 `models verify` found a bad file.
The `logs` commands are in cli_logs.py; every command is described in docs/commands.md.

What this module must not do: import the daemon at start-up (only `serve` needs it,
and it pulls in llama.cpp's forkserver machinery), or format numbers by hand
(cli_format.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sqlite3
import sys
import time
from importlib.metadata import PackageNotFoundError, entry_points, requires, version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from outpost.manifests.catalog import Catalog, model_row
from outpost.manifests.store import ModelStore

from . import VERSION
from . import cli_format as fmt
from .cli_logs import add_logs_commands
from .cli_keys import add_keys_commands
from .cli_versions import add_version_commands
from .client import OutpostClient
from .config import Settings
from .errors import ConfigError, DaemonUnreachable, OutpostError
from .logs.errors import from_sqlite

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BAD_FILE = 1, 2, 3, 4
DOCS = """documentation (in the Outpost repository, docs/):
  commands.md       every command, its flags and exit codes
  configuration.md  every setting, its default, and how to set it (TOML, OUTPOST_* env)
  models.md         manifests, the store, several models under one memory budget
  log.md            the interaction log: export, redaction, clusters, stats, retention
  escalation.md     confidence, policies and the cloud LLM
  tool-calls.md     grammar-constrained tool calls, BFCL v4 results
  protocol.md       the wire protocol for agents"""
EXAMPLE_TOOLS = "examples/weather_tool.json"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):  # a command, or a command group's action, left out
        getattr(args, "group", parser).print_help()
        return EXIT_USAGE
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load(args.config, data_dir=args.data_dir,
                                 endpoint=getattr(args, "endpoint", None))
        settings = _serve_flags(args, settings)
        return args.run(args, settings) or 0
    except DaemonUnreachable as exc:
        print(f"outpost: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ConfigError as exc:
        print(f"outpost: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except (OutpostError, sqlite3.Error) as exc:
        if isinstance(exc, sqlite3.Error):  # the log, read here: locked, full, broken
            exc = from_sqlite(exc, settings.log_path)
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


# The command table, one block per command (63 lines): easier to scan whole than split.
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML settings file (env: OUTPOST_CONFIG)")
    common.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="model store and logs.db live here (env: OUTPOST_DATA_DIR)")
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--endpoint", metavar="URL",
                        help="daemon endpoint: ipc://PATH, tcp://127.0.0.1:PORT, or tcp://HOST:PORT off "
                        "loopback with CURVE keys ([curve], outpost keys) (env: OUTPOST_ENDPOINT)")
    client.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="seconds to wait for the daemon (default 300)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable JSON output")

    parser = argparse.ArgumentParser(
        prog="outpost", description="Edge agent runtime: small language models answering "
        "local agents over ZeroMQ with grammar-constrained tool calls.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DOCS)
    parser.add_argument("--version", action="version", version=f"outpost {VERSION}")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common, client], help="run the daemon in the foreground",
                       description="Run the daemon in the foreground until Ctrl-C or SIGTERM. "
                       "Settings: docs/configuration.md.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also answer OpenAI-compatible HTTP (/v1/chat/completions, /v1/models) "
                   "on this address; loopback only unless [http] api_key is set (default: off)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (default: off)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("call", parents=[common, client, as_json], help="send one chat request",
                       description="Send one prompt to the daemon and print the answer. With "
                       "--tools the model must call one of the tools (tool_choice 'required'); "
                       "pass --tool-choice auto to let it decide between calling and answering "
                       "in text, as agents ask (the status line then says how it decided).")
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
                       "and share of the budget, and the task adapters each base serves.")
    p.set_defaults(run=cmd_ps)

    models = sub.add_parser("models", help="list, pull, verify and remove models",
                            description="The model store and catalog (docs/models.md).")
    models.set_defaults(group=models)
    actions = models.add_subparsers(metavar="ACTION")
    _add_models_commands(actions, common, as_json)
    _add_plugin_commands(actions, common, client, as_json, group="outpost.models_commands")

    logs = sub.add_parser("logs", help="read, export and prune the interaction log",
                          description="Read, export, cluster and prune the interaction log "
                          "(docs/log.md).")
    logs.set_defaults(group=logs)
    add_logs_commands(logs.add_subparsers(metavar="ACTION"), common, client, as_json)
    add_keys_commands(sub, common, as_json)
    _add_plugin_commands(sub, common, client, as_json)
    return parser


def _add_plugin_commands(sub: argparse._SubParsersAction, *parents: argparse.ArgumentParser,
                         group: str = "outpost.commands") -> None:
    """Commands that live above runtime (`sync` in sync/, `fleet` in tools/) register through
    the `outpost.commands` entry points (`models convert`: `outpost.models_commands`), so the
    CLI finds them and runtime imports neither. One whose extra is not installed still
    shows, and says which extra to install."""
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        missing = _missing_requirements(ep.extras)
        if missing:
            extra = ",".join(ep.extras)
            p = sub.add_parser(ep.name, parents=parents[:1], help=f"(needs the {extra} extra)")
            p.set_defaults(run=_missing_extra(ep.name, extra, missing))
            continue
        # The registering modules import their heavy dependencies only when a command
        # runs: `outpost serve` builds this parser too, and its memory is budgeted.
        ep.load()(sub, *parents)


def _missing_requirements(extras: list[str]) -> list[str]:
    """The distributions an extra of Outpost needs that are not installed (metadata only)."""
    missing = []
    for req in requires("outpost") or []:
        name, _, marker = req.partition(";")
        if not any(f'extra == "{extra}"' in marker for extra in extras):
            continue
        dist = re.split(r"[\[<>=!~ ]", name.strip(), maxsplit=1)[0]
        try:
            version(dist)
        except PackageNotFoundError:
            missing.append(dist)
    return missing


def _missing_extra(name: str, extra: str, missing: list[str]) -> Any:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        print(f"outpost {name}: needs the {extra} extra ({', '.join(missing)} not installed): "
              f"pip install 'outpost[{extra}]'", file=sys.stderr)
        return EXIT_USAGE
    return run


def _add_models_commands(models: argparse._SubParsersAction, common: argparse.ArgumentParser,
                         as_json: argparse.ArgumentParser) -> None:
    p = models.add_parser("list", parents=[common, as_json], help="every model in the catalog")
    p.set_defaults(run=cmd_models_list)
    p = models.add_parser("pull", parents=[common], help="download a model into the store")
    p.add_argument("id", nargs="?", help="manifest id (default: the default model)")
    p.set_defaults(run=cmd_models_pull)
    p = models.add_parser("verify", parents=[common, as_json],
                          help="re-check sizes and sha256 of pulled models (exit 4 if any is bad)")
    p.add_argument("id", nargs="?", help="one model (default: all pulled)")
    p.set_defaults(run=cmd_models_verify)
    p = models.add_parser("rm", parents=[common], help="remove a pulled model (every version of it)")
    p.add_argument("id")
    p.set_defaults(run=cmd_models_rm)
    add_version_commands(models, common, as_json)


# -- helpers ---------------------------------------------------------------------------
def _store_and_catalog(settings: Settings) -> tuple[ModelStore, Catalog]:
    store = ModelStore(settings.store_dir)
    return store, Catalog.load(store, settings.manifest_dirs, settings.default_model)


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
def _serve_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """`serve`'s --http and --metrics-port over the config file's [http] and [metrics]."""
    update: dict[str, Any] = {}
    if getattr(args, "http", None):
        update["http"] = settings.http.model_copy(update={"listen": args.http})
    if getattr(args, "metrics_port", None):
        update["metrics"] = settings.metrics.model_copy(update={"port": args.metrics_port})
    return settings.model_copy(update=update) if update else settings


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here, not at the top: the daemon pulls in llama.cpp, xgrammar and torch
    # (seconds of start-up) and the client commands must not pay for that.
    from .daemon.server import Daemon  # noqa: PLC0415

    store, catalog = _store_and_catalog(settings)
    catalog.get_default()  # an unknown default model is a config error, found now
    if settings.preload is None:
        pulled = store.is_pulled(catalog.get_default())
        settings = settings.model_copy(update={"preload": [catalog.default] if pulled else []})
    daemon = Daemon(settings, catalog, store)

    def ready(endpoint: str) -> None:
        if schedule is not None:  # a pull activates through this daemon: it must answer first
            schedule.start()
        loaded = ", ".join(daemon.pool.workers) or "none yet (loaded on first request)"
        print(f"outpost {VERSION} listening on {endpoint}", flush=True)
        if settings.http.listen:
            print(f"  OpenAI-compatible HTTP on http://{settings.http.listen}/v1")
        if settings.metrics.port:
            print(f"  metrics on http://127.0.0.1:{settings.metrics.port}/metrics")
        print(f"  data dir {settings.data_dir}; default model {catalog.default}; loaded: {loaded}")
        print("  try:")
        print(f"    outpost call --endpoint {endpoint} --tools {EXAMPLE_TOOLS} "
              f"\"What is the weather in Paris?\"", flush=True)

    schedule = None
    if settings.sync.interval_s and settings.sync.hub:
        from .sync_schedule import SyncSchedule  # noqa: PLC0415

        schedule = SyncSchedule(settings, args.config or _env_config())
    try:
        asyncio.run(daemon.serve(on_ready=ready))
    finally:
        if schedule is not None:
            schedule.stop()
    return 0


def _env_config() -> Path | None:
    return Path(p) if (p := os.environ.get("OUTPOST_CONFIG")) else None


def _client(settings: Settings, timeout_s: float) -> OutpostClient:
    """A client of the configured daemon, with CURVE keys when it is off loopback."""
    return OutpostClient(settings.endpoint, timeout_s=timeout_s, curve=settings.client_keys())


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
    with _client(settings, args.timeout) as client:
        reply = client.chat(messages, model=args.model, tools=tools, tool_choice=choice, **params)
    if args.json:
        fmt.print_json(reply)
        return 0
    message = reply["choices"][0]["message"]
    if message.get("content"):
        print(message["content"])
    for call in message.get("tool_calls") or []:
        print(f"{call['function']['name']}({call['function']['arguments']})")
    meta = reply["outpost"]
    t = meta["timings_ms"]
    decided = ""
    if (d := meta.get("decision")) is not None:  # tool_choice auto: how it chose
        decided = (f" · decided {d['choice']} (p(call opens) {d['p_open']:.3f}, score {d['score']:+.2f} vs "
                   f"{d['threshold']:+.2f}, confidence {d['confidence']:.2f})")
    print(f"[{meta['model']} {meta['model_version']} · {t['total']:.0f} ms "
          f"(load {t['load']:.0f}, prefill {t['prefill']:.0f}, decode {t['decode']:.0f}) · "
          f"{reply['usage']['completion_tokens']} tokens{decided} · log {meta['log_id']}]", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings, min(args.timeout, 10.0)) as client:
        status = client.status()
    if args.json:
        fmt.print_json(status)
        return 0
    b = status["budget"]
    print(f"outpost {status['version']} (pid {status['pid']}) on {status['endpoint']}, "
          f"up {status['uptime_s']:.0f} s, {status['requests']} requests")
    print(f"memory {fmt.mib(b['used_bytes'])} of {fmt.mib(b['ram_bytes'])} budget, "
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
    fmt.print_sync(status.get("sync"))
    fmt.print_workers(status["loaded"])
    fmt.print_quarantined(b.get("quarantined"))
    return 0


def cmd_ps(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings, min(args.timeout, 10.0)) as client:
        status = client.status()
    if args.json:
        fmt.print_json({"budget": status["budget"], "models": status["loaded"]})
        return 0
    b = status["budget"]
    print(f"budget {fmt.mib(b['ram_bytes'])}, in use {fmt.mib(b['used_bytes'])} "
          f"(daemon, forkserver and workers, PSS)")
    fmt.print_workers(status["loaded"])
    fmt.print_quarantined(b.get("quarantined"))
    return 0


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    store, catalog = _store_and_catalog(settings)
    rows = [model_row(m, store, catalog) for m in catalog]
    if args.json:
        fmt.print_json(rows)
        return 0
    print(f"{'ID':<28} {'VERSION':<12} {'SIZE':>8}  {'PULLED':<6}  TASKS")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"{r['id'] + mark:<28} {r['version']:<12} {fmt.mib(r['size_bytes']):>8}  "
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
          f"({fmt.mib(sum(f.size for f in entry.manifest.files))}, sha256 verified) "
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
        fmt.print_json(report)
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


if __name__ == "__main__":
    sys.exit(main())
