"""CURVE keys: ZeroMQ's encryption and client authentication for TCP off loopback.

A daemon that listens beyond loopback (a robot's other boards reach it over Ethernet)
encrypts every connection and admits only the clients whose public keys it was told
about. The keys live in one folder (`[curve] keys_dir`, default `<data_dir>/keys`):

    server.key, server.key_secret   the daemon's pair          `outpost keys new server`
    client.key, client.key_secret   this machine's client pair `outpost keys new client`
    allowed/<name>.key              clients the daemon admits  `outpost keys allow NAME KEY`

Files are in pyzmq's certificate format (zmq.auth reads them); a secret file is created
owner-only and never rewritten in place. The allow-list is read again whenever its
folder changes, so `keys allow` and `keys revoke` take effect on the next connection
without a restart (runtime/daemon/guard.py asks `AllowList.admits` for each one).

Loopback TCP and ipc:// stay keyless: who can reach them is already decided by the
machine (ipc by the socket's file permissions).

What this module must not do: open sockets or talk to a daemon; it only reads and
writes keys and says which endpoints need them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth import load_certificate
from zmq.utils import z85

from outpost.manifests.errors import ConfigError, NotFound

ROLES = ("server", "client")
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def needs_curve(endpoint: str) -> bool:
    """A TCP endpoint whose host is not loopback: only CURVE may listen or connect there."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return True  # a name, `*` or an interface: it may be reached from elsewhere


def check_key(text: str) -> bytes:
    """A public key as z85 text (40 characters), checked; raises ConfigError."""
    key = text.strip().encode("ascii", "replace")
    try:
        if len(key) == 40 and len(z85.decode(key)) == 32:
            return key
    except (ValueError, KeyError):
        pass
    raise ConfigError(f"not a CURVE public key: {text.strip()[:60]!r} (40 z85 characters, as "
                      "`outpost keys show` prints)", key=text.strip()[:60])


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85
    secret: bytes  # z85


@dataclass(frozen=True)
class ClientKeys:
    """What a client socket needs to reach a CURVE daemon."""

    public: bytes
    secret: bytes
    server: bytes  # the daemon's public key

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def secure(sock: zmq.Socket, endpoint: str, keys: ClientKeys | None) -> None:
    """Give a client socket its CURVE keys before it connects to `endpoint`; a TCP
    endpoint off loopback without keys is refused here rather than left to time out (a
    daemon there speaks CURVE only)."""
    if keys is not None:
        keys.apply(sock)
    elif needs_curve(endpoint):
        raise ConfigError(f"{endpoint} is off loopback: the daemon there admits CURVE clients "
                          "only; pass the client's keys (curve.client_keys, or [curve] in the "
                          "config for the CLI)", endpoint=endpoint)


def _write(path: Path, text: str, mode: int) -> None:
    """Write a key file whole (a temp file renamed over it), created with `mode`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, path)


def _cert(public: bytes, secret: bytes | None = None) -> str:
    lines = ["#   outpost CURVE key (zmq.auth certificate format)", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def new_pair(keys_dir: Path, role: str, force: bool = False) -> KeyPair:
    """Make the daemon's or this client's key pair; an existing one is kept unless `force`
    (replacing the server's locks out every client until they learn the new key)."""
    if role not in ROLES:
        raise ConfigError(f"a key pair is for 'server' or 'client', not {role!r}", role=role)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret_file = keys_dir / f"{role}.key_secret"
    if secret_file.exists() and not force:
        raise ConfigError(f"{secret_file} exists already; pass --force to replace it "
                          "(clients that know the old key are refused after that)", path=str(secret_file))
    public, secret = zmq.curve_keypair()
    _write(secret_file, _cert(public, secret), 0o600)
    _write(keys_dir / f"{role}.key", _cert(public), 0o644)
    return KeyPair(public, secret)


def load_pair(keys_dir: Path, role: str) -> KeyPair | None:
    """The daemon's or this client's pair, or None when it was never made. A secret file
    that others can read is refused: the key in it is no longer a secret."""
    path = keys_dir / f"{role}.key_secret"
    if not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} can be read by other users: `chmod 600 {path}`, or make a new "
                          f"pair (`outpost keys new {role} --force`)", path=str(path))
    public, secret = load_certificate(path)
    if public is None or secret is None:
        raise ConfigError(f"{path} holds no CURVE key pair", path=str(path))
    return KeyPair(public, secret)


