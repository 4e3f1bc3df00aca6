"""Models down through a fleet hub in a folder (`file://`, the USB stick): a real TUF
repository the test publishes, a device that trusts only the fleet's root.json, and
attacks mounted against the real files. Every refusal leaves the installed models as
they were."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadError
from tuf.api.metadata import Metadata

from outpost.manifests.store import ModelStore
from outpost.runtime.cli import main
from outpost.sync.errors import SyncError, SyncUntrusted
from outpost.sync.pull import ModelPuller
from outpost.sync.remotes import FolderRemote
from outpost.sync.transfer import BlobTransfer
from outpost.tools.fleet import FleetHub, provision
from outpost.tools.tiny_gguf import write_tiny_gguf

from .conftest import TINY, tiny_manifest_toml


@pytest.fixture
def fleet(tmp_path, tiny_gguf):
    hub = FleetHub.create(tmp_path / "hub", tmp_path / "keys")
    hub.add_model(tiny_manifest_toml(tiny_gguf), {"tiny.gguf": tiny_gguf})
    return hub


def device(tmp_path: Path, hub: FleetHub, name: str = "dev") -> tuple[ModelPuller, ModelStore]:
    provision(hub.root_json, tmp_path / name / "trust")
    store = ModelStore(tmp_path / name / "models")
    return ModelPuller(f"file://{hub.hub}", "stable", tmp_path / name / "trust", store), store


def installed(store: ModelStore) -> dict[str, bytes]:
    """Everything the store holds: what a refusal must leave exactly as it was."""
    return {str(p.relative_to(store.root)): p.read_bytes()
            for p in sorted(store.root.rglob("*")) if p.is_file() and "tmp" not in p.parts}


def test_a_device_pulls_a_signed_model_and_a_second_pull_changes_nothing(tmp_path, fleet, tiny_gguf):
    puller, store = device(tmp_path, fleet)
    [pulled] = puller.pull()
    assert (pulled.model, pulled.version, pulled.installed, pulled.to_activate) == (TINY, "1", True, True)
    manifest, _ = store.staged(TINY, "1")  # staged: activation (test_activation.py) serves it
    assert store.pulled_manifest(TINY) is None
    assert store.weights_path(manifest).read_bytes() == tiny_gguf.read_bytes()
    before = installed(store)
    assert [p.installed for p in puller.pull()] == [False]
    assert installed(store) == before


def test_a_new_version_on_the_channel_is_pulled(tmp_path, fleet):
    puller, store = device(tmp_path, fleet)
    puller.pull()
    other = write_tiny_gguf(tmp_path / "v2.gguf", seed=7)
    text = tiny_manifest_toml(other).replace('version = "1"', 'version = "2"')
    fleet.add_model(text, {"tiny.gguf": other})
    [pulled] = puller.pull()
    assert pulled.version == "2" and pulled.installed
    assert store.weights_path(store.staged(TINY, "2")[0]).read_bytes() == other.read_bytes()


def test_a_tampered_blob_is_refused_and_nothing_is_installed(tmp_path, fleet):
    [blob] = (fleet.targets_dir / "blobs").iterdir()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    puller, store = device(tmp_path, fleet)
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.code == "sync_untrusted" and store.pulled_manifest(TINY) is None
    # Named as the operator knows it: the model, its version, the hub's object (not a partial file).
    message = str(err.value)
    assert message.startswith(f"{TINY} 1: tiny.gguf from file://{fleet.hub}/targets/blobs/") and ".partial" not in message
    assert err.value.data["hub_object"].endswith(blob.name) and err.value.data["version"] == "1"
    assert not (store.root / "blobs").exists() or not any((store.root / "blobs").iterdir())


def test_a_blob_longer_than_signed_is_refused(tmp_path, fleet):
    [blob] = (fleet.targets_dir / "blobs").iterdir()
    blob.write_bytes(blob.read_bytes() + b"more")
    puller, store = device(tmp_path, fleet)
    with pytest.raises(SyncUntrusted):
        puller.pull()
    assert store.pulled_manifest(TINY) is None


def _resign(path: Path, signer: CryptoSigner, **changes) -> None:
    md = Metadata.from_file(str(path))
    for key, value in changes.items():
        setattr(md.signed, key, value)
    md.sign(signer)
    md.to_file(str(path))


def test_metadata_signed_by_the_wrong_key_is_refused_and_the_models_stay(tmp_path, fleet, tiny_gguf):
    puller, store = device(tmp_path, fleet)
    puller.pull()
    before = installed(store)
    other = write_tiny_gguf(tmp_path / "evil.gguf", seed=9)
    fleet.add_model(tiny_manifest_toml(other).replace('version = "1"', 'version = "2"'),
                    {"tiny.gguf": other})
    _resign(fleet.metadata / "timestamp.json", CryptoSigner.generate_ed25519())  # an attacker's key
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.reason == "UnsignedMetadataError"
    assert installed(store) == before


def test_a_replayed_older_timestamp_is_refused(tmp_path, fleet, tiny_gguf):
    old = (fleet.metadata / "timestamp.json").read_bytes()
    fleet.renew_timestamp()
    puller, store = device(tmp_path, fleet)
    puller.pull()
    before = installed(store)
    (fleet.metadata / "timestamp.json").write_bytes(old)  # rollback: a valid, older signature
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.reason == "BadVersionNumberError" and installed(store) == before


def test_expired_metadata_is_refused(tmp_path, fleet):
    fleet.renew_timestamp(expires_in=timedelta(seconds=-60))  # a frozen hub: validly signed, stale
    puller, store = device(tmp_path, fleet)
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.reason == "ExpiredMetadataError" and store.pulled_manifest(TINY) is None


def test_oversized_metadata_is_refused(tmp_path, fleet):
    ts = fleet.metadata / "timestamp.json"
    doc = json.loads(ts.read_text())
    doc["padding"] = "x" * 20_000  # endless data: past the client's timestamp limit
    ts.write_text(json.dumps(doc))
    puller, store = device(tmp_path, fleet)
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.reason == "DownloadLengthMismatchError" and store.pulled_manifest(TINY) is None


def test_a_device_without_the_fleets_root_or_with_an_unreachable_hub_gets_a_typed_error(tmp_path, fleet):
    with pytest.raises(SyncError, match="root.json"):
        ModelPuller(f"file://{fleet.hub}", "stable", tmp_path / "unprovisioned", ModelStore(tmp_path / "m"))
    provision(fleet.root_json, tmp_path / "t")
    gone = ModelPuller(f"file://{tmp_path / 'no-hub'}", "stable", tmp_path / "t", ModelStore(tmp_path / "m"))
    with pytest.raises(SyncError) as err:
        gone.pull()
    assert type(err.value) is SyncError and err.value.code == "sync_failed"


def test_a_tampered_manifest_is_refused(tmp_path, fleet):
    [toml] = (fleet.targets_dir / "channels" / "stable").glob("*.toml")
    toml.write_text(toml.read_text().replace("context_length = 2048", "context_length = 4096"))
    puller, store = device(tmp_path, fleet)
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.reason == "LengthOrHashMismatchError" and store.pulled_manifest(TINY) is None


def test_a_mix_of_versions_is_refused(tmp_path, fleet):
    # Mix and match: the snapshot names targets version 2, the hub serves version 1's
    # validly signed file under that name.
    (fleet.metadata / "2.targets.json").write_bytes((fleet.metadata / "1.targets.json").read_bytes())
    puller, store = device(tmp_path, fleet)
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.reason == "BadVersionNumberError" and store.pulled_manifest(TINY) is None


def _partial_for(store: ModelStore, sha256: str) -> Path:
    return store.tmp / "resume" / f"{sha256}.partial"


def test_a_cut_transfer_resumes_from_its_partial_file(tmp_path, fleet, tiny_gguf):
    data = tiny_gguf.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    puller, store = device(tmp_path, fleet)
    half = len(data) // 2
    partial = _partial_for(store, sha)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:half])  # what a cut link left behind
    [pulled] = puller.pull()
    assert pulled.installed and pulled.transferred == len(data) - half
    assert store.blob_path(sha).read_bytes() == data and not partial.exists()


def test_a_resumed_partial_with_wrong_bytes_is_fetched_again_from_the_start(tmp_path, fleet, tiny_gguf):
    data = tiny_gguf.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    puller, store = device(tmp_path, fleet)
    partial = _partial_for(store, sha)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # a lost write: the right length so far, the wrong bytes
    [pulled] = puller.pull()
    assert pulled.transferred == (len(data) - 1000) + len(data)
    assert store.blob_path(sha).read_bytes() == data and not partial.exists()


def test_a_killed_puller_resumes_and_transfers_under_1_2x_the_blob(tmp_path, fleet, tiny_gguf):
    data = tiny_gguf.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    provision(fleet.root_json, tmp_path / "dev" / "trust")
    store = ModelStore(tmp_path / "dev" / "models")
    partial = _partial_for(store, sha)
    script = (f"from pathlib import Path; from outpost.manifests.store import ModelStore; "
              f"from outpost.sync.pull import ModelPuller; "
              f"ModelPuller('file://{fleet.hub}', 'stable', Path('{tmp_path / 'dev' / 'trust'}'), "
              f"ModelStore(Path('{store.root}')), max_rate={len(data) // 4}).pull()")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while (not partial.exists() or partial.stat().st_size < len(data) // 8) and time.monotonic() < deadline:
        assert proc.poll() is None, "the throttled pull finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = partial.stat().st_size
    assert 0 < kept < len(data) and store.pulled_manifest(TINY) is None  # nothing half-installed
    puller = ModelPuller(f"file://{fleet.hub}", "stable", tmp_path / "dev" / "trust", store)
    [pulled] = puller.pull()
    assert pulled.transferred == len(data) - kept
    assert kept + pulled.transferred <= 1.2 * len(data)
    assert store.blob_path(sha).read_bytes() == data


def test_the_commands_round_trip_through_a_folder_hub(tmp_path, tiny_gguf, capsys):

    hub, keys, data = tmp_path / "usb" / "hub", tmp_path / "keys", tmp_path / "device"
    # A manifest for the hub names no source: `--file` gives the bytes, devices get them from the hub.
    (tmp_path / "tiny.toml").write_text(tiny_manifest_toml(tiny_gguf).split("[[files.sources]]")[0])
    assert main(["fleet", "init", "--hub", str(hub), "--keys", str(keys)]) == 0
    assert main(["fleet", "add", str(tmp_path / "tiny.toml"), "--file", f"tiny.gguf={tiny_gguf}",
                 "--hub", str(hub), "--keys", str(keys)]) == 0
    assert main(["fleet", "add", str(tmp_path / "tiny.toml"), "--hub", str(hub), "--keys", str(keys)]) == 2
    # Bad input is a typed error (exit 2, a message), never a traceback, and changes nothing.
    assert main(["fleet", "init", "--hub", str(hub), "--keys", str(keys)]) == 2
    assert main(["fleet", "add", str(tmp_path / "none.toml"), "--hub", str(hub), "--keys", str(keys)]) == 2
    assert main(["fleet", "add", str(tmp_path / "tiny.toml"), "--file", "tiny.gguf=/no/such/file",
                 "--hub", str(hub), "--keys", str(keys)]) == 2
    assert main(["fleet", "renew", "--hub", str(tmp_path / "not-a-hub"), "--keys", str(keys)]) == 2
    assert main(["sync", "provision", str(tmp_path / "none.json"), "--data-dir", str(data)]) == 2
    assert main(["sync", "pull", "--data-dir", str(data)]) == 2  # no hub anywhere
    assert "not a fleet hub" in capsys.readouterr().err
    assert main(["sync", "pull", "--hub", f"file://{hub}", "--data-dir", str(data)]) == 1  # not provisioned
    assert "root.json" in capsys.readouterr().err
    assert main(["sync", "provision", str(hub / "metadata" / "1.root.json"), "--data-dir", str(data)]) == 0
    assert main(["sync", "pull", "--hub", f"file://{hub}", "--data-dir", str(data), "--json"]) == 0
    capsys.readouterr()
    assert main(["sync", "pull", "--hub", f"file://{hub}", "--data-dir", str(data)]) == 0
    assert f"{TINY} 1: up to date" in capsys.readouterr().out
    assert ModelStore(data / "models").pulled_manifest(TINY) is not None
    assert main(["fleet", "renew", "--hub", str(hub), "--keys", str(keys)]) == 0
    assert main(["fleet", "rotate", "snapshot", "--hub", str(hub), "--keys", str(keys)]) == 0
    executable = [str(p) for p in hub.rglob("*") if p.is_file() and p.stat().st_mode & 0o111]
    assert not executable  # metadata is data, like the targets
    assert main(["sync"]) == 2  # the group's help


class CuttingRemote(FolderRemote):
    """A folder behind a link that drops: each read carries at most `cut` bytes, then
    fails. (The network remotes meet the same faults from a real proxy: test_remotes.py.)"""

    def __init__(self, url: str, cut: int) -> None:
        super().__init__(url)
        self.cut, self.connections = cut, 0

    def read(self, name: str, offset: int = 0):
        self.connections += 1
        return self._cut(super().read(name, offset))

    def _cut(self, chunks):
        sent = 0
        for chunk in chunks:
            if sent + len(chunk) > self.cut:
                yield chunk[: self.cut - sent]
                raise DownloadError("connection reset")
            sent += len(chunk)
            yield chunk


def test_a_link_that_keeps_dropping_is_resumed_until_the_blob_is_whole(tmp_path, fleet, tiny_gguf):
    data = tiny_gguf.read_bytes()
    puller, store = device(tmp_path, fleet)
    reader, slept = CuttingRemote(puller.hub, cut=len(data) // 5 + 1), []
    puller.transfer = BlobTransfer(store.tmp / "resume", reader, retries=10, sleep=slept.append)
    [pulled] = puller.pull()
    assert pulled.installed and pulled.transferred == len(data)  # no byte fetched twice
    assert reader.connections == 5 and puller.transfer.retried == 4 and len(slept) == 4
    assert store.blob_path(hashlib.sha256(data).hexdigest()).read_bytes() == data


def test_a_link_down_for_longer_than_the_retries_is_a_sync_error_and_keeps_the_partial(tmp_path, fleet, tiny_gguf):
    data = tiny_gguf.read_bytes()
    puller, store = device(tmp_path, fleet)
    puller.transfer = BlobTransfer(store.tmp / "resume", CuttingRemote(puller.hub, cut=1000), retries=2,
                                   sleep=lambda s: None)
    with pytest.raises(SyncError) as err:
        puller.pull()
    assert type(err.value) is SyncError and store.pulled_manifest(TINY) is None
    assert _partial_for(store, hashlib.sha256(data).hexdigest()).stat().st_size == 3000  # kept for next time


def test_rotated_keys_reach_devices_through_the_root_chain_and_retired_ones_are_refused(tmp_path, fleet, capsys):
    puller, store = device(tmp_path, fleet)
    puller.pull()
    retired_timestamp = CryptoSigner(load_pem_private_key(
        (fleet.keys / "timestamp.pem").read_bytes(), password=None))
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert main(["fleet", "rotate", role, "--hub", str(fleet.hub), "--keys", str(fleet.keys)]) == 0
    assert sorted(p.name for p in fleet.keys.glob("*.retired")) == [
        "root.pem.1.retired", "snapshot.pem.3.retired", "targets.pem.2.retired", "timestamp.pem.4.retired"]
    fleet = FleetHub(fleet.hub, fleet.keys)  # the operator's next session: the keys on disk
    other = write_tiny_gguf(tmp_path / "v2.gguf", seed=5)
    fleet.add_model(tiny_manifest_toml(other).replace('version = "1"', 'version = "2"'), {"tiny.gguf": other})
    [pulled] = puller.pull()  # the device walks roots 2..5 and trusts the new keys
    assert pulled.version == "2" and pulled.installed
    before = installed(store)
    fleet.renew_timestamp()
    _resign(fleet.metadata / "timestamp.json", retired_timestamp)  # a leaked, retired key
    with pytest.raises(SyncUntrusted) as err:
        puller.pull()
    assert err.value.reason == "UnsignedMetadataError" and installed(store) == before
    with pytest.raises(SystemExit) as bad:  # argparse refuses a role that does not exist
        main(["fleet", "rotate", "nobody", "--hub", str(fleet.hub), "--keys", str(fleet.keys)])
    assert bad.value.code == 2


def test_a_device_that_cannot_refresh_keeps_its_models_and_says_why(tmp_path, fleet, capsys, monkeypatch):
    data = tmp_path / "device"
    monkeypatch.setenv("OUTPOST_ENDPOINT", f"ipc://{data}/none.sock")  # no daemon: activation runs its own
    assert main(["sync", "provision", str(fleet.root_json), "--data-dir", str(data)]) == 0
    assert main(["sync", "pull", "--hub", f"file://{fleet.hub}", "--data-dir", str(data)]) == 0
    verified_at = json.loads((data / "sync" / "state.json").read_text())["pull"]["ok_at"]
    fleet.renew_timestamp(expires_in=timedelta(seconds=-60))  # the hub froze (or the clock is wrong)
    assert main(["sync", "pull", "--hub", f"file://{fleet.hub}", "--data-dir", str(data)]) == 1
    capsys.readouterr()
    assert main(["sync", "status", "--data-dir", str(data), "--json"]) == 0
    pull = json.loads(capsys.readouterr().out)["pull"]
    assert pull["ok_at"] == verified_at and pull["error"]["code"] == "sync_untrusted"
    assert "ExpiredMetadataError" in pull["error"]["message"] or "expired" in pull["error"]["message"]
    assert ModelStore(data / "models").pulled_manifest(TINY).version == "1"  # still serving what it verified


def test_a_rollout_staged_by_channel_reaches_canary_devices_first(tmp_path, fleet):
    stable, stable_store = device(tmp_path, fleet, "stable-dev")
    provision(fleet.root_json, tmp_path / "canary-dev" / "trust")
    canary_store = ModelStore(tmp_path / "canary-dev" / "models")
    canary = ModelPuller(f"file://{fleet.hub}", "canary", tmp_path / "canary-dev" / "trust", canary_store)
    with pytest.raises(SyncError, match="canary"):  # no such channel yet: said, not silently empty
        canary.pull()
    v2 = write_tiny_gguf(tmp_path / "v2.gguf", seed=3)
    fleet.add_model(tiny_manifest_toml(v2).replace('version = "1"', 'version = "2"'), {"tiny.gguf": v2},
                    channel="canary")
    assert [p.version for p in canary.pull()] == ["2"]
    assert [p.version for p in stable.pull()] == ["1"]  # stable devices still get version 1
    fleet.add_model(tiny_manifest_toml(v2).replace('version = "1"', 'version = "2"'), {"tiny.gguf": v2})
    assert [p.version for p in stable.pull()] == ["2"]
