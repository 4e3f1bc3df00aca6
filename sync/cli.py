"""`outpost sync …`: a field device's side of the fleet (registered through the
`outpost.commands` entry point; runtime/cli.py finds it).

What this module must not do: sign or publish anything (`outpost fleet`, tools/).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import sys
from pathlib import Path

from tqdm import tqdm

from outpost.manifests.errors import ConfigError, OutpostError
from outpost.manifests.store import ModelStore
from outpost.runtime import cli_format as fmt
from outpost.runtime import sync_state as state
from outpost.runtime.config import Settings


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Add `sync`. Imports nothing heavy: every `outpost` run, `serve` included, builds
    the parser, so python-tuf is imported only inside the command that uses it."""
    sync = sub.add_parser("sync", help="pull this device's models from the fleet's hub, push its log",
                          description="A field device's side of the fleet (docs/fleet.md).")
    sync.set_defaults(group=sync)
    actions = sync.add_subparsers(metavar="ACTION")
    p = actions.add_parser("provision", parents=[common],
                           help="trust a fleet: install its root.json (the one file a device trusts)")
    p.add_argument("root_json", type=Path, metavar="ROOT_JSON", help="the fleet's root.json")
    p.set_defaults(run=cmd_provision)
    p = actions.add_parser("pull", parents=[common, as_json],
                           help="verify the hub's signed metadata and install the channel's new models")
    p.add_argument("--hub", metavar="URL", help="the hub: file:///path, s3://bucket/prefix or "
                   "https://host/path (default: [sync] hub)")
    p.add_argument("--channel", metavar="NAME", help="the rollout channel (default: [sync] channel)")
    p.add_argument("--max-rate", type=float, metavar="BYTES_PER_S",
                   help="cap the bandwidth of model transfers (default: [sync] max_rate)")
    p.add_argument("--no-activate", action="store_true",
                   help="stage new versions only (`outpost models activate ID VERSION` later)")
    p.set_defaults(run=cmd_pull)
    p = actions.add_parser("push", parents=[common, as_json],
                           help="send the log's new rows to the hub, redacted, in batches")
    p.add_argument("--hub", metavar="URL", help="file:///path or s3://bucket/prefix "
                   "(default: [sync] push_hub, else hub)")
    p.add_argument("--device", metavar="ID", help="this device's name on the hub "
                   "(default: [sync] device_id, else the host name)")
    p.set_defaults(run=cmd_push)
    p = actions.add_parser("status", parents=[common, as_json],
                           help="the last pull and push, the rows not pushed yet, the last error")
    p.set_defaults(run=cmd_status)


def cmd_provision(args: argparse.Namespace, settings: Settings) -> int:
    if not args.root_json.is_file():
        raise ConfigError(f"{args.root_json} does not exist", path=str(args.root_json))
    settings.trust_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.root_json, settings.trust_dir / "root.json")
    print(f"this device now trusts the fleet whose root is {args.root_json} ({settings.trust_dir})")
    return 0


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    hub = args.hub or settings.sync.hub
    if not hub:
        raise ConfigError("no hub: pass --hub or set [sync] hub")
    from .pull import ModelPuller  # noqa: PLC0415 (tuf loads only for this command; see register)
    from .remotes import RemoteOptions  # noqa: PLC0415

    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="sync pull", file=sys.stderr,
              disable=args.json or None, leave=False) as bar:
        puller = ModelPuller(hub, args.channel or settings.sync.channel, settings.trust_dir,
                             ModelStore(settings.store_dir), RemoteOptions.from_settings(settings.sync),
                             max_rate=args.max_rate or settings.sync.max_rate, progress=bar.update)
        try:
            pulled = puller.pull()
        except OutpostError as exc:
            state.record(settings.trust_dir, "pull", error=exc)
            raise
    try:
        activations = [] if args.no_activate else _activate(settings, pulled)
    except OutpostError as exc:  # staged, not activated: the next pull tries again
        state.record(settings.trust_dir, "pull", error=exc)
        raise
    refused = [a for a in activations if not a.active]
    state.record(settings.trust_dir, "pull", {
        "hub": hub, "channel": puller.channel,
        "models": {p.model: p.version for p in pulled},
        "refused": {**{p.model: {"version": p.version, "reason": p.refused} for p in pulled if p.refused},
                    **{a.model: {"version": a.version, "reason": a.refused} for a in refused}}})
    if args.json:
        fmt.print_json([{**p.__dict__, "activation": next((a.__dict__ for a in activations
                                                             if a.model == p.model), None)}
                        for p in pulled])
        return 1 if refused else 0
    if not pulled:
        print("the channel has no models")
    for p in pulled:
        a = next((a for a in activations if a.model == p.model), None)
        if p.active:
            line = "up to date"
        elif p.refused is not None:
            line = f"refused at an earlier activation ({p.refused}); waiting for another version"
        else:
            line = f"staged ({fmt.mib(p.transferred)} transferred)" if p.installed else "staged"
            if a is not None:
                was = f"was {a.previous}" if a.previous is not None else "first install"
                line += (f", passed its smoke test, active ({was})" if a.active
                         else f", failed its smoke test ({a.refused}); the active version keeps serving")
        print(f"{p.model} {p.version}: {line}")
    return 1 if refused else 0


