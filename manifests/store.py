"""The content-addressed model store.

Layout under `<data dir>/models/`:

    blobs/sha256-<hex>      one file per distinct content, read-only once in place
    manifests/<id>.toml     the active version's manifest: what the daemon serves
    versions/<id>/<v>.toml  every version installed (pulled, staged by a sync, once active)
    versions/<id>/history   the versions active before, oldest first (`models rollback`)
    versions/<id>/<v>.failed  why a staged version was refused at activation (JSON)
    verified/<hex>.json     the stat of a blob when its sha256 last matched
    cache/                  derived data keyed by sha256 (e.g. vocabularies)
    tmp/                    downloads in progress; never read as a model

A file becomes a blob only after its size and sha256 match the manifest: it is
written under tmp/, fsynced, checked, then renamed into blobs/ (atomic on one
filesystem), so an interrupted or corrupt download never becomes a model. Blobs are
shared between manifests that name the same content and removed with the last one.

Every load checks the file first. Hashing a few hundred MB costs about as much as
loading it, so a match is remembered with the file's inode, size, mtime and ctime:
any write or chmod changes the ctime, which no user can set back, and the next load
hashes again. `models verify` always hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import quote, unquote

from .errors import ChecksumMismatch, FetchError, ModelFileError, ModelNotPulled, NotFound
from .schema import MANIFEST_ID, Manifest, ModelFile
from .sources import Sink, describe, fetch, fsync_dir, new_scratch, remove_scratch

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance


def _no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda n: None


class FileIdentity(Protocol):
    """What checking a blob needs to know of a file (a manifest's ModelFile, an adapter)."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class FileStatus:
    name: str
    sha256: str
    present: bool
    ok: bool | None  # None when not checked
    detail: str = ""


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.tmp = root / "tmp"
        self.stamps = root / "verified"
        self.cache = root / "cache"
        self.versions = root / "versions"

    # -- queries -------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{sha256}"

    def is_pulled(self, manifest: Manifest) -> bool:
        return (self.manifests / f"{manifest.id}.toml").exists() and all(
            self.blob_path(f.sha256).exists() for f in manifest.files)

    def pulled(self) -> list[Manifest]:
        if not self.manifests.exists():
            return []
        return [Manifest.from_file(p) for p in sorted(self.manifests.glob("*.toml"))]

    def pulled_manifest(self, model_id: str) -> Manifest | None:
        """The manifest `model_id` was pulled with, if it was."""
        path = self.manifests / f"{model_id}.toml"
        return Manifest.from_file(path) if path.is_file() else None

    def weights_path(self, manifest: Manifest) -> Path:
        """Path of the file the backend loads; raises unless all its files are here (a
        staged version's are, before it is active: its smoke test loads it)."""
        if not all(self.blob_path(f.sha256).exists() for f in manifest.files):
            raise ModelNotPulled(manifest.id)
        return self.blob_path(manifest.weights.sha256)

    # -- pull ----------------------------------------------------------------------
    def pull(self, manifest: Manifest, manifest_text: str,
             progress: ProgressFactory = _no_progress) -> list[Path]:
        """Fetch every missing file of `manifest`, verify it, and make it the active version."""
        paths = self.stage(manifest, manifest_text, progress)
        self.activate(manifest.id, manifest.version)
        return paths

    def adopt(self, path: Path, mf: ModelFile, sha256: str) -> Path:
        """Make a downloaded file a blob by renaming it in (no copy), given the sha256 its
        downloader computed while writing it (sync/transfer.py, streaming). The size and
        digest must match the manifest; `path` must be on the store's filesystem."""
        target = self.blob_path(mf.sha256)
        if target.exists():
            path.unlink(missing_ok=True)
            return target
        size = path.stat().st_size
        if size != mf.size or sha256 != mf.sha256:
            raise ChecksumMismatch(mf.name, mf.sha256, sha256) if size == mf.size else ModelFileError(
                f"{mf.name}: {size} bytes, the manifest says {mf.size}", file=mf.name, size=size,
                expected_size=mf.size)
        self.blobs.mkdir(parents=True, exist_ok=True)
        path.chmod(0o444)
        os.replace(path, target)
        fsync_dir(self.blobs)
        self._stamp(target, mf)
        return target

    # -- versions ------------------------------------------------------------------
    def _version_path(self, model_id: str, version: str, suffix: str = ".toml") -> Path:
        if not re.fullmatch(MANIFEST_ID, model_id):  # it names a folder: never `..` or a path
            raise ModelNotPulled(model_id)
        return self.versions / model_id / f"{quote(version, safe='')}{suffix}"

    def stage(self, manifest: Manifest, manifest_text: str,
              progress: ProgressFactory = _no_progress) -> list[Path]:
        """Install a version's files and manifest without making it active (a sync's
        pull: it is activated after its smoke test). Files already adopted are kept."""
        paths = [self._pull_file(f, progress) for f in manifest.files]
        _write_atomic(self._version_path(manifest.id, manifest.version), manifest_text)
        self._version_path(manifest.id, manifest.version, ".failed").unlink(missing_ok=True)
        return paths

    def staged(self, model_id: str, version: str) -> tuple[Manifest, str]:
        """A version's manifest and its TOML, if its files are all here."""
        path = self._version_path(model_id, version)
        if not path.is_file():
            raise ModelNotPulled(f"{model_id} {version}")
        text = path.read_text(encoding="utf-8")
        manifest = Manifest.from_toml(text, origin=str(path))
        if not all(self.blob_path(f.sha256).exists() for f in manifest.files):
            raise ModelNotPulled(f"{model_id} {version}")
        return manifest, text

    def history(self, model_id: str) -> list[str]:
        path = self.versions / model_id / "history"
        return path.read_text().split() if path.is_file() else []

    def activate(self, model_id: str, version: str) -> str | None:
        """Make a staged version the active one; returns the version it replaced."""
        _, text = self.staged(model_id, version)
        current = self.pulled_manifest(model_id)
        previous = current.version if current is not None else None
        if previous is not None and previous != version:
            # The version's own record too: a model pulled before versions existed has none.
            if not self._version_path(model_id, previous).is_file():
                _write_atomic(self._version_path(model_id, previous),
                              (self.manifests / f"{model_id}.toml").read_text(encoding="utf-8"))
            _write_atomic(self.versions / model_id / "history",
                          "".join(f"{v}\n" for v in [*self.history(model_id), quote(previous, safe="")]))
        _write_atomic(self.manifests / f"{model_id}.toml", text)
        self._version_path(model_id, version, ".failed").unlink(missing_ok=True)
        return previous

    def rollback(self, model_id: str) -> tuple[str, str | None]:
        """Return to the version active before this one: (from, to). A task adapter's first
        version had its base before it: rolling it back retires the adapter (to = None), so
        its task goes to the base again; its versions stay, for `models activate`."""
        self._version_path(model_id, "")  # checks the id
        current = self.pulled_manifest(model_id)
        if current is None:
            raise ModelNotPulled(model_id)
        history = self.history(model_id)
        if not history and current.adapter is not None:
            if not self._version_path(model_id, current.version).is_file():
                _write_atomic(self._version_path(model_id, current.version),
                              (self.manifests / f"{model_id}.toml").read_text(encoding="utf-8"))
            (self.manifests / f"{model_id}.toml").unlink()
            self.mark_failed(model_id, current.version, {"reason": "rolled back", "at": time.time()})
            return current.version, None
        if not history:
            raise NotFound("earlier version of", model_id)
        back = unquote(history[-1])
        _, text = self.staged(model_id, back)
        _write_atomic(self.manifests / f"{model_id}.toml", text)
        _write_atomic(self.versions / model_id / "history", "".join(f"{v}\n" for v in history[:-1]))
        # Held back: the next sync must not activate it again (`models activate` still can).
        self.mark_failed(model_id, current.version, {"reason": "rolled back", "at": time.time()})
        return current.version, back

    def mark_failed(self, model_id: str, version: str, reason: dict) -> None:
        _write_atomic(self._version_path(model_id, version, ".failed"), json.dumps(reason))

    def failed(self, model_id: str, version: str) -> dict | None:
        """Why this version was refused at activation, if it was (a new stage clears it)."""
        path = self._version_path(model_id, version, ".failed")
        return json.loads(path.read_text()) if path.is_file() else None

    def _pull_file(self, mf: ModelFile, progress: ProgressFactory) -> Path:
        target = self.blob_path(mf.sha256)
        if target.exists():
            return target
        if not mf.sources:
            raise FetchError(f"{mf.name} names no source ([[files.sources]]) and is not in the store: "
                             "add a source, or pull the model from its fleet hub (outpost sync pull)",
                             file=mf.name)
        self.blobs.mkdir(parents=True, exist_ok=True)
        scratch = new_scratch(self.tmp)
        errors: list[str] = []
        try:
            for source in mf.sources:
                partial = scratch / f"{mf.name}.partial"
                try:
                    with open(partial, "wb") as out:
                        sink = Sink(out, progress(mf.name, mf.size))
                        fetch(source, sink, scratch)
                        out.flush()
                        os.fsync(out.fileno())
                except FetchError as exc:
                    errors.append(f"{describe(source)}: {exc.message}")
                    continue
                actual = sink.sha256.hexdigest()
                if sink.size != mf.size or actual != mf.sha256:
                    errors.append(f"{describe(source)}: got {sink.size} bytes with sha256 "
                                  f"{actual}, expected {mf.size} bytes with {mf.sha256}")
                    continue
                partial.chmod(0o444)
                os.replace(partial, target)
                fsync_dir(self.blobs)
                self._stamp(target, mf)
                return target
        finally:
            remove_scratch(scratch)
        raise FetchError(f"no source of {mf.name} gave the right bytes: " + "; ".join(errors),
                         file=mf.name, attempts=errors)

    # -- verify / remove -----------------------------------------------------------
    def ensure_verified(self, mf: FileIdentity) -> Path:
        """The blob's path, after checking it (by its stamp when the file is unchanged)."""
        path = self.blob_path(mf.sha256)
        stamp = self.stamps / f"{mf.sha256}.json"
        try:
            if json.loads(stamp.read_text()) == _stat_key(path):
                return path
        except (OSError, ValueError):
            pass
        check_file(path, mf)
        self._stamp(path, mf)
        return path

    def folder(self, manifest: Manifest) -> Path:
        """The model's files, each checked, hard-linked under their manifest names into
        one folder: for a backend that finds files by name beside the one it loads (an
        ONNX graph's external data, a tokenizer's files). Built once per set of files."""
        paths = {f.name: self.ensure_verified(f) for f in manifest.files}
        key = hashlib.sha256("".join(f"{f.name}\0{f.sha256}\n" for f in manifest.files).encode()).hexdigest()
        # Named by the weights too: removing them (remove()) removes the folder and its links.
        folder = self.cache / f"folder-{manifest.weights.sha256}-{key[:16]}"
        if folder.is_dir():
            return folder
        tmp = self.cache / f".{folder.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, path in paths.items():
            try:
                os.link(path, tmp / name)
            except OSError:  # another filesystem (a cache elsewhere): a symlink does
                (tmp / name).symlink_to(path)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _stamp(self, path: Path, mf: FileIdentity) -> None:
        self.stamps.mkdir(parents=True, exist_ok=True)
        tmp = self.stamps / f".{mf.sha256}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(_stat_key(path)))
        os.replace(tmp, self.stamps / f"{mf.sha256}.json")

    def verify(self, manifest: Manifest) -> list[FileStatus]:
        out = []
        for f in manifest.files:
            path = self.blob_path(f.sha256)
            if not path.exists():
                out.append(FileStatus(f.name, f.sha256, present=False, ok=None, detail="missing"))
                continue
            try:
                check_file(path, f)
                self._stamp(path, f)
                out.append(FileStatus(f.name, f.sha256, present=True, ok=True))
            except ModelFileError as exc:
                out.append(FileStatus(f.name, f.sha256, present=True, ok=False, detail=exc.message))
        return out

    def remove(self, manifest_id: str) -> list[Path]:
        """Forget a model; delete the blobs no other pulled manifest still names."""
        record = self.manifests / f"{manifest_id}.toml"
        if not record.exists():
            raise ModelNotPulled(manifest_id)
        gone = [Manifest.from_file(record)]
        versions = self.versions / manifest_id
        if versions.is_dir():  # every version of it goes, staged and earlier ones too
            gone += [Manifest.from_file(p) for p in versions.glob("*.toml")]
            shutil.rmtree(versions)
        record.unlink()
        others = [Manifest.from_file(p) for p in self.versions.glob("*/*.toml")] if self.versions.is_dir() else []
        still_used = {f.sha256 for m in [*self.pulled(), *others] for f in m.files}
        removed = []
        for f in {f.sha256: f for m in gone for f in m.files}.values():
            path = self.blob_path(f.sha256)
            if f.sha256 not in still_used and path.exists():
                path.unlink()
                removed.append(path)
                for derived in [self.stamps / f"{f.sha256}.json", *self.cache.glob(f"*{f.sha256}*")]:
                    if derived.is_dir():  # a folder() of links
                        shutil.rmtree(derived)
                    else:
                        derived.unlink(missing_ok=True)
        return removed


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def check_file(path: Path, mf: FileIdentity) -> None:
    """Raise unless `path` has exactly the manifest's size and sha256.

    Runs before every load: a blob can rot or be edited after it was pulled, and a
    wrong file must be refused before native code parses it.
    """
    try:
        size = path.stat().st_size
        if size != mf.size:
            raise ModelFileError(f"{mf.name}: {size} bytes, the manifest says {mf.size}",
                                 file=mf.name, size=size, expected_size=mf.size)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    except OSError as exc:
        raise ModelFileError(f"{mf.name}: cannot read {path}: {exc.strerror}", file=mf.name) from exc
    if digest.hexdigest() != mf.sha256:
        raise ChecksumMismatch(mf.name, mf.sha256, digest.hexdigest())