def server_pair(keys_dir: Path, endpoint: str) -> KeyPair:
    """The daemon's pair, required to listen on `endpoint` (off loopback)."""
    pair = load_pair(keys_dir, "server")
    if pair is None:
        raise ConfigError(f"refusing to bind {endpoint}: TCP off loopback needs CURVE keys. Run "
                          "`outpost keys new server`, then `outpost keys allow NAME KEY` for each "
                          "client (docs/security.md)", endpoint=endpoint)
    return pair


def client_keys(endpoint: str, keys_dir: Path, server_key: str | None) -> ClientKeys | None:
    """The keys a client needs for `endpoint`: None on ipc and loopback; else this machine's
    client pair and the daemon's public key (`[curve] server_key`, or the server.key file
    of a daemon on this machine)."""
    if not needs_curve(endpoint):
        return None
    pair = load_pair(keys_dir, "client")
    if pair is None:
        raise ConfigError(f"connecting to {endpoint} needs a CURVE client key: run `outpost keys "
                          "new client` and allow its public key on the daemon", endpoint=endpoint)
    if server_key is not None:
        server = check_key(server_key)
    elif (keys_dir / "server.key").exists():
        server = load_certificate(keys_dir / "server.key")[0]
    else:
        raise ConfigError(f"connecting to {endpoint} needs the daemon's public key: set [curve] "
                          "server_key (`outpost keys show` on the daemon's machine prints it)",
                          endpoint=endpoint)
    return ClientKeys(pair.public, pair.secret, server)


# -- the allow-list ----------------------------------------------------------------------
def allowed_dir(keys_dir: Path) -> Path:
    return keys_dir / "allowed"


def allow(keys_dir: Path, name: str, key: str) -> Path:
    """Admit a client's public key under `name` (replacing a key of that name)."""
    if not NAME.match(name):
        raise ConfigError(f"a client name is 1-64 letters, digits, '.', '_' or '-', not {name!r}", name=name)
    public = check_key(key)
    folder = allowed_dir(keys_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{name}.key"
    _write(path, _cert(public), 0o644)
    return path


def revoke(keys_dir: Path, name: str) -> None:
    path = allowed_dir(keys_dir) / f"{name}.key"
    if not NAME.match(name) or not path.exists():
        raise NotFound("allowed client", name)
    path.unlink()


def allowed(keys_dir: Path) -> dict[str, bytes]:
    """Client name -> public key (z85), from the allow-list folder. A file that is not
    a key is skipped (and named by `keys show`), never a reason to admit anyone."""
    keys: dict[str, bytes] = {}
    folder = allowed_dir(keys_dir)
    for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
        try:
            public = load_certificate(path)[0]
        except (OSError, ValueError):
            continue
        if public is not None:
            keys[path.stem] = public
    return keys


class AllowList:
    """The allow-list as the daemon's ZAP handler reads it: re-read when the folder's
    listing or any file in it changed, so a revoked key is refused on its next connection."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._names: dict[bytes, str] = {}

    def _current_stamp(self) -> tuple[tuple[str, int, int], ...]:
        folder = allowed_dir(self.keys_dir)
        if not folder.is_dir():
            return ()
        out = []
        for entry in os.scandir(folder):
            try:
                st = entry.stat()
            except OSError:
                continue
            out.append((entry.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(out))

    def names(self) -> dict[bytes, str]:
        """Public key (z85) -> client name, as the folder is now."""
        stamp = self._current_stamp()
        if stamp != self._stamp:
            self._names = {key: name for name, key in allowed(self.keys_dir).items()}
            self._stamp = stamp
        return self._names

    def admits(self, key: bytes) -> str | None:
        """The client name a public key (z85) was allowed under, or None."""
        return self.names().get(key)
