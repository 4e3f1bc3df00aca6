"""Model files are untrusted input: a corpus of broken and malicious GGUFs (made from the
tiny model by byte surgery, tests/helpers/gguf_corpus.py), each refused by Outpost's own
reader with `model_invalid` and its reason, through a live daemon that keeps serving."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.models import gguf_check
from outpost.models.errors import ModelInvalid
from outpost.runtime.errors import ModelLoadFailed
from tests.conftest import SMOLLM2, TINY, make_data_dir, start_daemon
from tests.helpers import gguf_corpus


@pytest.fixture(scope="module")
def cases(tiny_gguf) -> list[gguf_corpus.Case]:
    return gguf_corpus.corpus(tiny_gguf)


def test_the_surgery_starts_from_an_exact_copy(tiny_gguf):
    """Taking the tiny model apart and packing it again gives the same bytes, so each
    case differs from a valid file by its one defect only."""
    assert gguf_corpus.pack(gguf_corpus.read(tiny_gguf)) == tiny_gguf.read_bytes()
    gguf_check.check_model(tiny_gguf)


def test_the_corpus_is_large_and_varied(cases):
    assert len(cases) >= 20
    assert len({c.name for c in cases}) == len(cases)


def test_each_file_is_refused_with_its_reason(cases, tmp_path):
    for case in cases:
        path = tmp_path / f"{case.name}.gguf"
        path.write_bytes(case.data)
        with pytest.raises(ModelInvalid) as refused:
            head = gguf_check.check_model(path)
            if case.template == "gguf":  # what the worker does next (worker_process._checked)
                from outpost.models.templates import ChatTemplate  # noqa: PLC0415

                ChatTemplate.checked(head.metadata["tokenizer.chat_template"], path.name)
        assert refused.value.code == "model_invalid"
        assert case.explains(refused.value.reason), (case.name, refused.value.reason)


def test_known_tensor_types_match_ggml(tmp_path):
    """The reader's block sizes are ggml's (as the gguf package, from llama.cpp, has them)."""
    for type_id, sizes in gguf_check.GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == sizes


def _manifest(case: gguf_corpus.Case, path: Path) -> str:
    return f'''
id = "bad-{case.name.lower().replace("^", "")}"
version = "1"
backend = "gguf"
chat_template = "{case.template or 'chatml'}"
context_length = 2048
memory_estimate = "16MiB"

[[files]]
name = "model.gguf"
size = {max(len(case.data), 1)}
sha256 = "{hashlib.sha256(case.data).hexdigest()}"

[[files.sources]]
kind = "path"
path = "{path}"
'''


def test_a_live_daemon_refuses_each_and_keeps_serving(cases, tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    store = ModelStore(data / "models")
    ids = []
    for case in cases:
        if not case.data:
            continue  # a manifest cannot name an empty file (size > 0); the reader test has it
        path = tmp_path / f"{case.name}.gguf"
        path.write_bytes(case.data)
        text = _manifest(case, path)
        model_id = text.split('"')[1]
        (data / "manifests" / f"{model_id}.toml").write_text(text)
        store.pull(Catalog.load(store, [data / "manifests"], TINY).get(model_id), text)
        ids.append((model_id, case))
    running = start_daemon(data, TINY, preload=[])
    try:
        with running.client(60) as client:
            pid = client.ping()["pid"]
            for model_id, case in ids:
                with pytest.raises(ModelLoadFailed) as refused:
                    client.chat([{"role": "user", "content": "hi"}], model=model_id, max_tokens=2)
                assert refused.value.code == "model_invalid", (case.name, refused.value)
                assert case.explains(refused.value.message), (case.name, refused.value.message)
                assert refused.value.message.startswith("model.gguf")
            # The daemon is the same process, holds no worker for any of them, and serves.
            status = client.status()
            assert client.ping()["pid"] == pid
            assert all(w["model"] == TINY for w in status["loaded"])
            reply = client.chat([{"role": "user", "content": "hi"}], max_tokens=4)
            assert reply["outpost"]["model"] == TINY
    finally:
        running.stop()


@pytest.mark.slow
def test_the_real_models_pass(model_cache, gemma_cache):
    for store, model_id in ((model_cache, SMOLLM2), (gemma_cache, "gemma-3-270m")):
        manifest = Catalog.load(store, [], SMOLLM2).get(model_id)
        head = gguf_check.check_model(store.weights_path(manifest))
        assert head.tensors and head.metadata["general.architecture"]
