"""The content-addressed model store.

Layout under `<data dir>/models/`:

    blobs/sha256-<hex>      one file per distinct content, read-only once in place
    manifests/<id>.toml     the manifest each pulled model was pulled with
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ChecksumMismatch, FetchError, ModelFileError, ModelNotPulled
from .schema import Manifest, ModelFile
from .sources import Sink, describe, fetch, fsync_dir, new_scratch, remove_scratch

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance


def _no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda n: None


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
        """Path of the file the backend loads; raises if the model is not pulled."""
        if not self.is_pulled(manifest):
            raise ModelNotPulled(manifest.id)
        return self.blob_path(manifest.weights.sha256)

    # -- pull ----------------------------------------------------------------------
    def pull(self, manifest: Manifest, manifest_text: str,
             progress: ProgressFactory = _no_progress) -> list[Path]:
        """Fetch every missing file of `manifest`, verify it, and record the manifest."""
        paths = [self._pull_file(f, progress) for f in manifest.files]
        self.manifests.mkdir(parents=True, exist_ok=True)
        tmp = self.manifests / f".{manifest.id}.toml.tmp"
        tmp.write_text(manifest_text, encoding="utf-8")
        os.replace(tmp, self.manifests / f"{manifest.id}.toml")
        return paths

    def _pull_file(self, mf: ModelFile, progress: ProgressFactory) -> Path:
        target = self.blob_path(mf.sha256)
        if target.exists():
            return target
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
    def ensure_verified(self, mf: ModelFile) -> Path:
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

    def _stamp(self, path: Path, mf: ModelFile) -> None:
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
        gone = Manifest.from_file(record)
        record.unlink()
        still_used = {f.sha256 for m in self.pulled() for f in m.files}
        removed = []
        for f in gone.files:
            path = self.blob_path(f.sha256)
            if f.sha256 not in still_used and path.exists():
                path.unlink()
                removed.append(path)
                for derived in [self.stamps / f"{f.sha256}.json", *self.cache.glob(f"*{f.sha256}*")]:
                    derived.unlink(missing_ok=True)
        return removed


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def check_file(path: Path, mf: ModelFile) -> None:
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
