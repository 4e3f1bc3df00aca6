"""Task adapters: trained here on the tiny model, written in llama.cpp's GGUF adapter
format, loaded by llama.cpp, and served hot on one base by a real daemon."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import ChecksumMismatch
from outpost.manifests.schema import ADAPTER_OVERHEAD, Manifest, Training
from outpost.manifests.store import ModelStore
from outpost.models.backend import AdapterRef, GenerationRequest
from outpost.models.llama import LlamaModel
from outpost.runtime.errors import AdapterBaseMismatch
from outpost.runtime.logs import schema
from outpost.tools.lora_gguf import BaseShape, write_lora_gguf
from outpost.tools.specialise import adapter as adapters
from outpost.tools.specialise.data import Example
from outpost.tools.specialise.train import TrainSettings, train
from outpost.tools.tiny_gguf import write_tiny_gguf

from .conftest import TINY, make_data_dir, start_daemon

pytest.importorskip("peft")

ASK = [{"role": "user", "content": "What time is it in Paris?"}]


def training(**scores: float) -> Training:
    return Training(data_sha256="0" * 64, train_examples=1, heldout_examples=0, rank=4, alpha=8.0,
                    targets=["q_proj"], epochs=1, learning_rate=1e-3, max_seq_len=256, heldout=scores)


def random_state(base: Path, seed: int, rank: int = 4) -> dict[str, np.ndarray]:
    """A LoRA of random weights on every projection of the tiny model: it changes the output."""
    shape = BaseShape.read(base)
    rng = np.random.default_rng(seed)
    state = {}
    dims = {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64),
            "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    for layer in range(shape.n_layer):
        for proj, (out, inp) in dims.items():
            group = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            stem = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            state[f"{stem}.lora_A.weight"] = rng.standard_normal((rank, inp)).astype(np.float32) * 0.5
            state[f"{stem}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32) * 0.5
    return state


def stage_adapter(data: Path, state: dict[str, np.ndarray], seed_name: str, task: str,
                  alpha: float = 8.0) -> Manifest:
    """Write an adapter for the tiny model into `data`'s store and make it active."""
    store = ModelStore(data / "models")
    base = Catalog.load(store, [data / "manifests"], TINY).get(TINY)
    base_path = store.blob_path(base.weights.sha256)
    gguf = write_lora_gguf(data / f"{seed_name}.gguf", state, BaseShape.read(base_path), alpha=alpha)
    model_id = adapters.adapter_id(task, base)
    text = adapters.manifest_text(base, model_id, adapters.next_version(store, model_id), [task], gguf,
                                  training())
    manifest = adapters.stage(store, text)
    store.activate(manifest.id, manifest.version)
    return manifest


def ref(manifest: Manifest) -> AdapterRef:
    return AdapterRef(id=manifest.id, version=manifest.version, sha256=manifest.weights.sha256,
                      size=manifest.weights.size)


def greedy(model: LlamaModel, adapter: AdapterRef | None = None) -> str:
    return model.generate(GenerationRequest(messages=ASK, max_tokens=12, temperature=0.0,
                                            adapter=adapter)).text


@pytest.fixture
def data(tmp_path, tiny_gguf) -> Path:
    return make_data_dir(tmp_path, tiny_gguf)


@pytest.fixture
def learnable(tmp_path) -> Path:
    """A data dir whose tiny model can learn (see write_tiny_gguf's `output_std`)."""
    return make_data_dir(tmp_path, write_tiny_gguf(tmp_path / "learnable.gguf", seed=5, output_std=0.3))


def loaded(data: Path) -> tuple[LlamaModel, ModelStore]:
    store = ModelStore(data / "models")
    base = Catalog.load(store, [data / "manifests"], TINY).get(TINY)
    return LlamaModel(base, store.weights_path(base), n_threads=1, adapter_path=store.ensure_verified), store


def test_adapter_trained_here_is_loaded_by_llama_cpp_and_changes_the_output(learnable, tmp_path):
    data = learnable
    store = ModelStore(data / "models")
    base = Catalog.load(store, [data / "manifests"], TINY).get(TINY)
    # A random model can learn a short answer in a few steps (a whole call takes many).
    examples = [Example.from_json({"messages": [*ASK, {"role": "assistant", "content": "noon"}]})] * 4
    settings = TrainSettings(rank=8, alpha=16.0, epochs=40, learning_rate=1e-2, batch_tokens=4096,
                             max_seq_len=1024, warmup_steps=2, threads=1, checkpoint_every=15)
    trained = train(base, store.blob_path(base.weights.sha256), examples, settings, store.cache,
                    tmp_path / "work", "0" * 64)
    assert trained.steps == 40 and trained.examples == 4 and trained.left_out == 0
    assert trained.losses[-1] < trained.losses[0] / 2  # it learnt the answer
    assert set(trained.state) and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in trained.state)
    # A run started again with the same settings resumes from the last checkpoint.
    again = train(base, store.blob_path(base.weights.sha256), examples, settings, store.cache,
                  tmp_path / "work", "0" * 64)
    assert again.resumed_from == 30 and len(again.losses) == 10

    manifest = stage_adapter(data, trained.state, "trained", "greeting", alpha=settings.alpha)
    assert manifest.adapter.base == TINY and manifest.adapter.base_sha256 == base.weights.sha256
    model, _ = loaded(data)
    try:
        plain = greedy(model)
        tuned = greedy(model, ref(manifest))
        assert tuned != plain
        assert tuned == "noon"  # what it was trained to answer, and then it stops
        assert greedy(model) == plain  # cleared: the base alone again, from a clean cache
        assert model.adapter_switches == 2
    finally:
        model.close()


