"""The ONNX backend, on the tiny random model converted by `outpost models convert`'s own
code (GGUF -> transformers -> onnxruntime-genai's builder -> the store), served by a real
daemon: the same grammar, vocabulary and replies as the GGUF it came from."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the `onnx` extra")
pytest.importorskip("onnxruntime_genai", reason="the `convert` extra")

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest
from outpost.models.errors import ModelLoadFailed
from outpost.models.llama import LlamaModel
from outpost.models.onnx import OnnxModel, choose_providers
from outpost.runtime.config import Settings
from outpost.runtime.errors import BadRequest, ModelNotPulled, UnknownModel
from outpost.sync.pull import ModelPuller
from outpost.tools.fleet import FleetHub, provision
from outpost.tools.convert_onnx import convert

from .conftest import TINY, make_data_dir, start_daemon
from .test_streaming import reassemble
from .test_wire import TOOLS, USER

ONNX = f"{TINY}-onnx-fp32"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_gguf):
    """A data dir with the tiny GGUF and its fp32 ONNX conversion (the converter's path)."""
    data = make_data_dir(tmp_path_factory.mktemp("onnx"), tiny_gguf)
    settings = Settings.load(None, data_dir=data, manifest_dirs=[data / "manifests"], default_model=TINY)
    done = convert(settings, TINY, "fp32", threads=1)
    return data, done


def models(data):
    store = ModelStore(data / "models")
    catalog = Catalog.load(store, [data / "manifests"], TINY)
    return store, catalog.get(TINY), catalog.get(ONNX)


def test_the_conversion_is_a_verified_manifest_in_the_store(converted):
    data, done = converted
    store, gguf, onnx = models(data)
    names = {f.name for f in onnx.files}
    assert onnx.backend == "onnx" and onnx.version == gguf.version
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= names
    assert all(s.ok for s in store.verify(onnx))
    assert int(onnx.memory_estimate) > done.size  # files + KV cache + runtime
    folder = store.folder(onnx)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_the_graph_computes_what_llama_cpp_computes(converted):
    """fp32 both ways: the same prompt tokens, the same vocabulary bytes, the same logits."""
    data, _ = converted
    store, gguf, onnx = models(data)
    a = LlamaModel(gguf, store.weights_path(gguf), n_threads=1)
    b = OnnxModel(onnx, store.folder(onnx), n_threads=1)
    try:
        prompt = a.render(GenerationRequest(messages=USER, tools=TOOLS)).encode()
        tokens = a.tokenize(prompt, prompt=True)
        assert b.tokenize(prompt, prompt=True) == tokens
        assert a.vocab.pieces == b.vocab.pieces and sorted(a.vocab.stop_ids) == sorted(b.vocab.stop_ids)
        a._eval(tokens)
        b._eval(tokens)
        assert np.allclose(a._logits(), b._logits(), atol=1e-3)
        # Step by step through the cache, and after a trim (a loop cut) too.
        for tok in (5, 17, 200):
            a._eval([tok])
            b._eval([tok])
        a._truncate(len(tokens) + 1)
        b._truncate(len(tokens) + 1)
        a._eval([42])
        b._eval([42])
        assert np.allclose(a._logits(), b._logits(), atol=1e-3)
    finally:
        a.close()
        b.close()


def test_control_tokens_are_empty_to_the_grammar(converted):
    data, _ = converted
    store, _, onnx = models(data)
    model = OnnxModel(onnx, store.folder(onnx), n_threads=1)
    try:
        for text in (b"<|im_start|>", b"<|im_end|>", b"<|endoftext|>"):
            tok = model.tokenize(text, prompt=True)[-1]  # parsed as a control token in a prompt only
            assert model.vocab.pieces[tok] == b"" and len(model.tokenize(text, prompt=False)) > 1
        # Pushed towards `<|im_start|>` at every step, a constrained call still never holds it.
        start = model.tokenize(b"<|im_start|>", prompt=True)[-1]
        original = model._logits

        def biased(slot: int = 0) -> np.ndarray:
            logits = original(slot)
            logits[start] += 50.0
            return logits

        model._logits = biased  # the model's own output, with one token made likeliest
        sampled: list[int] = []
        step = model._eval

        def watched(tokens: list[int], slot: int = 0) -> None:
            sampled.extend(tokens)
            step(tokens, slot)

        model._eval = watched  # what the loop feeds back: the prompt, then every chosen token
        gen = model.generate(GenerationRequest(messages=USER, tools=TOOLS, tool_choice="required",
                                               max_tokens=200))
        prompt = len(model.tokenize(model.render(GenerationRequest(
            messages=USER, tools=TOOLS, tool_choice="required")).encode(), prompt=True))
        assert gen.tool_calls and gen.completion_tokens > 5
        assert start not in sampled[prompt:]
    finally:
        model.close()


def test_every_tool_choice_through_a_daemon(converted):
    data, _ = converted
    with start_daemon(data, ONNX) as daemon, daemon.client() as c:
        for seed in (0, 1, 2):
            reply = c.chat(USER, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=1.0, seed=seed)
            assert reply["choices"][0]["finish_reason"] == "tool_calls"
            assert all(v["valid"] for v in reply["outpost"]["validation"])
            assert reply["outpost"]["model"] == ONNX
        named = {"type": "function", "function": {"name": "set_mode"}}
        reply = c.chat(USER, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, max_tokens=300, seed=3)
        assert [x["function"]["name"] for x in reply["choices"][0]["message"]["tool_calls"]] == ["set_mode"]
        reply = c.chat(USER, tools=TOOLS, tool_choice="none", max_tokens=20)
        assert "tool_calls" not in reply["choices"][0]["message"]
        reply = c.chat(USER, tools=TOOLS, tool_choice="auto", max_tokens=60, seed=4)
        assert reply["outpost"]["constrained"] is True
        # Parallel calls: several under one reply, each valid.
        calls = []
        for seed in range(8):
            reply = c.chat(USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=True,
                           max_tokens=300, temperature=1.0, seed=seed)
            calls.append(len(reply["choices"][0]["message"]["tool_calls"]))
            assert all(v["valid"] for v in reply["outpost"]["validation"])
        assert max(calls) > 1, calls
        # Streaming joins to the same answer.
        chunks = list(c.chat_stream(USER, tools=TOOLS, tool_choice="required", max_tokens=300, seed=1))
        whole = c.chat(USER, tools=TOOLS, tool_choice="required", max_tokens=300, seed=1)
        _, streamed, _ = reassemble(chunks)
        assert [x["function"] for x in streamed] == [x["function"] for x in whole["choices"][0]["message"]["tool_calls"]]
        loaded = c.status()["loaded"]
        assert [(w["model"], w["backend"], w["runs_on"]) for w in loaded] == [(ONNX, "onnx", "CPU")]


def test_a_corrupt_onnx_file_is_refused_before_it_is_loaded(converted, tmp_path):
    data, _ = converted
    store, _, onnx = models(data)
    blob = store.blob_path(next(f for f in onnx.files if f.name == "model.onnx.data").sha256)
    saved = blob.read_bytes()
    os.chmod(blob, 0o644)
    try:
        with open(blob, "r+b") as fh:  # one flipped byte, same size
            fh.seek(len(saved) // 2)
            fh.write(bytes([saved[len(saved) // 2] ^ 0xFF]))
        with start_daemon(data, ONNX) as daemon, daemon.client() as c:
            with pytest.raises(Exception) as info:
                c.chat(USER, max_tokens=4)
            assert info.value.code == "checksum_mismatch"
            assert c.status()["loaded"] == []
    finally:
        blob.write_bytes(saved)
        os.chmod(blob, 0o444)
        store.ensure_verified(next(f for f in onnx.files if f.name == "model.onnx.data"))


def test_a_graph_wanting_inputs_the_loop_does_not_feed_is_refused_at_load(converted, tmp_path):
    onnx_lib = pytest.importorskip("onnx")
    data, _ = converted
    store, _, onnx = models(data)
    folder = store.folder(onnx)
    for f in folder.iterdir():  # the same files, but for the graph
        if f.name != "model.onnx":
            os.link(f, tmp_path / f.name)
    graph = onnx_lib.load(str(folder / "model.onnx"), load_external_data=False)
    graph.graph.input.append(onnx_lib.helper.make_tensor_value_info(
        "token_type_ids", onnx_lib.TensorProto.INT64, [1, "sequence"]))
    onnx_lib.save(graph, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelLoadFailed, match="token_type_ids"):
        OnnxModel(onnx, tmp_path, n_threads=1)


def test_a_converted_model_is_published_and_pulled_like_any_other(converted, tmp_path):
    """Through a signed fleet hub in a folder, to a device that trusts only its root."""
    data, _ = converted
    store, _, onnx = models(data)
    hub = FleetHub.create(tmp_path / "hub", tmp_path / "keys")
    hub.add_model((store.manifests / f"{ONNX}.toml").read_text(),
                  {f.name: store.blob_path(f.sha256) for f in onnx.files})
    provision(hub.root_json, tmp_path / "dev" / "trust")
    dev = ModelStore(tmp_path / "dev" / "models")
    [pulled] = ModelPuller(f"file://{hub.hub}", "stable", tmp_path / "dev" / "trust", dev).pull()
    assert (pulled.model, pulled.installed) == (ONNX, True)
    manifest, _ = dev.staged(ONNX, onnx.version)
    model = OnnxModel(manifest, dev.folder(manifest), n_threads=1)
    try:
        assert model.generate(GenerationRequest(messages=USER, max_tokens=4)).completion_tokens >= 1
    finally:
        model.close()


def test_convert_refuses_what_it_cannot_convert(converted):
    data, _ = converted
    settings = Settings.load(None, data_dir=data, manifest_dirs=[data / "manifests"], default_model=TINY)
    with pytest.raises(BadRequest):
        convert(settings, TINY, "int3")
    with pytest.raises(BadRequest):
        convert(settings, TINY, "int4", target="rocm")
    with pytest.raises(BadRequest):
        convert(settings, ONNX, "int4")  # already ONNX
    with pytest.raises(UnknownModel):
        convert(settings, "no-such-model", "int4")
    # In the catalog, its file never fetched: nothing to convert yet.
    text = (data / "manifests" / f"{TINY}.toml").read_text().replace(f'id = "{TINY}"', 'id = "not-here"')
    text = re.sub(r'sha256 = "[0-9a-f]{64}"', f'sha256 = "{"ab" * 32}"', text)
    (data / "manifests" / "not-here.toml").write_text(text)
    try:
        with pytest.raises(ModelNotPulled):
            convert(settings, "not-here", "int4")
    finally:
        (data / "manifests" / "not-here.toml").unlink()


def test_providers_end_with_the_cpu():
    assert choose_providers()[-1] == "CPUExecutionProvider"
    assert choose_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]


def test_the_decision_reads_the_same_evidence_on_both_backends(converted):
    """tool_choice auto's evidence (the call-opening mass, the turn end's logits) comes off
    the ONNX graph's forward pass as it does off llama.cpp's."""
    from outpost.tools.calibrate import reading_rule

    data, _ = converted
    store, gguf, onnx = models(data)
    a = LlamaModel(gguf, store.weights_path(gguf), n_threads=1)
    b = OnnxModel(onnx, store.folder(onnx), n_threads=1)
    try:
        request = GenerationRequest(messages=USER, tools=TOOLS)
        ea, eb = a.evidence(request, reading_rule(a.n_vocab)), b.evidence(request, reading_rule(b.n_vocab))
        assert np.allclose(ea.turn_end, eb.turn_end, atol=1e-3)
        assert ea.open_logodds == pytest.approx(eb.open_logodds, abs=1e-3)
    finally:
        a.close()
        b.close()
