"""The ONNX backend on a real model: SmolLM2-135M converted from its catalog GGUF (int8,
once per machine, by the converter's own code) tokenizes and stops as llama.cpp does,
and swaps with the GGUF under one budget that its PSS, sampled from outside, never
exceeds; its int4 conversion computes with the GGUF's own weights."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the `onnx` extra")
pytest.importorskip("onnxruntime_genai", reason="the `convert` extra")

from outpost.manifests.catalog import Catalog
from outpost.models.backend import GenerationRequest
from outpost.models.llama import LlamaModel
from outpost.models.onnx import OnnxModel

from .conftest import SMOLLM2, ServeProcess, cached_onnx, link_models, make_data_dir
from .helpers.load import chat_load
from .helpers.pss_sampler import Sampler
from .test_budget_acceptance import TOOLS

pytestmark = pytest.mark.slow

TEXTS = ["The weather in Paris, 21°C — naïve café ☕ 東京 🚀",
         '{"name": "get_weather", "arguments": {"city": "São Paulo", "n": [1, 2.5e-3]}}',
         "def f(x):\n\treturn x**2  # tabs, newlines\r\n   and spaces   ",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"]


@pytest.fixture(scope="module")
def onnx_id(model_cache) -> str:
    return cached_onnx("int8")


def test_the_tokenizer_and_stop_tokens_are_llama_cpps(onnx_id, model_cache):
    catalog = Catalog.load(model_cache, [], SMOLLM2)
    gguf, onnx = catalog.get(SMOLLM2), catalog.get(onnx_id)
    a = LlamaModel(gguf, model_cache.weights_path(gguf), n_threads=1)
    b = OnnxModel(onnx, model_cache.folder(onnx), n_threads=1)
    try:
        for text in [*TEXTS, a.render(GenerationRequest(messages=[{"role": "user", "content": TEXTS[0]}],
                                                        tools=TOOLS))]:
            data = text.encode()
            for prompt in (True, False):
                assert b.tokenize(data, prompt=prompt) == a.tokenize(data, prompt=prompt), (text, prompt)
        assert b.vocab.size == a.vocab.size
        differ = [t for t, (x, y) in enumerate(zip(a.vocab.pieces, b.vocab.pieces, strict=True)) if x != y]
        assert not differ, [(t, a.vocab.pieces[t], b.vocab.pieces[t]) for t in differ[:5]]
        # The converter wrote llama.cpp's end-of-generation set into generation_config.json.
        assert sorted(b.vocab.stop_ids) == sorted(a.vocab.stop_ids)
    finally:
        a.close()
        b.close()


def test_int4_computes_with_the_ggufs_own_weights(model_cache):
    """The int4 graph carries the GGUF's Q4_1/Q8_0 blocks (gguf_blocks.py): its logits
    stay close to llama.cpp's on the same tokens: the largest difference was 0.55-1.05
    over these prefixes here, and the top choice always agreed. The builder's own int4
    (the dequantized weights quantized again) was ~8 off on a similar prompt, the top
    choice agreeing on 7 of 9. What is left is the kernels of the two runtimes, both
    quantizing activations to 8 bits."""
    onnx_id = cached_onnx("int4")
    catalog = Catalog.load(model_cache, [], SMOLLM2)
    gguf, onnx = catalog.get(SMOLLM2), catalog.get(onnx_id)
    assert "the GGUF's own blocks in 151 of 151" in onnx.description
    a = LlamaModel(gguf, model_cache.weights_path(gguf), n_threads=2)
    b = OnnxModel(onnx, model_cache.folder(onnx), n_threads=2)
    try:
        tokens = a.tokenize(a.render(GenerationRequest(
            messages=[{"role": "user", "content": "What is the weather in Paris? Call the tool, in celsius."}],
            tools=TOOLS)).encode(), prompt=True)
        diffs, agree, done = [], 0, 0
        for end in range(len(tokens) - 40, len(tokens) + 1, 5):
            a._eval(tokens[done:end])
            b._eval(tokens[done:end])
            done = end
            x, y = a._logits(), b._logits()
            diffs.append(float(np.abs(x - y).max()))
            agree += int(x.argmax() == y.argmax())
        assert np.median(diffs) < 2.0, diffs
        assert agree >= len(diffs) - 1, (agree, len(diffs))
    finally:
        a.close()
        b.close()


# One scenario, sampled throughout; kept whole so its failure report shows the whole run.
def test_onnx_and_gguf_swap_under_one_budget(tmp_path, onnx_id, model_cache):
    data = make_data_dir(tmp_path)
    link_models(data, model_cache, [SMOLLM2, onnx_id])
    models = [SMOLLM2, onnx_id]
    dirs = f'manifest_dirs = ["{data / "manifests"}"]\npreload = []\n'
    with ServeProcess(data, dirs + '[budget]\nram = "8GiB"\n', "calib") as d, d.client() as c:
        base = c.status()["budget"]["used_bytes"]
        for model in models:
            c.chat([{"role": "user", "content": "hi"}], model=model, max_tokens=4)
        loaded = {w["model"]: w for w in c.status()["loaded"]}
    fp = {m: w["ram_bytes"] for m, w in loaded.items()}
    assert {(m, w["backend"], w["runs_on"]) for m, w in loaded.items()} == {
        (SMOLLM2, "gguf", "cpu"), (onnx_id, "onnx", "CPU")}
    # One at a time (both never fit), with room for a footprint to grow past its
    # calibration (the ONNX session's arena grows with tool prompts: +43 MiB seen on CI).
    budget = base + max(fp.values()) + min(fp.values()) * 3 // 4
    cfg = dirs + f'[budget]\nram = {budget}\n[pool]\nidle_ttl_s = 600\n'
    with ServeProcess(data, cfg, "run") as d:
        sampler = Sampler(d.pid, tmp_path / "pss.json")
        answered, failures = chat_load(d, 2, 12, lambda seed, i: models[(i + seed) % 2], TOOLS,
                                       tools_every=2, max_tokens=40, valid=True)
        sampled = sampler.stop()
        with d.client() as c:
            evictions = c.status()["budget"]["evictions"]
    assert not failures, failures[:3]
    assert answered == {m: 12 for m in models}
    assert sampled["rate_hz"] >= 20, sampled
    print(f"\nbudget {budget / 2**20:.0f} MiB, peak PSS {sampled['peak'] / 2**20:.0f} MiB over "
          f"{sampled['samples']} samples at {sampled['rate_hz']:.1f} Hz, {evictions} evictions, "
          f"footprints {[(m, round(v / 2**20)) for m, v in fp.items()]} MiB, base {base / 2**20:.0f} MiB")
    assert sampled["peak"] <= budget, f"peak {sampled['peak']} > budget {budget}; at the peak: {sampled['at']}"
    assert evictions >= 4  # the budget really forced swaps between the backends
    conn = sqlite3.connect(data / "logs.db")
    served = dict(conn.execute("select model, count(*) from requests where error_code is null group by model"))
    conn.close()
    assert served == {m: 12 + 1 for m in models}  # and the calibration's one each
