"""Activation: a staged version serves only after it answered its smoke test in a worker
(`outpost models activate`, and `outpost sync pull` after it staged a new version).

The running daemon does it (`models.activate`: a worker of its own, under the budget;
new requests then go to the new version and the old worker drains). With no daemon
running, a private one is started on a private socket for the test and stopped after.
A version that fails is recorded (`<store>/versions/<id>/<v>.failed`, the log's pool
events, `outpost sync status`) and is not tried again until the hub publishes another;
the active version keeps serving.

What this module must not do: load a model itself (the daemon's workers do).
"""

from __future__ import annotations

import logging
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from outpost.manifests.errors import OutpostError

from .client import OutpostClient
from .config import Settings
from .errors import DaemonUnreachable

log = logging.getLogger("outpost")
PING_S = 10.0  # a daemon loading a model can take seconds to answer


def _socket_present(endpoint: str) -> bool:
    """Something listens on this ipc:// socket (a daemon busy or starting), as opposed to
    a file a dead daemon left, which refuses connections. TCP cannot tell without a reply."""
    if not endpoint.startswith("ipc://"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(endpoint[len("ipc://"):])
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Activation:
    model: str
    version: str
    active: bool
    previous: str | None = None
    refused: str | None = None  # why the smoke test failed
    where: str = "daemon"  # "daemon": the running one; "private": one started for the test


def activate(settings: Settings, model: str, version: str) -> Activation:
    try:
        with OutpostClient(settings.endpoint, timeout_s=5.0, curve=settings.client_keys()) as client:
            client.ping(timeout_s=PING_S)
            return _ask(client, model, version, "daemon", settings.server.load_timeout_s)
    except DaemonUnreachable:
        if _socket_present(settings.endpoint):
            # A daemon is there but busy or starting: activating in the store behind its
            # back would leave it serving the old version. The version stays staged, and
            # the next pull (or `outpost models activate`) tries again.
            raise DaemonUnreachable(settings.endpoint, PING_S) from None
    from .embedded import EmbeddedDaemon  # noqa: PLC0415 (only without a daemon)

    with tempfile.TemporaryDirectory(prefix="outpost-activate-") as tmp:
        private = settings.model_copy(update={"endpoint": f"ipc://{Path(tmp) / 'activate.sock'}",
                                              "preload": []})
        with EmbeddedDaemon(private) as daemon, daemon.client(timeout_s=private.server.load_timeout_s * 2) as client:
            return _ask(client, model, version, "private", settings.server.load_timeout_s)


def _ask(client: OutpostClient, model: str, version: str, where: str, load_timeout_s: float) -> Activation:
    client.timeout_s = max(client.timeout_s, load_timeout_s * 2 + 60)
    try:
        done = client.activate(model, version)
    except OutpostError as exc:
        if exc.code != "activation_failed":
            raise
        log.warning("%s", exc)
        return Activation(model, version, active=False, refused=str(getattr(exc, "reason", exc)), where=where)
    return Activation(model, version, active=True, previous=done.get("previous"), where=where)


def rollback(settings: Settings, model: str) -> tuple[str, str | None, bool]:
    """(from, to, told_the_daemon): a running daemon switches at once; otherwise the store
    does, and the next `outpost serve` serves the earlier version. `to` is None when a task
    adapter's first version was retired (its base serves the task again)."""
    try:
        with OutpostClient(settings.endpoint, timeout_s=30.0, curve=settings.client_keys()) as client:
            client.ping(timeout_s=PING_S)
            done = client.rollback(model)
            return done["previous"], done["version"], True
    except DaemonUnreachable:
        if _socket_present(settings.endpoint):
            raise DaemonUnreachable(settings.endpoint, PING_S) from None
    from outpost.manifests.store import ModelStore  # noqa: PLC0415

    current, back = ModelStore(settings.store_dir).rollback(model)
    return current, back, False
