"""Activation: a version pulled from the fleet serves only after its smoke test in a
worker, a broken one is refused while the active one keeps serving, and rollback
returns to the version before. A real daemon on a real socket answers throughout;
the whole round trip runs through a `file://` hub (the USB stick)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.cli import main
from outpost.runtime.logs import schema
from outpost.tools.fleet import FleetHub
from outpost.tools.lora_gguf import BaseShape, write_lora_gguf
from outpost.tools.specialise import adapter as adapters
from outpost.tools.tiny_gguf import write_tiny_gguf

from .conftest import TINY, ServeProcess, make_data_dir, start_daemon, tiny_manifest_toml
from .test_adapters import ASK, random_state, training


def version_toml(gguf: Path, version: str) -> str:
    return tiny_manifest_toml(gguf).replace('version = "1"', f'version = "{version}"')


def broken_gguf(path: Path) -> Path:
    """A file a hub can sign like any other, which no worker can load."""
    path.write_bytes(b"GGUF" + b"\xff" * 4096)
    return path


@pytest.fixture
def device(tmp_path, tiny_gguf, monkeypatch):
    """A device serving tiny-random version 1, provisioned for a fleet hub in a folder."""
    data = make_data_dir(tmp_path / "device", tiny_gguf)
    monkeypatch.setenv("OUTPOST_ENDPOINT", f"ipc://{data}/outpost.sock")
    monkeypatch.setenv("OUTPOST_SYNC__PUSH_DELAY_S", "0")  # push what was logged just now
    hub = FleetHub.create(tmp_path / "usb" / "hub", tmp_path / "keys")
    assert main(["sync", "provision", str(hub.root_json), "--data-dir", str(data)]) == 0
    return data, hub


def served_version(client) -> str:
    return client.chat([{"role": "user", "content": "hi"}], model=TINY, max_tokens=2)["outpost"]["model_version"]


def test_a_round_trip_through_a_usb_hub(tmp_path, device, capsys):
    """Acceptance: the device pushes its log, the operator collects it and publishes a
    new version, the device pulls it and activates it after the smoke test; a broken
    version is refused at activation and the old one keeps serving."""
    data, hub = device
    usb = f"file://{hub.hub.parent}"
    with start_daemon(data, TINY) as daemon, daemon.client() as client:
        assert served_version(client) == "1"
        # Logs up, then collected into one training file.
        assert main(["sync", "push", "--hub", usb, "--device", "rover-1", "--data-dir", str(data)]) == 0
        capsys.readouterr()
        out = tmp_path / "fleet.jsonl"
        assert main(["fleet", "collect", "--from", usb, "--out", str(out), "--json",
                     "--min-confidence", "0"]) == 0
        assert json.loads(capsys.readouterr().out)["devices"] == ["rover-1"]
        # A new version down: staged, smoke-tested in a worker, then served.
        v2 = write_tiny_gguf(tmp_path / "v2.gguf", seed=2)
        hub.add_model(version_toml(v2, "2"), {"tiny.gguf": v2})
        assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data)]) == 0
        assert "passed its smoke test, active (was 1)" in capsys.readouterr().out
        assert served_version(client) == "2"  # no restart
        # A broken version: refused at activation; version 2 keeps serving.
        bad = broken_gguf(tmp_path / "v3.gguf")
        hub.add_model(version_toml(bad, "3"), {"tiny.gguf": bad})
        assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data)]) == 1
        assert "failed its smoke test" in capsys.readouterr().out
        assert served_version(client) == "2"
        store = ModelStore(data / "models")
        assert store.pulled_manifest(TINY).version == "2" and store.failed(TINY, "3") is not None
        # Not retried on every pull: it waits for the hub's next version.
        assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data)]) == 0
        assert "refused at an earlier activation" in capsys.readouterr().out
        assert main(["sync", "status", "--data-dir", str(data), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["pull"]["refused"][TINY]["version"] == "3"
        # Rollback, live: back to 1.
        assert main(["models", "rollback", TINY, "--data-dir", str(data)]) == 0
        assert "the daemon serves it now" in capsys.readouterr().out
        assert served_version(client) == "1"
        assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data)]) == 0
        assert "refused at an earlier activation" in capsys.readouterr().out
        assert served_version(client) == "1"
        assert main(["models", "versions", TINY, "--data-dir", str(data), "--json"]) == 0
        states = {r["version"]: r["state"] for r in json.loads(capsys.readouterr().out)}
        assert states == {"1": "active", "2": "refused", "3": "refused"}
    db = schema.open_db(data / "logs.db")
    events = [(r["kind"], r["version"], r["reason"]) for r in
              db.query("select kind, version, reason from pool_events where kind in ('trial', 'replace') order by id")]
    assert ("trial", "2", "passed") in events and any(k == "trial" and v == "3" and r != "passed"
                                                       for k, v, r in events)
    assert [e for e in events if e[0] == "replace"]  # the old version's worker drained and went


def test_without_a_daemon_activation_runs_its_own_and_rollback_edits_the_store(tmp_path, device, capsys):
    data, hub = device
    v2 = write_tiny_gguf(tmp_path / "v2.gguf", seed=2)
    hub.add_model(version_toml(v2, "2"), {"tiny.gguf": v2})
    assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data), "--json"]) == 0
    [pulled] = json.loads(capsys.readouterr().out)
    assert pulled["activation"]["active"] and pulled["activation"]["where"] == "private"
    store = ModelStore(data / "models")
    assert store.pulled_manifest(TINY).version == "2"
    assert main(["models", "rollback", TINY, "--data-dir", str(data)]) == 0
    assert "the next `outpost serve` serves it" in capsys.readouterr().out
    assert store.pulled_manifest(TINY).version == "1"
    # Held back: the next sync does not activate the version rolled back from.
    assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data)]) == 0
    assert "refused at an earlier activation (rolled back)" in capsys.readouterr().out
    assert store.pulled_manifest(TINY).version == "1"
    assert main(["models", "rollback", TINY, "--data-dir", str(data)]) == 1  # nothing earlier
    assert "no earlier version" in capsys.readouterr().err
    assert main(["models", "activate", TINY, "9", "--data-dir", str(data)]) == 1  # never staged
    with start_daemon(data, TINY) as daemon, daemon.client() as client:
        assert served_version(client) == "1"  # what the store says after a restart


@pytest.mark.slow  # a real `outpost serve` and its sync children: ~10 s
def test_serve_syncs_on_its_own_schedule(tmp_path, device):
    """`[sync] interval_s`: the daemon's process pulls (and activates through itself)
    and pushes on a schedule, in child processes, while it answers requests."""
    data, hub = device
    v2 = write_tiny_gguf(tmp_path / "v2.gguf", seed=2)
    hub.add_model(version_toml(v2, "2"), {"tiny.gguf": v2})
    config = (f'manifest_dirs = ["{data / "manifests"}"]\ndefault_model = "{TINY}"\n'
              f'[sync]\nhub = "file://{hub.hub}"\ninterval_s = 1\ndevice_id = "rover-9"\npush_delay_s = 0\n')
    with ServeProcess(data, config) as serve, serve.client() as client:
        client.chat([{"role": "user", "content": "hi"}], model=TINY, max_tokens=2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sync = client.status().get("sync") or {}
            if (sync.get("push") or {}).get("rows") and served_version(client) == "2":
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no sync round finished: {client.status().get('sync')}\n{serve.output()}")
    assert (hub.hub / "logs" / "rover-9").is_dir()


@pytest.mark.slow  # waits out the 10 s ping
def test_a_daemon_that_does_not_answer_is_not_bypassed(tmp_path, device, capsys):
    """Something listens on the daemon's socket but does not answer (busy, starting): the
    pull stages the version and leaves activation for later, rather than switching the
    store behind a daemon that would go on serving the old version."""
    data, hub = device
    v2 = write_tiny_gguf(tmp_path / "v2.gguf", seed=2)
    hub.add_model(version_toml(v2, "2"), {"tiny.gguf": v2})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(data / "outpost.sock"))
        mute.listen()
        assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data)]) == 3
    store = ModelStore(data / "models")
    assert store.pulled_manifest(TINY).version == "1" and store.staged(TINY, "2")


def test_a_task_adapter_travels_like_a_model(tmp_path, device, capsys):
    """Fleet-ready: an adapter published at the hub is pulled, smoke-tested on the device's
    base and activated; its task then goes to it, on the base's worker."""
    data, hub = device
    store = ModelStore(data / "models")
    base = Catalog.load(store, [data / "manifests"], TINY).get(TINY)
    base_path = store.blob_path(base.weights.sha256)
    gguf = write_lora_gguf(tmp_path / "adapter.gguf", random_state(base_path, 7), BaseShape.read(base_path), 8.0)
    model_id = adapters.adapter_id("clock", base)
    text = adapters.manifest_text(base, model_id, "a1", ["clock"], gguf, training())
    hub.add_model(text, {f"{model_id}-a1.gguf": gguf})
    with start_daemon(data, TINY) as daemon, daemon.client() as client:
        assert main(["sync", "pull", "--hub", f"file://{hub.hub}", "--data-dir", str(data)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{model_id} a1: staged") and "passed its smoke test, active (first install)" in out
        reply = client.chat(ASK, task="clock", max_tokens=4)
        assert (reply["model"], reply["outpost"]["model_version"]) == (model_id, "a1")
        assert [w["model"] for w in client.status()["loaded"]] == [TINY]
