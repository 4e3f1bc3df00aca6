"""`outpost sync …`: a field device's side of the fleet (registered through the
`outpost.commands` entry point; runtime/cli.py finds it).

What this module must not do: sign or publish anything (`outpost fleet`, tools/).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from outpost.manifests.errors import ConfigError
from outpost.manifests.store import ModelStore
from outpost.runtime import cli_format as fmt
from outpost.runtime.config import Settings
from tqdm import tqdm


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Add `sync`. Imports nothing heavy: every `outpost` run, `serve` included, builds
    the parser, so python-tuf is imported only inside the command that uses it."""
    sync = sub.add_parser("sync", help="pull this device's models from the fleet's hub",
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
    p.set_defaults(run=cmd_pull)


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
        pulled = puller.pull()
    if args.json:
        fmt.print_json([p.__dict__ for p in pulled])
        return 0
    if not pulled:
        print("the channel has no models")
    for p in pulled:
        state = f"installed ({fmt.mib(p.transferred)} transferred)" if p.installed else "up to date"
        print(f"{p.model} {p.version}: {state}")
    return 0
