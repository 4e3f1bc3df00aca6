"""What a model swap costs, against loading the same GGUF directly, measured in one run.

    python -m outpost.tools.bench_swap [--models A B] [--rounds N]

1. Baselines, for each model, in fresh Python processes:
   - direct load: import llama_cpp and construct `llama_cpp.Llama` on the file; the
     constructor's time (the whole process, interpreter start and import included,
     is printed beside it);
   - direct swap: a process holding the other model (after one generation) closes it
     and constructs `llama_cpp.Llama` on this one; the time of both, which is the
     same work as a swap (free one model, load another) minus the process boundary.
2. Outpost: an `outpost serve` process whose budget holds one of the models at a time.
   Alternating requests (A, B, A, B, ...) each need a swap: evict one, load the other.
   Then repeated requests to one model hit it warm.

It prints p50/p95 request latency for swap and warm requests, and the swap cost (the
`load` part of the reply's timings: eviction, fork, verification, load) as a ratio to
the direct load. Both models must be pulled into the configured data dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.config import Settings
from outpost.runtime.logs.stats import percentile

from .serve_process import ServeProcess

DIRECT = """
import sys, time
t0 = time.perf_counter()
import llama_cpp
t1 = time.perf_counter()
llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


DIRECT_SWAP = """
import gc, sys, time
import llama_cpp
old = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
old.eval(old.tokenize(b"Say hi."))
t0 = time.perf_counter()
old.close()
del old
gc.collect()
llama_cpp.Llama(model_path=sys.argv[3], n_ctx=int(sys.argv[4]), verbose=False)
print(time.perf_counter() - t0)
"""



def direct_load(path: Path, n_ctx: int, rounds: int) -> dict[str, float]:
    loads, wall = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", DIRECT, str(path), str(n_ctx)],
                             capture_output=True, text=True, check=True)
        wall.append(time.perf_counter() - t)
        loads.append(float(out.stdout.split()[1]))
    return {"load_ms": statistics.median(loads) * 1e3, "process_ms": statistics.median(wall) * 1e3}


def direct_swap(old: Path, old_ctx: int, new: Path, new_ctx: int, rounds: int) -> float:
    times = [float(subprocess.run([sys.executable, "-c", DIRECT_SWAP, str(old), str(old_ctx),
                                   str(new), str(new_ctx)],
                                  capture_output=True, text=True, check=True).stdout)
             for _ in range(rounds)]
    return statistics.median(times) * 1e3


# A benchmark script read top to bottom (calibrate, baseline, swaps, report): kept whole.
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs=2, default=["smollm2-135m-instruct", "gemma-3-270m"])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    settings = Settings.load(None)
    store = ModelStore(settings.store_dir)
    catalog = Catalog.load(store, settings.manifest_dirs, settings.default_model)
    manifests = [catalog.get(m) for m in args.models]
    rounds = max(3, args.rounds // 2)
    baseline = {m.id: direct_load(store.weights_path(m), m.context_length, rounds) for m in manifests}
    for m, other in zip(manifests, reversed(manifests)):
        baseline[m.id]["swap_ms"] = direct_swap(store.weights_path(other), other.context_length,
                                                store.weights_path(m), m.context_length, rounds)

    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        data = Path(tmp)
        bench = ModelStore(data / "models")  # the user's blobs, linked: no copies
        for d in (bench.blobs, bench.manifests):
            d.mkdir(parents=True)
        for m in manifests:
            for f in m.files:
                os.link(store.blob_path(f.sha256), bench.blob_path(f.sha256))
            bench.manifests.joinpath(f"{m.id}.toml").write_text(catalog.entry(m.id).text)
        hi = [{"role": "user", "content": "Say hi."}]
        # Measure footprints with room for both, then allow one model at a time.
        with ServeProcess(data, 'preload = []\n[budget]\nram = "8GiB"\n', "calibrate") as d, \
                d.client() as c:
            base = c.status()["budget"]["used_bytes"]
            for m in manifests:
                c.chat(hi, model=m.id, max_tokens=4)
            footprint = {w["model"]: w["ram_bytes"] for w in c.status()["loaded"]}
        budget = base + max(footprint.values()) + min(footprint.values()) // 2 + (32 << 20)
        swap_total, swap_load, warm_total = [], {m.id: [] for m in manifests}, []
        with ServeProcess(data, f"preload = []\n[budget]\nram = {budget}\n", "bench") as d, \
                d.client() as c:
            for i in range(2 * args.rounds + 1):
                m = manifests[i % 2]
                reply = c.chat(hi, model=m.id, max_tokens=4)
                if i == 0:
                    continue  # the first load has nothing to evict
                t = reply["outpost"]["timings_ms"]
                swap_total.append(t["total"])
                swap_load[m.id].append(t["load"])
            for _ in range(2 * args.rounds):
                warm_total.append(c.chat(hi, model=manifests[0].id, max_tokens=4)
                                  ["outpost"]["timings_ms"]["total"])
            evictions = c.status()["budget"]["evictions"]

    result = {
        "machine": f"{os.cpu_count()} CPUs, no GPU offload" if not settings.budget.vram else "",
        "budget_mib": round(budget / 2**20), "evictions": evictions,
        "request_ms": {"swap_p50": round(percentile(swap_total, 0.5), 1),
                       "swap_p95": round(percentile(swap_total, 0.95), 1),
                       "warm_p50": round(percentile(warm_total, 0.5), 1),
                       "warm_p95": round(percentile(warm_total, 0.95), 1)},
        "models": {},
    }
    for m in manifests:
        swap_ms = statistics.median(swap_load[m.id])
        base_ms = baseline[m.id]
        result["models"][m.id] = {
            "swap_ms_p50": round(swap_ms, 1), "direct_load_ms": round(base_ms["load_ms"], 1),
            "direct_process_ms": round(base_ms["process_ms"], 1),
            "direct_swap_ms": round(base_ms["swap_ms"], 1),
            "swap_over_direct_load": round(swap_ms / base_ms["load_ms"], 2),
            "swap_over_direct_swap": round(swap_ms / base_ms["swap_ms"], 2),
            "swap_over_direct_process": round(swap_ms / base_ms["process_ms"], 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
