"""The door's guard: CURVE with a ZAP handler on a TCP endpoint off loopback.

CURVE alone encrypts, but admits any client that knows the daemon's public key. The
guard runs a ZAP handler (pyzmq's authenticator, on the daemon's own loop) that asks
the allow-list (runtime/curve.py) about each client key, and a socket monitor that
sees the handshakes that never reach ZAP: a plain socket (no CURVE at all) and a
client that holds the wrong server key. Every refusal is logged with its reason and
counted (`status` → `security`, and the `outpost_handshakes_refused` metric).

What this module must not do: read requests (server.py) or bind (endpoint.py).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from outpost.runtime.curve import AllowList, KeyPair

log = logging.getLogger("outpost.security")
ZAP_DOMAIN = "outpost"
# What the monitor reports; a refused key also shows up as FAILED_AUTH there, after the
# ZAP handler has logged it with the key and the peer's address.
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class _Authenticator(AsyncioAuthenticator):
    """pyzmq's ZAP handler, asking `guard` about each CURVE key with the peer's address
    (pyzmq's credentials callback would see the key only)."""

    def __init__(self, ctx: zmq.asyncio.Context, guard: Guard) -> None:
        super().__init__(ctx, log=logging.getLogger("outpost.security.zap"))
        self.guard = guard
        self.peer = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        return self.guard.admit(key, self.peer)


class Guard:
    def __init__(self, ctx: zmq.asyncio.Context, keys_dir: Path, pair: KeyPair) -> None:
        self.allow_list = AllowList(keys_dir)
        self.pair = pair
        self.refused: Counter[str] = Counter()  # reason -> handshakes refused
        self.admitted = 0
        self._auth = _Authenticator(ctx, self)
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._auth)
        self._monitor: asyncio.Task[None] | None = None
        self._monitor_sock: zmq.asyncio.Socket | None = None

    def arm(self, sock: zmq.asyncio.Socket) -> None:
        """Make `sock` a CURVE server checked by ZAP; call before it binds."""
        self._auth.start()
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.curve_secretkey = self.pair.secret
        sock.curve_publickey = self.pair.public
        sock.curve_server = True
        self._monitor_sock = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self._monitor = asyncio.ensure_future(self._watch(self._monitor_sock))

    def admit(self, key: bytes, peer: str) -> bool:
        name = self.allow_list.admits(key)
        if name is None:
            self.refused["unknown_key"] += 1
            log.warning("refused a CURVE client from %s: key %s is not in %s", peer,
                        key.decode(errors="replace"), self.allow_list.keys_dir / "allowed")
            return False
        log.info("admitted CURVE client %r from %s", name, peer)
        return True

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = await monitor.recv_multipart()
                if len(frames) != 2 or len(frames[0]) != 6:
                    continue
                event, value = struct.unpack("=hi", frames[0])
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.admitted += 1
                elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                    # A plain socket meets CURVE: the mechanisms differ. Anything else at
                    # this stage is a malformed or undecryptable handshake (a wrong server key).
                    reason = ("no_curve" if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                              else "bad_handshake")
                    self.refused[reason] += 1
                    log.warning("refused a connection on %s: %s (protocol error 0x%x)",
                                frames[1].decode(errors="replace"),
                                "the client does not speak CURVE" if reason == "no_curve"
                                else "its CURVE handshake is invalid (a wrong server key?)", value)
                elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    self.refused["bad_handshake"] += 1
                    log.warning("refused a connection on %s: the handshake failed (errno %d)",
                                frames[1].decode(errors="replace"), value)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            monitor.close(linger=0)

    def view(self) -> dict[str, Any]:
        return {"curve": True, "allowed_keys": len(self.allow_list.names()),
                "admitted": self.admitted, "refused": dict(self.refused)}

    def close(self, sock: zmq.asyncio.Socket | None = None) -> None:
        if self._monitor is not None:
            if sock is not None:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
            self._monitor.cancel()
        if self._monitor_sock is not None:
            # Closed now, not when the cancelled task next runs (or never, if it had not
            # started): the context's term() right after waits for every socket.
            self._monitor_sock.close(linger=0)
        self._auth.stop()
