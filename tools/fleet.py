"""The fleet operator's side of the hub: a TUF repository of models, in a folder.

    FleetHub.create(hub, keys)            four ed25519 keys (root, targets, snapshot,
                                          timestamp), version 1 of each role, published
    hub.add_model(manifest, files, channel)
                                          the manifest and its files become signed targets,
                                          the channel's index names the model; then
                                          targets, snapshot and timestamp are re-signed
    hub.publish_to(remote)                the folder copied to an S3 bucket or a mirror
    hub.rotate(role)                      a new key for a role, announced by a new root

The hub folder is what devices read (sync/pull.py describes the layout); the keys
folder stays with the operator (private keys, mode 0600) and is never published.
Consistent snapshots: every target file is stored under its hash-prefixed name and
every targets/snapshot version under its own name, so a device that reads while a
publish is under way still sees one consistent set.

What this module must not do: run on a device (devices only verify: sync/pull.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from outpost.manifests.errors import ConfigError
from outpost.manifests.schema import Manifest
from outpost.sync.deadline import as_sync_error
from outpost.sync.pull import blob_target, index_target, manifest_target
from outpost.sync.remotes import Remote

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
# How long each role's signature stays valid: the root rarely changes; the timestamp
# is re-signed often, so a frozen hub (one that stops updating) is noticed within a day.
EXPIRY = {Root.type: timedelta(days=365), Targets.type: timedelta(days=90),
          Snapshot.type: timedelta(days=7), Timestamp.type: timedelta(days=1)}


def _expiry(role: str, days: dict[str, timedelta] | None = None) -> datetime:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return now + (days or EXPIRY)[role]


class FleetHub:
    def __init__(self, hub: Path, keys: Path, signers: dict[str, CryptoSigner] | None = None) -> None:
        self.hub = hub
        self.keys = keys
        self.metadata = hub / "metadata"
        self.targets_dir = hub / "targets"
        self.signers = signers or {role: self._load_signer(role) for role in ROLES}

    # -- creating ----------------------------------------------------------------------
    @classmethod
    def create(cls, hub: Path, keys: Path) -> FleetHub:
        """A new, empty, signed repository in `hub`, its private keys in `keys`."""
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        for role, signer in signers.items():
            path = keys / f"{role}.pem"
            path.write_bytes(signer.private_bytes)
            path.chmod(0o600)
        root = Root(expires=_expiry(Root.type), consistent_snapshot=True)
        for role, signer in signers.items():
            root.add_key(signer.public_key, role)
        fleet = cls(hub, keys, signers)
        fleet.metadata.mkdir(parents=True, exist_ok=True)
        fleet.targets_dir.mkdir(parents=True, exist_ok=True)
        fleet._write(Metadata(root))
        fleet._publish(Targets(expires=_expiry(Targets.type)))
        return fleet

    def _load_signer(self, role: str) -> CryptoSigner:
        path = self.keys / f"{role}.pem"
        if not path.is_file() or not (self.metadata / "1.root.json").is_file():
            raise ConfigError(f"{self.hub} with keys {self.keys} is not a fleet hub "
                              "(`outpost fleet init` makes one)", hub=str(self.hub), keys=str(self.keys))
        return CryptoSigner(load_pem_private_key(path.read_bytes(), password=None))

    @property
    def root_json(self) -> Path:
        """What a device is provisioned with (its one trusted file)."""
        return self.metadata / "1.root.json"

    # -- publishing ---------------------------------------------------------------------
    def add_model(self, manifest_text: str, files: dict[str, Path], channel: str = "stable") -> None:
        """Sign `manifest_text` and its files (name -> local path) into `channel`."""
        manifest = Manifest.from_toml(manifest_text)
        targets = self._load(Targets.type).signed
        for mf in manifest.files:
            self._add_target(targets, blob_target(mf.sha256), files[mf.name].read_bytes())
        self._add_target(targets, manifest_target(channel, manifest.id), manifest_text.encode())
        index = self._index(targets, channel)
        index["models"][manifest.id] = {"version": manifest.version}
        self._add_target(targets, index_target(channel), json.dumps(index, sort_keys=True).encode())
        targets.version += 1
        targets.expires = _expiry(Targets.type)
        self._publish(targets)

    def _index(self, targets: Targets, channel: str) -> dict:
        info = targets.targets.get(index_target(channel))
        if info is None:
            return {"channel": channel, "models": {}}
        return json.loads(self._target_path(info).read_bytes())

    def _add_target(self, targets: Targets, name: str, data: bytes) -> None:
        info = TargetFile.from_data(name, data, ["sha256"])
        path = self._target_path(info)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # content-addressed: the same bytes, the same file
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        targets.targets[name] = info

    def _target_path(self, info: TargetFile) -> Path:
        folder, _, base = info.path.rpartition("/")
        return self.targets_dir / folder / f"{info.hashes['sha256']}.{base}"

    def _publish(self, targets: Targets, targets_written: bool = False) -> None:
        """Sign this targets version, then a snapshot naming it, then a timestamp naming that."""
        if not targets_written:
            self._write(Metadata(targets))
        old = self._load_optional(Snapshot.type)
        snapshot = Snapshot(version=old.signed.version + 1 if old else 1, expires=_expiry(Snapshot.type),
                            meta={f"{Targets.type}.json": MetaFile(version=targets.version)})
        self._write(Metadata(snapshot))
        old_ts = self._load_optional(Timestamp.type)
        timestamp = Timestamp(version=old_ts.signed.version + 1 if old_ts else 1,
                              expires=_expiry(Timestamp.type),
                              snapshot_meta=MetaFile(version=snapshot.version))
        self._write(Metadata(timestamp))

    def publish_to(self, remote: Remote, progress: Callable[[int], None] | None = None) -> int:
        """Copy the hub to a remote (an S3 bucket, a mirror's folder); returns files sent.
        Targets and versioned metadata first, never overwritten (they are immutable), and
        timestamp.json last: a device reading mid-publish still sees the previous set."""
        with as_sync_error("publish"):
            return self._publish_to(remote, progress)

    def _publish_to(self, remote: Remote, progress: Callable[[int], None] | None) -> int:
        have = set(remote.list("metadata/")) | set(remote.list("targets/"))
        files = sorted(p for p in self.targets_dir.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        # Versioned metadata in version order, roots first (a device walks roots upward).
        versioned = sorted((p for p in self.metadata.glob("*.*.json") if p.name[0].isdigit()),
                           key=lambda p: (p.name.split(".")[1] != Root.type, int(p.name.split(".")[0])))
        sent = 0
        for path in files + versioned:
            name = str(path.relative_to(self.hub))
            if name not in have:
                remote.write(name, path, exclusive=True)
                sent += 1
            if progress is not None:
                progress(1)
        remote.write("metadata/timestamp.json", self._file(Timestamp.type), exclusive=False)
        return sent + 1

    def rotate(self, role: str) -> None:
        """Replace `role`'s key: a new root version names the new key (signed by the old
        root key, and by the new one too when the root key itself rotates, as TUF's root
        chain requires), then the role's metadata is re-signed with it. Devices walk the
        root versions on their next refresh and trust only the new key from then on; the
        old private key is kept as `<role>.pem.<version>.retired`."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}", role=role)
        root_md = self._load(Root.type)
        root = root_md.signed
        new = CryptoSigner.generate_ed25519()
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(new.public_key, role)
        root.version += 1
        root.expires = _expiry(Root.type)
        md = Metadata(root)
        md.sign(self.signers[Root.type])  # the old root key vouches for the new root
        if role == Root.type:
            md.sign(new, append=True)  # and the new root key signs its own root
        path = self._file(Root.type, root.version)
        tmp = _write_metadata(md, path)
        key = self.keys / f"{role}.pem"
        retired = key.with_name(f"{role}.pem.{root.version - 1}.retired")
        os.replace(key, retired)
        key.write_bytes(new.private_bytes)
        key.chmod(0o600)
        os.replace(tmp, path)
        self.signers[role] = new
        if role == Targets.type:  # re-sign what the role signs, with its new key
            targets = self._load(Targets.type).signed
            targets.version += 1
            self._publish(targets)
        elif role == Snapshot.type:
            self._publish(self._load(Targets.type).signed, targets_written=True)
        elif role == Timestamp.type:
            self.renew_timestamp()

    def renew_timestamp(self, expires_in: timedelta | None = None) -> None:
        """Re-sign the timestamp (a fleet does it on a schedule, before it expires)."""
        ts = self._load(Timestamp.type).signed
        ts.version += 1
        ts.expires = datetime.now(timezone.utc).replace(microsecond=0) + (expires_in or EXPIRY[Timestamp.type])
        self._write(Metadata(ts))

    # -- files ----------------------------------------------------------------------------
    def _file(self, role: str, version: int | None = None) -> Path:
        if role == Timestamp.type:
            return self.metadata / "timestamp.json"
        return self.metadata / f"{version}.{role}.json"

    def _latest(self, role: str) -> Path | None:
        if role == Timestamp.type:
            path = self._file(role)
            return path if path.exists() else None
        versions = [int(p.name.split(".", 1)[0]) for p in self.metadata.glob(f"*.{role}.json")]
        return self._file(role, max(versions)) if versions else None

    def _load(self, role: str) -> Metadata:
        md = self._load_optional(role)
        if md is None:
            raise FileNotFoundError(f"no {role} metadata in {self.metadata}")
        return md

    def _load_optional(self, role: str) -> Metadata | None:
        path = self._latest(role)
        return Metadata.from_file(str(path)) if path else None

    def _write(self, md: Metadata) -> None:
        md.signatures.clear()
        md.sign(self.signers[md.signed.type])
        path = self._file(md.signed.type, md.signed.version)
        os.replace(_write_metadata(md, path), path)


def _write_metadata(md: Metadata, path: Path) -> Path:
    """`md` in a temp file beside `path` (returned, for the caller to rename), with the
    mode a plain file gets (`to_file` would make it executable: 0o777 less the umask)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
    return tmp


def provision(fleet_root_json: Path, trust_dir: Path) -> None:
    """Give a device the fleet's root.json: the one file it trusts from then on."""
    trust_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fleet_root_json, trust_dir / "root.json")
