"""Manifests, the content-addressed store, and refusing a corrupt model file."""

from __future__ import annotations

import hashlib
import os

import pytest

from outpost.manifests.catalog import Catalog
from outpost.runtime.errors import ChecksumMismatch, ConfigError, FetchError, ModelNotPulled
from outpost.manifests.schema import Manifest
from outpost.manifests.store import ModelStore, check_file

from .conftest import TINY, make_data_dir, start_daemon


def manifest_for(parts: list, name="m.bin", sha=None, size=None) -> tuple[Manifest, str]:
    data = b"".join(p.read_bytes() for p in parts)
    sources = "\n".join(f'[[files.sources.parts]]\nkind = "path"\npath = "{p}"' for p in parts)
    text = f'''id = "m"
version = "1"
backend = "gguf"
context_length = 128
memory_estimate = "1MiB"
[[files]]
name = "{name}"
size = {size or len(data)}
sha256 = "{sha or hashlib.sha256(data).hexdigest()}"
[[files.sources]]
kind = "concat"
{sources}
'''
    return Manifest.from_toml(text), text


def test_default_catalog_ships_both_models(tmp_path):
    catalog = Catalog.load(ModelStore(tmp_path), [], "smollm2-135m-instruct")
    assert catalog.ids() == ["gemma-3-270m", "smollm2-135m-instruct"]
    gemma = catalog.get("gemma-3-270m")
    assert gemma.weights.sha256.startswith("a5fd3b62") and gemma.weights.sha256.endswith("6818")
    assert len(gemma.weights.sources[0].parts) == 4
    assert catalog.for_task("tool_call").id == "smollm2-135m-instruct"


def test_manifest_rejects_unknown_fields_and_bad_hashes():
    base = 'id = "x"\nversion = "1"\nbackend = "gguf"\ncontext_length = 1\nmemory_estimate = "1MiB"\n'
    f = '[[files]]\nname = "a"\nsize = 1\nsha256 = "{}"\n[[files.sources]]\nkind = "path"\npath = "/a"\n'
    Manifest.from_toml(base + f.format("0" * 64))
    with pytest.raises(ConfigError):
        Manifest.from_toml(base + 'colour = "red"\n' + f.format("0" * 64))
    with pytest.raises(ConfigError):
        Manifest.from_toml(base + f.format("xyz"))
    with pytest.raises(ConfigError):
        Manifest.from_toml(base.replace('"gguf"', '"safetensors"') + f.format("0" * 64))


def test_pull_concatenates_parts_and_verifies(tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}"
        p.write_bytes(os.urandom(1000 + i))
        parts.append(p)
    manifest, text = manifest_for(parts)
    store = ModelStore(tmp_path / "store")
    seen = []
    [blob] = store.pull(manifest, text, lambda label, total: seen.append)
    assert blob.read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert blob.name == f"sha256-{manifest.weights.sha256}"
    assert store.is_pulled(manifest) and store.weights_path(manifest) == blob
    assert [s.ok for s in store.verify(manifest)] == [True]


def test_a_wrong_download_never_becomes_a_model(tmp_path):
    part = tmp_path / "part"
    part.write_bytes(b"hello")
    manifest, text = manifest_for([part], sha="0" * 64)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(FetchError) as info:
        store.pull(manifest, text)
    assert "sha256" in info.value.message
    assert not store.blob_path("0" * 64).exists()
    assert not any((tmp_path / "store" / "tmp").iterdir())  # no partial files left
    with pytest.raises(ModelNotPulled):
        store.weights_path(manifest)


def test_a_file_without_a_source_is_pulled_from_a_hub_or_refused_by_name(tmp_path):
    part = tmp_path / "part"
    part.write_bytes(b"hello")
    _, text = manifest_for([part])
    text = text.split("[[files.sources]]")[0]  # as `fleet add` takes it: the hub has the bytes
    manifest = Manifest.from_toml(text)
    with pytest.raises(FetchError) as info:
        ModelStore(tmp_path / "store").pull(manifest, text)
    assert "m.bin names no source" in info.value.message and info.value.data["file"] == "m.bin"


def test_rm_keeps_blobs_another_manifest_uses(tmp_path):
    part = tmp_path / "part"
    part.write_bytes(b"shared bytes")
    m1, t1 = manifest_for([part])
    m2, t2 = Manifest.from_toml(t1.replace('id = "m"', 'id = "m2"')), t1.replace('id = "m"', 'id = "m2"')
    store = ModelStore(tmp_path / "store")
    store.pull(m1, t1)
    store.pull(m2, t2)
    assert store.remove("m") == []
    assert store.is_pulled(m2)
    assert len(store.remove("m2")) == 1 and not store.blob_path(m2.weights.sha256).exists()


def test_check_file_finds_a_flipped_byte(tmp_path):
    part = tmp_path / "part"
    part.write_bytes(b"a" * 4096)
    manifest, _ = manifest_for([part])
    check_file(part, manifest.weights)
    with open(part, "r+b") as fh:
        fh.seek(100)
        fh.write(b"b")
    with pytest.raises(ChecksumMismatch):
        check_file(part, manifest.weights)


def test_daemon_refuses_a_corrupt_model_before_loading_it(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    store = ModelStore(data / "models")
    manifest = Catalog.load(store, [data / "manifests"], TINY).get(TINY)
    blob = store.blob_path(manifest.weights.sha256)
    blob.chmod(0o644)
    with open(blob, "r+b") as fh:  # flip one byte inside the tensor data
        fh.seek(-10, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-10, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    running = start_daemon(data, TINY)
    try:
        with running.client() as client:
            with pytest.raises(ChecksumMismatch) as info:
                client.chat([{"role": "user", "content": "hi"}], max_tokens=4)
            assert info.value.code == "checksum_mismatch"
            assert info.value.expected == manifest.weights.sha256
            assert client.ping()["pong"]
            assert client.status()["loaded"] == []
    finally:
        running.stop()
