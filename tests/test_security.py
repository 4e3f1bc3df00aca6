"""The door off loopback: CURVE with a ZAP allow-list, refusals logged and counted; the
ipc socket owner-only. Real daemons on real TCP and ipc sockets, real key files made
by the same code `outpost keys` runs."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from outpost.runtime import curve
from outpost.runtime.client import OutpostClient
from outpost.runtime.config import Settings
from outpost.runtime.embedded import EmbeddedDaemon
from outpost.runtime.errors import ConfigError, DaemonUnreachable
from outpost.runtime.sdk import http_client
from tests.conftest import TINY, free_port, make_data_dir

REFUSED_WAIT_S = 2.0  # a refused handshake never answers: how long the tests wait to see none


def _start(data: Path, endpoint: str) -> EmbeddedDaemon:
    return EmbeddedDaemon(Settings.load(None, data_dir=data, endpoint=endpoint, default_model=TINY,
                                        manifest_dirs=[data / "manifests"], preload=[]))


@pytest.fixture(scope="module")
def curve_daemon(tmp_path_factory, tiny_gguf):
    """A daemon on all interfaces, with a server key and one allowed client ("agent")."""
    data = make_data_dir(tmp_path_factory.mktemp("curve"), tiny_gguf)
    keys = data / "keys"
    server = curve.new_pair(keys, "server")
    agent = curve.new_pair(keys, "client")
    curve.allow(keys, "agent", agent.public.decode())
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    running = _start(data, endpoint)
    yield running, server, agent
    running.stop()


def _keys(pair: curve.KeyPair, server: curve.KeyPair) -> curve.ClientKeys:
    return curve.ClientKeys(pair.public, pair.secret, server.public)


def _refused(endpoint: str, keys: curve.ClientKeys | None) -> bool:
    """No answer to a ping within REFUSED_WAIT_S (a refused handshake sends nothing)."""
    with OutpostClient(endpoint, timeout_s=REFUSED_WAIT_S, curve=keys) as client:
        try:
            client.ping()
        except DaemonUnreachable:
            return True
    return False


def _security(running: EmbeddedDaemon) -> dict:
    with running.client(10) as c:
        return c.status()["security"]


def _counted(running: EmbeddedDaemon, reason: str, above: int = 0, wait_s: float = 10.0) -> bool:
    """Has the guard counted more than `above` refusals for `reason`? The socket monitor
    reports a handshake's end on its own schedule: polled, not read once."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _security(running)["refused"].get(reason, 0) > above:
            return True
        time.sleep(0.1)
    return False


