"""Where the daemon listens: its ROUTER socket on an ipc path or a loopback TCP port.

An ipc socket file left by a daemon that died is removed, but one that a running
daemon answers on is not taken over; a TCP host other than loopback is refused until
CURVE keys are supported.

What this module must not do: read or answer requests (server.py).
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.asyncio

from outpost.manifests.errors import ConfigError

from . import protocol
from .settings import DaemonSettings


def bind(ctx: zmq.asyncio.Context, settings: DaemonSettings) -> zmq.asyncio.Socket:
    """The daemon's ROUTER socket, bound where the settings say (after checking it may)."""
    endpoint = settings.endpoint
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            if _answers(endpoint):
                raise ConfigError(f"another daemon is already serving on {endpoint}",
                                  endpoint=endpoint)
            path.unlink()  # a socket file left by a daemon that died
    elif endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ConfigError(f"refusing to bind {endpoint}: TCP is loopback-only until "
                              "CURVE keys are configured", endpoint=endpoint)
    else:
        raise ConfigError(f"endpoint must be ipc://PATH or tcp://127.0.0.1:PORT, not {endpoint!r}",
                          endpoint=endpoint)
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    # Hard cap far above the per-request limit: a peer sending more is cut off
    # before we buffer it; anything between gets a request_too_large reply.
    sock.setsockopt(zmq.MAXMSGSIZE, max(settings.server.max_request_bytes * 16, 1 << 24))
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigError(f"cannot bind {endpoint}: {exc.strerror}", endpoint=endpoint) from exc
    return sock


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
