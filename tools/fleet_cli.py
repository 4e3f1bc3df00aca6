"""`outpost fleet …`: the operator's side of the hub (registered through the
`outpost.commands` entry point; runtime/cli.py finds it).

What this module must not do: run on a device (`outpost sync`, sync/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from outpost.manifests.errors import ConfigError
from outpost.manifests.schema import Manifest
from outpost.runtime import cli_format as fmt
from outpost.runtime.config import Settings


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Add `fleet`. Imports nothing heavy: every `outpost` run, `serve` included, builds
    the parser, so python-tuf and cryptography load only inside the commands."""
    fleet = sub.add_parser("fleet", help="create and publish the fleet's signed model hub",
                           description="The fleet operator's side of the hub (docs/fleet.md).")
    fleet.set_defaults(group=fleet)
    actions = fleet.add_subparsers(metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--hub", type=Path, required=True, metavar="DIR", help="the hub folder devices read")
    where.add_argument("--keys", type=Path, required=True, metavar="DIR",
                       help="the operator's private keys (never published)")
    p = actions.add_parser("init", parents=[common, where], help="a new, empty, signed hub and its keys")
    p.set_defaults(run=cmd_init)
    p = actions.add_parser("add", parents=[common, where],
                           help="sign a model version (its manifest and files) into a channel")
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="the model's manifest TOML")
    p.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                   help="where each file the manifest names is (repeat per file)")
    p.add_argument("--channel", default="stable", help="the rollout channel (default stable)")
    p.set_defaults(run=cmd_add)
    p = actions.add_parser("renew", parents=[common, where],
                           help="re-sign the timestamp (run on a schedule: it expires daily)")
    p.set_defaults(run=cmd_renew)
    p = actions.add_parser("rotate", parents=[common, where],
                           help="replace a role's signing key (a new root announces it to devices)")
    p.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    p.set_defaults(run=cmd_rotate)
    p = actions.add_parser("publish", parents=[common, where],
                           help="copy the signed hub to where devices read it (S3, a mirror's folder)")
    p.add_argument("--to", required=True, metavar="URL", dest="to",
                   help="s3://bucket/prefix or file:///path ([sync] s3_endpoint names a non-AWS store)")
    p.set_defaults(run=cmd_publish)
    p = actions.add_parser("collect", parents=[common, as_json],
                           help="the devices' pushed logs as one training JSONL (with each device's id)")
    p.add_argument("--from", required=True, metavar="URL", dest="source",
                   help="the hub devices push to: s3://bucket/prefix or file:///path")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the JSONL to write")
    p.add_argument("--format", choices=("openai", "hf"), default="openai",
                   help="as `outpost logs export` writes it (default openai)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="a local answer without feedback is kept from this confidence "
                        "(default: [export] min_confidence)")
    p.set_defaults(run=cmd_collect)


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    if (args.hub / "metadata").exists():
        raise ConfigError(f"{args.hub} already holds a hub", path=str(args.hub))
    from .fleet import FleetHub  # noqa: PLC0415 (see register)

    hub = FleetHub.create(args.hub, args.keys)
    print(f"created the hub {args.hub} (keys in {args.keys}); provision devices with "
          f"`outpost sync provision {hub.root_json}`")
    return 0


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    if not args.manifest.is_file():
        raise ConfigError(f"{args.manifest} does not exist", path=str(args.manifest))
    text = args.manifest.read_text(encoding="utf-8")
    manifest = Manifest.from_toml(text, origin=str(args.manifest))
    given = dict(f.split("=", 1) for f in args.file if "=" in f)
    missing = [mf.name for mf in manifest.files if mf.name not in given]
    if missing or len(given) != len(args.file):
        raise ConfigError(f"pass --file NAME=PATH for each file of {manifest.id}: missing {missing}")
    absent = [path for path in given.values() if not Path(path).is_file()]
    if absent:
        raise ConfigError(f"no such file: {', '.join(absent)}", paths=absent)
    from .fleet import FleetHub  # noqa: PLC0415 (see register)

    FleetHub(args.hub, args.keys).add_model(text, {k: Path(v) for k, v in given.items()}, args.channel)
    print(f"signed {manifest.id} {manifest.version} into {args.channel}")
    return 0


def cmd_renew(args: argparse.Namespace, settings: Settings) -> int:
    from .fleet import FleetHub  # noqa: PLC0415 (see register)

    FleetHub(args.hub, args.keys).renew_timestamp()
    print(f"re-signed the timestamp of {args.hub}")
    return 0


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from outpost.sync.remotes import RemoteOptions, open_remote  # noqa: PLC0415 (see register)

    from .fleet import FleetHub  # noqa: PLC0415

    remote = open_remote(args.to, RemoteOptions.from_settings(settings.sync))
    if not remote.writable:
        raise ConfigError(f"{args.to} is read-only: publish to s3:// or file:// and serve that folder")
    sent = FleetHub(args.hub, args.keys).publish_to(remote)
    print(f"published {args.hub} to {args.to} ({sent} files sent)")
    return 0


def cmd_collect(args: argparse.Namespace, settings: Settings) -> int:
    from outpost.sync.remotes import RemoteOptions, open_remote  # noqa: PLC0415 (see register)

    from .fleet_collect import collect  # noqa: PLC0415

    remote = open_remote(args.source, RemoteOptions.from_settings(settings.sync))
    min_confidence = settings.export.min_confidence if args.min_confidence is None else args.min_confidence
    with tqdm(unit=" batches", desc="collect", file=sys.stderr, disable=args.json or None, leave=False) as bar:
        report = collect(remote, args.out, args.format, min_confidence, progress=bar.update)
    if args.json:
        fmt.print_json(report.to_dict())
        return 0
    print(f"{report.examples} examples from {report.requests} requests of {len(report.devices)} devices "
          f"({report.batches} batches) -> {args.out}; {report.duplicates} duplicates dropped")
    if report.skipped:
        print("skipped: " + ", ".join(f"{n} {why}" for why, n in report.skipped.most_common()))
    if report.unreadable:
        print(f"{len(report.unreadable)} batches could not be read: {', '.join(report.unreadable[:5])}",
              file=sys.stderr)
    return 0


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from .fleet import FleetHub  # noqa: PLC0415 (see register)

    FleetHub(args.hub, args.keys).rotate(args.role)
    print(f"rotated the {args.role} key of {args.hub}; the old one is retired in {args.keys}. "
          "Publish the hub; devices trust the new key from their next pull")
    return 0