def _activate(settings: Settings, pulled: list) -> list:
    from outpost.runtime.activation import activate  # noqa: PLC0415

    return [activate(settings, p.model, p.version) for p in pulled if p.to_activate]


def device_id(settings: Settings, given: str | None) -> str:
    """The device's name in the hub's log folder: given, configured, or the host's name."""
    name = given or settings.sync.device_id or re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ConfigError(f"device id {name!r}: use 1-64 letters, digits, '.', '_' or '-'", device=name)
    return name


def cmd_push(args: argparse.Namespace, settings: Settings) -> int:
    hub = args.hub or settings.sync.push_hub or settings.sync.hub
    if not hub:
        raise ConfigError("no hub: pass --hub or set [sync] push_hub or hub")
    device = device_id(settings, args.device)
    if not settings.log_path.is_file():
        raise ConfigError(f"no log at {settings.log_path}: nothing to push", path=str(settings.log_path))
    from outpost.runtime.logs.schema import open_db  # noqa: PLC0415

    from .push import LogPusher  # noqa: PLC0415 (see register)
    from .remotes import RemoteOptions, open_remote  # noqa: PLC0415

    db = open_db(settings.log_path, settings.logs.busy_timeout_s)
    try:
        pusher = LogPusher(db, open_remote(hub, RemoteOptions.from_settings(settings.sync)), device,
                           settings.trust_dir / "outbox", settings.sync.push_batch_rows,
                           redact=settings.export.redact, min_age_s=settings.sync.push_delay_s)
        try:
            pushed = pusher.push()
        except OutpostError as exc:
            state.record(settings.trust_dir, "push", error=exc)
            raise
        state.record(settings.trust_dir, "push", {"hub": hub, "device": device, "rows": pushed.rows,
                                                  "batches": pushed.batches, "bytes": pushed.bytes,
                                                  "withheld": pushed.withheld,
                                                  "watermark": pushed.watermark})
    finally:
        db.conn.close()
    if args.json:
        fmt.print_json(pushed.__dict__)
        return 0
    print(f"pushed {pushed.rows} requests in {pushed.batches} batches ({fmt.mib(pushed.bytes)}) "
          f"to {hub} as {device}; the hub has the log up to request {pushed.watermark}")
    if pushed.withheld:
        print(f"{pushed.withheld} requests withheld: they could not be redacted (see the log)",
              file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    out = state.read(settings.trust_dir)
    out["provisioned"] = (settings.trust_dir / "root.json").is_file()
    if settings.log_path.is_file():
        from outpost.runtime.logs.schema import open_db  # noqa: PLC0415

        from .push import pending, sync_watermark  # noqa: PLC0415

        db = open_db(settings.log_path, settings.logs.busy_timeout_s)
        try:
            rows, size = pending(db)
            out["pending"] = {"rows": rows, "bytes": size, "watermark": sync_watermark(db)}
        finally:
            db.conn.close()
    if args.json:
        fmt.print_json(out)
        return 0
    print(f"hub {settings.sync.hub or '(none configured)'}, channel {settings.sync.channel}; "
          f"{'provisioned' if out['provisioned'] else 'not provisioned (outpost sync provision ROOT_JSON)'}")
    for kind in ("pull", "push"):
        entry = out.get(kind) or {}
        line = f"last {kind}: {fmt.ago(entry.get('ok_at'))}"
        if entry.get("error"):
            line += f"; the last try failed {fmt.ago(entry.get('attempt_at'))}: " \
                    f"{entry['error']['code']}: {entry['error']['message']}"
        print(line)
    if "pending" in out:
        p = out["pending"]
        print(f"not pushed yet: {p['rows']} requests ({fmt.mib(p['bytes'])} in the log), "
              f"pushed up to request {p['watermark']}")
    return 0
