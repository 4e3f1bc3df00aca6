"""ONNX (int4, int8) against GGUF for the same model, in one run: which backend a laptop
user should pick.

    python -m outpost.tools.bench_onnx --config CFG [--models ID ...] [--prompts 10] [--threads 2]

Each model runs in a process of its own, one after another (nothing else runs beside
it), with the same prompts (weather questions, greedy), the same thread count, and the
same decode loop (models/decoder.py), so the backends differ only in their forward
pass. For each: load time (the constructor), memory after the run (the process's USS
beyond Python and the libraries, measured the same way for both), time to first token
(the prompt's prefill plus the first token's sampling: `prefill_ms` of the reply), and
decode tokens per second, with the tool grammar (constrained) and without it
(plain text). The first request is a warm-up and not counted.

Ratios hold on any machine; absolute times only on the machine in the report.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import psutil

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest, LoadOptions
from outpost.runtime.config import Settings

from .bench_door import CITIES, WEATHER


def _measure(model_id: str, config: str | None, prompts: int, threads: int, out: Any) -> None:
    from outpost.runtime.daemon.worker_process import load

    settings = Settings.load(Path(config) if config else None)
    store = ModelStore(settings.store_dir)
    manifest = Catalog.load(store, settings.manifest_dirs, settings.default_model).get(model_id)
    import onnxruntime  # noqa: F401  (both backends' libraries in memory before the baseline)
    import llama_cpp  # noqa: F401
    before = psutil.Process().memory_full_info().uss
    t0 = time.perf_counter()
    model = load(manifest, store, LoadOptions(n_threads=threads, n_gpu_layers=0))
    load_ms = (time.perf_counter() - t0) * 1e3
    result: dict[str, Any] = {"model": model_id, "backend": manifest.backend, "load_ms": round(load_ms, 1)}
    for mode, extra in (("constrained", {"tools": WEATHER, "tool_choice": "required"}), ("text", {})):
        ttft, rates = [], []
        for i in range(prompts + 1):
            messages = [{"role": "user", "content": f"What is the weather in {CITIES[i % len(CITIES)]}?"}]
            gen = model.generate(GenerationRequest(messages=messages, max_tokens=48, **extra))
            if i == 0:
                continue  # warm-up: the grammar compiled, the vocabulary built
            ttft.append(gen.prefill_ms)
            if gen.completion_tokens > 1 and gen.decode_ms > 0:
                rates.append(gen.completion_tokens / (gen.decode_ms / 1e3))
        result[mode] = {"ttft_ms_p50": round(statistics.median(ttft), 1),
                        "decode_tok_s_p50": round(statistics.median(rates), 1) if rates else None}
    result["memory_mib"] = round((psutil.Process().memory_full_info().uss - before) / 2**20, 1)
    result["files_mib"] = round(sum(f.size for f in manifest.files) / 2**20, 1)
    model.close()
    out.send(result)


def measure(model_id: str, config: str | None, prompts: int, threads: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(model_id, config, prompts, threads, send))
    proc.start()
    result = recv.recv()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m outpost.tools.bench_onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="config file (its data dir holds the models)")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "smollm2-135m-instruct-onnx-int4",
                                                    "smollm2-135m-instruct-onnx-int8"])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                              f"{psutil.virtual_memory().total / 2**30:.0f} GiB; threads {args.threads}",
                              "prompts": args.prompts, "models": []}
    for model_id in args.models:
        print(f"{model_id} ...", flush=True)
        report["models"].append(measure(model_id, args.config, args.prompts, args.threads))
    base = report["models"][0]
    for row in report["models"]:
        for mode in ("constrained", "text"):
            rate, ref = row[mode]["decode_tok_s_p50"], base[mode]["decode_tok_s_p50"]
            row[mode]["decode_vs_first"] = round(rate / ref, 2) if rate and ref else None
            row[mode]["ttft_vs_first"] = round(row[mode]["ttft_ms_p50"] / base[mode]["ttft_ms_p50"], 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
