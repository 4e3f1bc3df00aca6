"""Models down: pull the manifests and files a fleet signed, verified with TUF.

    hub (file:// folder, s3:// bucket or https:// mirror; remotes.py)
      metadata/   1.root.json, N.targets.json, N.snapshot.json, timestamp.json
      targets/    channels/<channel>/<hash>.index.json, channels/<channel>/<hash>.<id>.toml,
                  blobs/<hash>.sha256-<hex>            (consistent snapshots: hash-prefixed)

The device is provisioned with the fleet's root.json and trusts nothing else: python-tuf's
ngclient refreshes the metadata (signatures, thresholds, versions, expiry, lengths) and
checks every downloaded target's length and hashes against what was signed. A channel's
index names its models; each model's manifest and files are targets too. Model files
are fetched by transfer.py, resumably, and checked against their signed TargetFile; a
verified file is renamed into the model store (`ModelStore.adopt`: size and the digest
computed while it streamed checked against the manifest), so nothing unverified ever
becomes a model.

What this module must not do: sign anything (the fleet's side is tools/fleet.py), or
make a version active: it stages it (files and manifest in the store, not served), and
activate.py makes it active once it passed its smoke test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater

from outpost.manifests.errors import ModelNotPulled
from outpost.manifests.schema import LocalPath, Manifest
from outpost.manifests.sources import new_scratch, remove_scratch
from outpost.manifests.store import ModelStore

from .deadline import as_sync_error
from .errors import SyncError, SyncUntrusted
from .remotes import Remote, RemoteOptions, open_remote
from .transfer import BlobTransfer, backoff, retryable

log = logging.getLogger("outpost.sync")


def index_target(channel: str) -> str:
    return f"channels/{channel}/index.json"


def manifest_target(channel: str, model_id: str) -> str:
    return f"channels/{channel}/{model_id}.toml"


def blob_target(sha256: str) -> str:
    return f"blobs/sha256-{sha256}"


class RemoteFetcher(FetcherInterface):
    """ngclient's network: the hub's remote. Metadata and the small targets (indexes,
    manifests) are read whole, never resumed (timestamp.json is mutable): a cut read is
    retried from the start, a few times. ngclient checks each file's length against its
    own cap; MAX_WHOLE is the fetcher's, so no file can fill the memory first."""

    MAX_WHOLE = 32 << 20

    def __init__(self, remote: Remote, retries: int = 3, backoff_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.remote = remote
        self.base = remote.url + "/"
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(self.base):
            raise tuf_errors.DownloadError(f"{url} is not on the hub {self.remote.url}")
        name = url[len(self.base):]
        for attempt in range(self.retries + 1):
            try:
                return iter([self._whole(name)])
            except tuf_errors.DownloadError as exc:
                # A missing file is a 404, not retried: how ngclient learns there is no newer root.
                if not retryable(exc) or attempt == self.retries:
                    raise
                self.sleep(backoff(attempt, self.backoff_s, 8.0))
        raise AssertionError("unreachable")

    def _whole(self, name: str) -> bytes:
        data = bytearray()
        for chunk in self.remote.read(name, 0):
            data += chunk
            if len(data) > self.MAX_WHOLE:
                raise tuf_errors.DownloadLengthMismatchError(f"{name} is over {self.MAX_WHOLE} bytes")
        return bytes(data)


@dataclass(frozen=True)
class Pulled:
    model: str
    version: str
    installed: bool  # its files and manifest were staged now (False: they were here already)
    transferred: int = 0  # bytes of model files read from the hub (less after a resume)
    active: bool = False  # it is the version the daemon serves already
    refused: str | None = None  # an earlier activation refused it (its smoke test failed)

    @property
    def to_activate(self) -> bool:
        return not self.active and self.refused is None


class ModelPuller:
    """One device's view of one hub channel."""

    def __init__(self, hub: str, channel: str, trust_dir: Path, store: ModelStore,
                 options: RemoteOptions | None = None, max_rate: float | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.remote = open_remote(hub, options)
        root = trust_dir / "root.json"
        if not root.is_file():
            raise SyncError(f"no trusted root at {root}: provision the device with the fleet's "
                            "root.json (`outpost fleet init` writes it)", path=str(root))
        self.hub = self.remote.url
        self.channel = channel
        self.store = store
        self.metadata_dir = trust_dir / "metadata"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self._root = root.read_bytes()
        # Model files resume across runs from a partial file each (transfer.py).
        self.transfer = BlobTransfer(store.tmp / "resume", self.remote, max_rate=max_rate, progress=progress)

    def pull(self) -> list[Pulled]:
        """Refresh the signed metadata, then stage every version of the channel not yet here.
        One pull at a time per store: two would append to the same partial file."""
        self.store.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.store.tmp / "pull.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SyncError("another pull into this store is under way", hub=self.hub) from None
            with as_sync_error("pull"):  # a blob's partial file stays for the next run to resume
                return self._pull_locked()

    def _pull_locked(self) -> list[Pulled]:
        try:
            return self._pull()
        except OSError as exc:  # the device's own disk (full, read-only), not the hub
            raise SyncError(f"cannot write the pull into {self.store.root}: {exc}",
                            path=str(self.store.root)) from exc
        # More bytes than signed (an endless-data attack) is a verification failure,
        # though python-tuf files it under download errors.
        except (tuf_errors.RepositoryError, tuf_errors.DownloadLengthMismatchError) as exc:
            raise SyncUntrusted(f"the hub's data failed verification: {exc}",
                                type(exc).__name__, hub=self.hub) from exc
        except tuf_errors.DownloadError as exc:
            # ngclient wraps what its fetcher raised; a SyncError in there says it better.
            cause = exc.__cause__
            while cause is not None and not isinstance(cause, SyncError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise SyncError(f"cannot read the hub {self.hub}: {exc}", hub=self.hub) from exc

    def _pull(self) -> list[Pulled]:
        updater = Updater(str(self.metadata_dir), f"{self.hub}/metadata/",
                          target_base_url=f"{self.hub}/targets/", fetcher=RemoteFetcher(self.remote),
                          bootstrap=self._root)
        updater.refresh()
        scratch = new_scratch(self.store.tmp)
        try:
            index = json.loads(self._download(updater, index_target(self.channel), scratch))
            return [self._pull_model(updater, model_id, scratch) for model_id in sorted(index["models"])]
        finally:
            remove_scratch(scratch)

    def _download(self, updater: Updater, target: str, scratch: Path) -> bytes:
        return self._download_to(updater, target, scratch / target.replace("/", "_")).read_bytes()

    def _download_to(self, updater: Updater, target: str, path: Path) -> Path:
        """A signed target into `path`, its length and hashes checked against the metadata."""
        updater.download_target(self._signed(updater, target), str(path))
        return path

    def _signed(self, updater: Updater, target: str) -> TargetFile:
        info = updater.get_targetinfo(target)
        if info is None:
            raise SyncError(f"the hub signs no {target}", target=target, hub=self.hub)
        return info

    def _pull_model(self, updater: Updater, model_id: str, scratch: Path) -> Pulled:
        text = self._download(updater, manifest_target(self.channel, model_id), scratch).decode()
        manifest = Manifest.from_toml(text, origin=f"{self.hub} {manifest_target(self.channel, model_id)}")
        if manifest.id != model_id:
            raise SyncUntrusted(f"the channel names {model_id} but its manifest is {manifest.id}",
                                "wrong_manifest", model=model_id)
        active = self.store.pulled_manifest(model_id)
        if active is not None and active.version == manifest.version and self.store.is_pulled(manifest):
            return Pulled(model_id, manifest.version, installed=False, active=True)
        refused = self.store.failed(model_id, manifest.version)
        if refused is not None:  # not again: the hub must publish another version
            return Pulled(model_id, manifest.version, installed=False, refused=refused.get("reason"))
        with contextlib.suppress(ModelNotPulled):
            if self.store.staged(model_id, manifest.version)[1] == text:  # staged, not yet active
                return Pulled(model_id, manifest.version, installed=False)
        files = []
        before = self.transfer.transferred
        for mf in manifest.files:
            local = self.store.blob_path(mf.sha256)
            if not local.exists():
                info = self._signed(updater, blob_target(mf.sha256))
                if info.length != mf.size or info.hashes.get("sha256") != mf.sha256:
                    raise SyncUntrusted(f"{model_id}: the hub signed {mf.name} with another size or "
                                        "hash than its manifest names", "manifest_mismatch",
                                        model=model_id, file=mf.name)
                folder, _, base = info.path.rpartition("/")
                name = f"targets/{folder}/{mf.sha256}.{base}"
                try:
                    partial, sha256 = self.transfer.fetch(name, info)
                except tuf_errors.LengthOrHashMismatchError as exc:  # said of the partial file
                    raise SyncUntrusted(f"{model_id} {manifest.version}: {mf.name} from {self.hub}/{name} is "
                                        f"not the file signed ({exc}); nothing was installed",
                                        type(exc).__name__, model=model_id, version=manifest.version,
                                        file=mf.name, hub_object=f"{self.hub}/{name}") from exc
                # Verified as it streamed in: the store renames it into place (no copy),
                # after checking its size and that digest against the manifest.
                local = self.store.adopt(partial, mf, sha256)
            files.append(mf.model_copy(update={"sources": [LocalPath(kind="path", path=local)]}))
        # Staged, not active: activation (runtime/activation.py) follows the smoke test.
        self.store.stage(manifest.model_copy(update={"files": files}), text)
        log.info("pulled %s %s from %s (%s)", model_id, manifest.version, self.hub, self.channel)
        return Pulled(model_id, manifest.version, installed=True,
                      transferred=self.transfer.transferred - before)
