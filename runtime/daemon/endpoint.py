"""Where the daemon listens: its ROUTER socket on an ipc path or a TCP port.

    ipc://PATH          the socket file is owner-only (0600) in a folder only its owner
                        can write: a folder others can write is refused, since anyone
                        who can replace the socket file can answer in the daemon's name
    tcp://127.0.0.1:P   loopback, keyless (the machine decides who reaches it)
    tcp://HOST:P        anywhere else only with CURVE, and a ZAP allow-list (guard.py)

An ipc socket file left by a daemon that died is removed, but one that a running
daemon answers on is not taken over.

What this module must not do: read or answer requests (server.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq
import zmq.asyncio

from outpost.manifests.errors import ConfigError
from outpost.runtime import curve

from . import protocol
from .guard import Guard
from .settings import DaemonSettings


def bind(ctx: zmq.asyncio.Context, settings: DaemonSettings) -> tuple[zmq.asyncio.Socket, Guard | None]:
    """The daemon's ROUTER socket, bound where the settings say (after checking it may),
    and its guard when it is a CURVE endpoint."""
    endpoint = settings.endpoint
    guard = None
    path = None
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        _private_folder(path.parent, endpoint)
        if path.exists():
            if _answers(endpoint):
                raise ConfigError(f"another daemon is already serving on {endpoint}",
                                  endpoint=endpoint)
            path.unlink()  # a socket file left by a daemon that died
    elif curve.needs_curve(endpoint):
        guard = Guard(ctx, settings.keys_dir, curve.server_pair(settings.keys_dir, endpoint))
    elif not endpoint.startswith("tcp://"):
        raise ConfigError(f"endpoint must be ipc://PATH or tcp://HOST:PORT, not {endpoint!r}",
                          endpoint=endpoint)
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    # Hard cap far above the per-request limit: a peer sending more is cut off
    # before we buffer it; anything between gets a request_too_large reply.
    sock.setsockopt(zmq.MAXMSGSIZE, max(settings.server.max_request_bytes * 16, 1 << 24))
    if guard is not None:
        guard.arm(sock)
    try:
        sock.bind(endpoint)
        if path is not None:
            os.chmod(path, 0o600)
    except (zmq.ZMQError, OSError) as exc:
        if guard is not None:
            guard.close(sock)
        sock.close(linger=0)
        raise ConfigError(f"cannot bind {endpoint}: {exc.strerror}", endpoint=endpoint) from exc
    return sock, guard


def _private_folder(folder: Path, endpoint: str) -> None:
    """Create the socket's folder owner-only, or check that an existing one is ours and
    that no one else can write to it."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"refusing to put the socket of {endpoint} in {folder}: other users can "
                          f"write there (mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}); "
                          "use a folder of your own with mode 0700", endpoint=endpoint, folder=str(folder))


def _answers(endpoint: str, timeout_ms: int = 500) -> bool:
    """Is a daemon listening there? (A leftover socket file from a crash does not answer.)"""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send(protocol.ping_frame())
        return bool(sock.poll(timeout_ms))
    finally:
        sock.close()
        ctx.term()