def test_allowed_key_gets_answers_over_curve(curve_daemon):
    running, server, agent = curve_daemon
    with OutpostClient(running.settings.endpoint, timeout_s=60, curve=_keys(agent, server)) as c:
        assert c.ping()["pong"] is True
        reply = c.chat([{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply["outpost"]["model"] == TINY
    # The OpenAI SDK's transport takes the same keys.
    with http_client(running.settings.endpoint, 60, curve=_keys(agent, server)) as http:
        assert http.get("/models").json()["data"]
    # The embedded daemon's own client reads the keys from the settings, as the CLI does.
    assert _security(running)["curve"] is True


def test_unknown_key_is_refused_and_logged(curve_daemon, caplog):
    running, server, _ = curve_daemon
    before = _security(running)["refused"].get("unknown_key", 0)
    stranger = curve.KeyPair(*zmq.curve_keypair())
    with caplog.at_level(logging.WARNING, logger="outpost.security"):
        assert _refused(running.settings.endpoint, _keys(stranger, server))
    assert _counted(running, "unknown_key", above=before)
    assert stranger.public.decode() in caplog.text and "refused a CURVE client" in caplog.text


def test_plain_socket_and_wrong_server_key_are_refused(curve_daemon, caplog):
    running, _, agent = curve_daemon
    port = running.settings.endpoint.rsplit(":", 1)[1]
    with caplog.at_level(logging.WARNING, logger="outpost.security"):
        # A plain ZeroMQ socket (no CURVE) reaching the port over loopback.
        assert _refused(f"tcp://127.0.0.1:{port}", None)
        # An allowed client key, but the wrong idea of the server's key.
        impostor = curve.KeyPair(*zmq.curve_keypair())
        assert _refused(running.settings.endpoint, _keys(agent, impostor))
        # libzmq reports a plain socket as a mechanism mismatch here, as another protocol
        # error elsewhere: either way it is a counted refusal.
        assert _counted(running, "bad_handshake") or _counted(running, "no_curve"), _security(running)
    assert "refused a connection" in caplog.text


def test_client_without_keys_off_loopback_is_refused_before_connecting(curve_daemon):
    running, *_ = curve_daemon
    with pytest.raises(ConfigError, match="off loopback"):
        OutpostClient(running.settings.endpoint, timeout_s=1)
    with pytest.raises(ConfigError, match="off loopback"):
        http_client(running.settings.endpoint)


def test_revoke_and_allow_take_effect_without_restart(curve_daemon):
    running, server, _ = curve_daemon
    keys = running.settings.keys_dir
    late = curve.KeyPair(*zmq.curve_keypair())
    assert _refused(running.settings.endpoint, _keys(late, server))
    curve.allow(keys, "late", late.public.decode())
    with OutpostClient(running.settings.endpoint, timeout_s=30, curve=_keys(late, server)) as c:
        assert c.ping()["pong"] is True
    curve.revoke(keys, "late")
    assert _refused(running.settings.endpoint, _keys(late, server))


def test_cli_takes_the_client_key_from_config(curve_daemon):
    """`outpost status` against the CURVE endpoint: keys from <data_dir>/keys, the server's
    public key from [curve] server_key in a config file."""
    running, server, _ = curve_daemon
    config = running.settings.data_dir / "client.toml"
    config.write_text(f'[curve]\nserver_key = "{server.public.decode()}"\n')
    out = subprocess.run([str(Path(sys.executable).with_name("outpost")), "status", "--json",
                          "--config", str(config), "--data-dir", str(running.settings.data_dir),
                          "--endpoint", running.settings.endpoint, "--timeout", "30"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["security"]["curve"] is True


def test_off_loopback_bind_without_keys_is_refused_at_start(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    with pytest.raises(ConfigError, match="needs CURVE keys"):
        _start(data, f"tcp://0.0.0.0:{free_port()}")


def test_secret_key_readable_by_others_is_refused(tmp_path):
    curve.new_pair(tmp_path, "server")
    os.chmod(tmp_path / "server.key_secret", 0o644)
    with pytest.raises(ConfigError, match="can be read by other users"):
        curve.server_pair(tmp_path, "tcp://0.0.0.0:1")


def test_bad_keys_and_names_are_typed_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a CURVE public key"):
        curve.allow(tmp_path, "x", "not-a-key")
    with pytest.raises(ConfigError, match="client name"):
        curve.allow(tmp_path, "../escape", zmq.curve_keypair()[0].decode())
    curve.new_pair(tmp_path, "client")
    with pytest.raises(ConfigError, match="exists already"):
        curve.new_pair(tmp_path, "client")
    # A stray file in the allow-list is skipped, never read as a key.
    (tmp_path / "allowed").mkdir(exist_ok=True)
    (tmp_path / "allowed" / "junk.key").write_text("nonsense\n")
    assert curve.allowed(tmp_path) == {}


def test_ipc_socket_is_owner_only(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    running = _start(data, f"ipc://{tmp_path}/run/outpost.sock")
    try:
        assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "run" / "outpost.sock").stat().st_mode) == 0o600
    finally:
        running.stop()


def test_ipc_in_a_folder_others_can_write_is_refused(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match="other users can write there"):
        _start(data, f"ipc://{shared}/outpost.sock")


def test_keys_commands(tmp_path):
    """`outpost keys new|allow|show|revoke`, as an operator runs them."""
    exe = str(Path(sys.executable).with_name("outpost"))

    def keys(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "keys", *argv, "--data-dir", str(tmp_path)], capture_output=True,
                              text=True, timeout=60)

    server = keys("new", "server").stdout.strip()
    client = keys("new", "client").stdout.strip()
    assert len(server) == len(client) == 40
    assert keys("new", "server").returncode == 2  # kept unless --force
    assert keys("allow", "planner", client).returncode == 0
    assert keys("allow", "bad", "not-a-key").returncode == 2
    shown = json.loads(keys("show", "--json").stdout)
    assert shown["server"] == server and shown["allowed"] == {"planner": client}
    assert stat.S_IMODE((tmp_path / "keys" / "server.key_secret").stat().st_mode) == 0o600
    assert keys("revoke", "planner").returncode == 0
    assert keys("revoke", "planner").returncode == 1  # not_found
    assert json.loads(keys("show", "--json").stdout)["allowed"] == {}
