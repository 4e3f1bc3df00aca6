"""Acceptance: three real models, a budget that holds two, 200 mixed requests from four
concurrent clients. Every request succeeds, and the summed PSS of the daemon and all its
processes, sampled from outside at 20 Hz or more, never exceeds the budget."""

from __future__ import annotations

import random
import sqlite3

import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore

from .conftest import GEMMA, SMOLLM2, ServeProcess, link_models, make_data_dir
from .helpers.load import chat_load
from .helpers.pss_sampler import Sampler

pytestmark = pytest.mark.slow
SMOL_8K = "smollm2-135m-8k"
MODELS = [SMOLLM2, GEMMA, SMOL_8K]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


# One scenario, sampled throughout; kept whole so its failure report shows the whole run.
# n_parallel 4: each worker batches (a context's KV cache per slot, measured so), and the
# four clients' requests for one model decode together.
@pytest.mark.parametrize("n_parallel", [1, 4])
def test_200_mixed_requests_under_a_budget_that_holds_two_models(tmp_path, model_cache, gemma_cache, n_parallel):
    data = make_data_dir(tmp_path)
    link_models(data, model_cache, [SMOLLM2])
    link_models(data, gemma_cache, [GEMMA])
    # The third manifest: the same SmolLM2 file with a 4x longer context (4x the KV cache).
    text = (model_cache.manifests / f"{SMOLLM2}.toml").read_text()
    text = text.replace(f'id = "{SMOLLM2}"', f'id = "{SMOL_8K}"').replace(
        "context_length = 2048", "context_length = 8192")
    (data / "manifests" / f"{SMOL_8K}.toml").write_text(text)
    store = ModelStore(data / "models")  # same content: the pull only records the manifest
    store.pull(Catalog.load(store, [data / "manifests"], SMOLLM2).get(SMOL_8K), text)

    # Measure: the daemon alone, then each model's footprint (stored for the next daemon).
    dirs = f'manifest_dirs = ["{data / "manifests"}"]\npreload = []\n[llama]\nn_parallel = {n_parallel}\n'
    with ServeProcess(data, dirs + '[budget]\nram = "8GiB"\n', "calib") as d, d.client() as c:
        base = c.status()["budget"]["used_bytes"]
        for model in MODELS:
            c.chat([{"role": "user", "content": "hi"}], model=model, max_tokens=4)
        fp = {w["model"]: w["ram_bytes"] for w in c.status()["loaded"]}
    sizes = sorted(fp.values())
    budget = base + sizes[-1] + sizes[-2] + sizes[0] // 2 + (32 << 20)
    assert budget < base + sum(sizes)  # two fit, never three

    cfg = dirs + f'[budget]\nram = {budget}\n[pool]\nidle_ttl_s = 600\n'
    with ServeProcess(data, cfg, "run") as d:
        sampler = Sampler(d.pid, tmp_path / "pss.json")
        rngs = {seed: random.Random(seed) for seed in range(4)}
        plan = {seed: [rngs[seed].choice(MODELS) for _ in range(50)] for seed in range(4)}
        answered, failures = chat_load(d, 4, 50, lambda seed, i: plan[seed][i], TOOLS,
                                       tools_every=3, max_tokens=12)
        sampled = sampler.stop()
        with d.client() as c:
            evictions = c.status()["budget"]["evictions"]
    assert not failures, failures[:3]
    assert sum(answered.values()) == 200 and set(answered) == set(MODELS)
    assert sampled["rate_hz"] >= 20, sampled
    peak = sampled["peak"]
    print(f"\nbudget {budget / 2**20:.0f} MiB, peak PSS {peak / 2**20:.0f} MiB over "
          f"{sampled['samples']} samples at {sampled['rate_hz']:.1f} Hz, {evictions} evictions, "
          f"footprints {[(m, round(v / 2**20)) for m, v in fp.items()]} MiB, base {base / 2**20:.0f} MiB")
    assert peak <= budget, f"peak {peak} > budget {budget}; at the peak: {sampled['at']}"
    assert evictions > 10  # the budget really forced swaps
    conn = sqlite3.connect(data / "logs.db")
    assert conn.execute("select count(*) from requests where error_code is null").fetchone()[0] >= 200
    if n_parallel > 1:  # and requests really shared passes
        assert conn.execute("select max(batch_size) from attempts").fetchone()[0] > 1
    conn.close()
