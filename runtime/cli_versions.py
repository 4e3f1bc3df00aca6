"""`outpost models activate|rollback|versions|evals`: which version of a model serves, and why.

A version is staged by a fleet sync (or `models pull`), activated after its smoke test in a
worker, and rolled back to the one before; runtime/activation.py talks to the daemon.
`evals` shows the held-out scores that chose a base and promoted (or kept out) a task
adapter, from the log's `evals` table (`outpost specialise` writes it).

What this module must not do: load a model itself, or import the sync layer.
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import unquote

from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore

from . import cli_format as fmt
from .config import Settings
from .errors import ModelNotPulled
from .logs import schema


def add_version_commands(models: argparse._SubParsersAction, common: argparse.ArgumentParser,
                         as_json: argparse.ArgumentParser) -> None:
    """Add the version commands under `outpost models`."""
    p = models.add_parser("activate", parents=[common, as_json],
                          help="serve a staged version once it answers its smoke test in a worker")
    p.add_argument("id")
    p.add_argument("version")
    p.set_defaults(run=cmd_models_activate)
    p = models.add_parser("rollback", parents=[common, as_json],
                          help="serve the version that was active before this one again")
    p.add_argument("id")
    p.set_defaults(run=cmd_models_rollback)
    p = models.add_parser("versions", parents=[common, as_json],
                          help="a model's versions in the store: active, earlier, staged, refused")
    p.add_argument("id")
    p.set_defaults(run=cmd_models_versions)
    p = models.add_parser("evals", parents=[common, as_json],
                          help="held-out scores of models and task adapters, and promotion decisions",
                          description="Every evaluation `outpost specialise` ran: base selection "
                          "(S4) and promotion gates (S6), newest first.")
    p.add_argument("--task", help="only this task")
    p.add_argument("--model", help="only this model or adapter id")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    p.set_defaults(run=cmd_models_evals)


def cmd_models_activate(args: argparse.Namespace, settings: Settings) -> int:
    from .activation import activate  # noqa: PLC0415 (starts a private daemon when none runs)

    done = activate(settings, args.id, args.version)
    if args.json:
        fmt.print_json(done.__dict__)
    elif done.active:
        print(f"{done.model} {done.version} passed its smoke test and is active (was {done.previous})")
    else:
        print(f"{done.model} {done.version} failed its smoke test ({done.refused}); "
              "the active version keeps serving", file=sys.stderr)
    return 0 if done.active else 1


def cmd_models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from .activation import rollback  # noqa: PLC0415

    current, back, live = rollback(settings, args.id)
    if args.json:
        fmt.print_json({"model": args.id, "version": back, "previous": current, "daemon": live})
        return 0
    where = "the daemon serves it now" if live else "the next `outpost serve` serves it"
    if back is None:
        print(f"{args.id}: task adapter {current} retired; its base serves its tasks again "
              f"({'now' if live else 'from the next `outpost serve`'})")
        return 0
    print(f"{args.id}: rolled back from {current} to {back}; {where}")
    return 0


def cmd_models_versions(args: argparse.Namespace, settings: Settings) -> int:
    store = ModelStore(settings.store_dir)
    active = store.pulled_manifest(args.id)
    if active is None and not (store.versions / args.id).is_dir():
        raise ModelNotPulled(args.id)
    rows = []
    for path in sorted((store.versions / args.id).glob("*.toml")):
        m = Manifest.from_file(path)
        earlier = m.version in {unquote(v) for v in store.history(args.id)}
        state = "active" if active and m.version == active.version else "earlier" if earlier else "staged"
        failed = store.failed(args.id, m.version)
        rows.append({"version": m.version, "state": "refused" if failed else state,
                     "reason": failed.get("reason") if failed else None})
    if active is not None and not any(r["version"] == active.version for r in rows):
        rows.append({"version": active.version, "state": "active", "reason": None})
    if args.json:
        fmt.print_json(rows)
        return 0
    for r in rows:
        print(f"{r['version']:<20} {r['state']:<8} {r['reason'] or ''}")
    return 0


def cmd_models_evals(args: argparse.Namespace, settings: Settings) -> int:
    db = schema.open_db(settings.log_path, settings.logs.busy_timeout_s)
    where, params = [], []
    for column in ("task", "model"):
        if getattr(args, column):
            where.append(f"{column} = ?")
            params.append(getattr(args, column))
    sql = (f"select * from evals {'where ' + ' and '.join(where) if where else ''} "
           "order by id desc limit ?")
    rows = list(db.query(sql, [*params, max(1, args.limit)]))
    if args.json:
        fmt.print_json(rows)
        return 0
    if not rows:
        print("no evaluations yet: `outpost specialise` records them")
        return 0
    print(f"{'ID':>4} {'TASK':<16} {'PURPOSE':<7} {'ROLE':<9} {'MODEL':<34} {'N':>4} {'ACC':>6} "
          f"{'VALID':>6} {'P50':>7}  DECISION")
    for r in rows:
        name = f"{r['model']} {r['version']}"
        decision = r["decision"] or ""
        if r["p_value"] is not None:
            decision += f" (p={r['p_value']:.3g})"
        print(f"{r['id']:>4} {r['task'][:16]:<16} {r['purpose']:<7} {r['role']:<9} {name[:34]:<34} "
              f"{r['examples']:>4} {r['accuracy'] * 100:>5.1f}% {r['validity'] * 100:>5.1f}% "
              f"{r['p50_ms']:>5.0f}ms  {decision}")
    return 0
