"""`outpost keys new|show|allow|revoke`: the CURVE keys of a daemon that listens off loopback.

    daemon's machine:  outpost keys new server            (prints its public key)
    agent's machine:   outpost keys new client            (prints its public key)
    daemon's machine:  outpost keys allow planner KEY     (the agent's public key)
    agent's config:    [curve] server_key = "..."         (the daemon's public key)

A running daemon reads the allow-list again on the next connection: `allow` and
`revoke` need no restart. runtime/curve.py holds the files; docs/security.md the why.

What this module must not do: talk to a daemon (the keys are files).
"""

from __future__ import annotations

import argparse
import sys

from . import cli_format as fmt
from . import curve
from .config import Settings


def add_keys_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
                      as_json: argparse.ArgumentParser) -> None:
    keys = sub.add_parser("keys", help="CURVE keys for a daemon that listens off loopback",
                          description="Key pairs and the allow-list of client keys for a TCP "
                          "endpoint off loopback (docs/security.md). Loopback and ipc:// need none.")
    keys.set_defaults(group=keys)
    actions = keys.add_subparsers(metavar="ACTION")
    p = actions.add_parser("new", parents=[common, as_json], help="make the daemon's or this client's key pair",
                           description="Write a key pair into [curve] keys_dir (default <data_dir>/keys); "
                           "the secret file is owner-only. Prints the public key to hand over.")
    p.add_argument("role", choices=curve.ROLES, help="server: the daemon's pair; client: this machine's")
    p.add_argument("--force", action="store_true",
                   help="replace an existing pair (clients that knew the old server key are refused)")
    p.set_defaults(run=cmd_keys_new)
    p = actions.add_parser("show", parents=[common, as_json],
                           help="the public keys here and the allowed clients")
    p.set_defaults(run=cmd_keys_show)
    p = actions.add_parser("allow", parents=[common, as_json], help="admit a client's public key",
                           description="Admit a client: its public key (40 characters, from `outpost "
                           "keys new client` on its machine) under a name. A running daemon admits it "
                           "on its next connection.")
    p.add_argument("name", help="what to call the client (letters, digits, . _ -)")
    p.add_argument("key", help="its public key (z85, 40 characters)")
    p.set_defaults(run=cmd_keys_allow)
    p = actions.add_parser("revoke", parents=[common, as_json], help="refuse a client from its next connection",
                           description="Remove a client from the allow-list. Connections it has open "
                           "stay up until they close; its next handshake is refused.")
    p.add_argument("name")
    p.set_defaults(run=cmd_keys_revoke)


def cmd_keys_new(args: argparse.Namespace, settings: Settings) -> int:
    pair = curve.new_pair(settings.keys_dir, args.role, force=args.force)
    if args.json:
        fmt.print_json({"role": args.role, "public_key": pair.public.decode(), "keys_dir": str(settings.keys_dir)})
        return 0
    print(pair.public.decode())
    where = ("allow it on the daemon: outpost keys allow NAME KEY" if args.role == "client" else
             "give it to each client as [curve] server_key; allow their keys with `outpost keys allow`")
    print(f"{args.role} key pair written to {settings.keys_dir}; {where}", flush=True, file=sys.stderr)
    return 0


def cmd_keys_show(args: argparse.Namespace, settings: Settings) -> int:
    pairs = {role: curve.load_pair(settings.keys_dir, role) for role in curve.ROLES}
    allowed = curve.allowed(settings.keys_dir)
    if args.json:
        fmt.print_json({"keys_dir": str(settings.keys_dir),
                        **{role: p.public.decode() if p else None for role, p in pairs.items()},
                        "allowed": {name: key.decode() for name, key in allowed.items()}})
        return 0
    for role, pair in pairs.items():
        print(f"{role:<8} {pair.public.decode() if pair else f'(none: outpost keys new {role})'}")
    print(f"allowed  {len(allowed)} client{'s' * (len(allowed) != 1)} in {curve.allowed_dir(settings.keys_dir)}")
    for name, key in allowed.items():
        print(f"  {name:<20} {key.decode()}")
    return 0


def cmd_keys_allow(args: argparse.Namespace, settings: Settings) -> int:
    path = curve.allow(settings.keys_dir, args.name, args.key)
    if args.json:
        fmt.print_json({"allowed": args.name, "path": str(path)})
    else:
        print(f"allowed {args.name} ({path})")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    curve.revoke(settings.keys_dir, args.name)
    if args.json:
        fmt.print_json({"revoked": args.name})
    else:
        print(f"revoked {args.name}: its next connection is refused")
    return 0