def base_path(data: Path) -> Path:
    store = ModelStore(data / "models")
    return store.blob_path(Catalog.load(store, [data / "manifests"], TINY).get(TINY).weights.sha256)


def test_two_adapters_never_share_cached_prompt_state(data):
    a = stage_adapter(data, random_state(base_path(data), 1), "a", "alpha")
    b = stage_adapter(data, random_state(base_path(data), 2), "b", "beta")
    fresh = {}
    for manifest in (a, b):  # each adapter alone, on a model of its own
        model, _ = loaded(data)
        try:
            fresh[manifest.id] = greedy(model, ref(manifest))
        finally:
            model.close()
    assert fresh[a.id] != fresh[b.id]
    model, _ = loaded(data)
    try:
        # The same prompt, alternating: with a prompt cache shared across adapters, the
        # second would reuse keys and values computed under the first and answer otherwise.
        for manifest in (a, b, a, b):
            assert greedy(model, ref(manifest)) == fresh[manifest.id]
        assert model.adapter_switches == 4
    finally:
        model.close()


def test_a_corrupt_adapter_is_refused_before_llama_cpp_reads_it(data):
    store = ModelStore(data / "models")
    manifest = stage_adapter(data, random_state(base_path(data), 3), "c", "gamma")
    blob = store.blob_path(manifest.weights.sha256)
    os.chmod(blob, 0o644)
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    model, _ = loaded(data)
    try:
        with pytest.raises(ChecksumMismatch):
            greedy(model, ref(manifest))
        assert model.info()["adapters"] == []  # never loaded
        assert greedy(model)  # the base still answers
    finally:
        model.close()


def test_the_daemon_routes_a_task_to_its_adapter_on_the_loaded_base(data):
    a = stage_adapter(data, random_state(base_path(data), 1), "a", "alpha")
    b = stage_adapter(data, random_state(base_path(data), 2), "b", "beta")
    running = start_daemon(data, TINY)
    try:
        with running.client() as client:
            def ask(**route) -> dict:
                return client.chat(messages=ASK, max_tokens=8, **route)

            plain = ask(model=TINY)
            first = {t: ask(task=t) for t in ("alpha", "beta")}
            assert first["alpha"]["model"] == a.id and first["alpha"]["outpost"]["model_version"] == a.version
            assert first["beta"]["model"] == b.id
            # Alternating adapters on one worker: each answers as it did before.
            for t in ("alpha", "beta", "alpha"):
                again = ask(task=t)
                assert again["choices"][0]["message"] == first[t]["choices"][0]["message"]
            assert ask(model=TINY)["choices"][0]["message"] == plain["choices"][0]["message"]
            workers = client.status()["loaded"]
            assert [w["model"] for w in workers] == [TINY]  # one base in memory serves all three
            (worker,) = workers
            assert sorted(worker["adapters"]) == sorted([f"{a.id} {a.version}", f"{b.id} {b.version}"])
            assert worker["adapter_switches"] >= 5
    finally:
        running.stop()
    # Each adapter was charged to the budget once, before its first use: its file and
    # what applying it adds.
    db = schema.open_db(data / "logs.db")
    events = list(db.query("select model, ram_bytes from pool_events where kind = 'adapter' order by id"))
    assert [(e["model"], e["ram_bytes"]) for e in events] == [
        (m.id, m.weights.size + ADAPTER_OVERHEAD) for m in (a, b)]
    # The log names the adapter version that answered, like any model version.
    rows = list(db.query("select model, model_version, task from requests where task = 'alpha'"))
    assert rows and all((r["model"], r["model_version"]) == (a.id, a.version) for r in rows)


def test_an_adapter_for_another_base_file_is_refused_and_the_base_serves_on(data):
    store = ModelStore(data / "models")
    base = Catalog.load(store, [data / "manifests"], TINY).get(TINY)
    gguf = write_lora_gguf(data / "other.gguf", random_state(base_path(data), 4), BaseShape.read(base_path(data)), 8.0)
    text = adapters.manifest_text(base, "omega.tiny-random", "a1", ["omega"], gguf, training())
    text = text.replace(base.weights.sha256, "f" * 64)  # trained on other weights
    manifest = adapters.stage(store, text)
    store.activate(manifest.id, manifest.version)
    running = start_daemon(data, TINY)
    try:
        with running.client() as client:
            with pytest.raises(AdapterBaseMismatch) as info:
                client.chat(messages=ASK, max_tokens=4, task="omega")
            assert info.value.data["adapter"] == "omega.tiny-random"
            assert client.chat(messages=ASK, max_tokens=4, model=TINY)["model"] == TINY
    finally:
        running.stop()
