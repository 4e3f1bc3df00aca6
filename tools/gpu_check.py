"""The GPU check: a GGUF model with llama.cpp's full offload and its ONNX conversion on
onnxruntime's CUDA provider, served by a real daemon under one budget.

    tools/gpu_check [--no-install] [--model ID] [--requests N] [--json]

`tools/gpu_check` (the shell script beside this module) installs the GPU builds into
`.gpu-venv` (llama-cpp-python compiled with CUDA, onnxruntime-gpu, NVML's bindings) and
runs this module there. It:

  1. pulls the catalog GGUF (default SmolLM2-135M) into a scratch data dir and converts it
     to ONNX int4 built for CUDA (`outpost models convert --target cuda`);
  2. starts `outpost serve` with `n_gpu_layers = "auto"` (the whole model when it fits
     the VRAM budget) and `[onnx] providers = ["CUDAExecutionProvider"]`;
  3. asks each model N free-text and N tool-call questions (after a warm-up), alternating
     nothing: one model at a time, so each figure is that model's alone;
  4. samples, every 50 ms throughout, the VRAM NVML reports for each of the daemon's
     processes and the PSS of them all.

It prints, per model: where it ran (`ps`: gpu / CUDA), decode tok/s and time to first
token (the replies' `timings_ms`), VRAM charged (what the pool planned: the manifest's
estimate) against VRAM measured (NVML, the worker's peak), and whether the budget held
(every sample's VRAM within `[budget] vram`, PSS within `[budget] ram`). Exit status 0
when both models ran on the GPU and the budget held, 1 otherwise, 2 without a GPU
(`--allow-cpu` runs the same steps on the CPU, to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.daemon import memory

from .bench_door import CITIES, WEATHER
from .convert_onnx import convert_in
from .serve_process import ServeProcess

DEFAULT_MODEL = "smollm2-135m-instruct"


class Watch:
    """Peak VRAM per process (NVML) and peak summed PSS of the daemon's tree."""

    def __init__(self, pid: int, gpus: memory.Gpus, period_s: float = 0.05) -> None:
        self.pid, self.gpus, self.period_s = pid, gpus, period_s
        self.vram_peak: dict[int, int] = {}
        self.vram_total_peak = 0
        self.pss_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        root = psutil.Process(self.pid)
        while not self._stop.wait(self.period_s):
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            vram = self.gpus.used_by({p.pid for p in procs})
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            for pid, used in vram.items():
                self.vram_peak[pid] = max(self.vram_peak.get(pid, 0), used)
            self.vram_total_peak = max(self.vram_total_peak, sum(vram.values()))
            self.pss_peak = max(self.pss_peak, pss)
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def prepare(data: Path, model_id: str, target: str) -> tuple[str, str]:
    """The GGUF pulled and its ONNX int4 conversion in `data`'s store: their ids."""
    store = ModelStore(data / "models")
    catalog = Catalog.load(store, [], model_id)
    entry = catalog.entry(model_id)
    if not store.is_pulled(entry.manifest):
        print(f"pulling {model_id} ...", file=sys.stderr, flush=True)
        store.pull(entry.manifest, entry.text)
    onnx_id = f"{model_id}-onnx-int4" + ("-cuda" if target == "cuda" else "")
    if not (store.manifests / f"{onnx_id}.toml").exists():
        print(f"converting {model_id} to ONNX int4 for {target} ...", file=sys.stderr, flush=True)
        convert_in(store, catalog, model_id, "int4", onnx_id, target=target)
    return model_id, onnx_id


def ask(client: Any, model: str, n: int) -> dict[str, Any]:
    """Tok/s and time to first token of n text and n tool-call answers (after a warm-up)."""
    out: dict[str, Any] = {}
    for mode, extra in (("text", {}), ("tool", {"tools": WEATHER, "tool_choice": "required"})):
        rates, ttft = [], []
        for i in range(n + 1):
            messages = [{"role": "user", "content": f"What is the weather in {CITIES[i % len(CITIES)]}?"}]
            reply = client.chat(messages, model=model, max_tokens=128, **extra)
            if i == 0:
                continue  # warm-up: loaded, grammar compiled, kernels chosen
            t = reply["outpost"]["timings_ms"]
            tokens = reply["usage"]["completion_tokens"]
            ttft.append(t["prefill"])
            if tokens > 1 and t["decode"] > 0:
                rates.append((tokens - 1) / (t["decode"] / 1e3))
        out[mode] = {"tok_s": round(statistics.median(rates), 1) if rates else None,
                     "ttft_ms": round(statistics.median(ttft), 2) if ttft else None}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    gpus = memory.Gpus()
    target = "cuda" if gpus.count else "cpu"
    data = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="outpost-gpu-check-"))
    (data / "manifests").mkdir(parents=True, exist_ok=True)
    models = prepare(data, args.model, target)
    ram = args.ram or "8GiB"
    cfg = (f'manifest_dirs = ["{data / "manifests"}"]\npreload = []\n'
           f'[budget]\nram = "{ram}"\n' + (f'vram = "{args.vram}"\n' if args.vram else "")
           + '[llama]\nn_gpu_layers = "auto"\n[onnx]\nproviders = ["CUDAExecutionProvider"]\n'
           + '[pool]\nidle_ttl_s = 600\n')
    results: dict[str, Any] = {"machine": platform.node(), "gpus": gpus.count, "target": target, "models": []}
    with ServeProcess(data, cfg, "gpu-check") as d, d.client(timeout_s=600) as c:
        budget = c.status()["budget"]
        watch = Watch(d.pid, gpus)
        try:
            for model in models:
                figures = ask(c, model, args.requests)
                loaded = {w["model"]: w for w in c.status()["loaded"]}
                w = loaded.get(model, {})
                results["models"].append({
                    "model": model, "backend": w.get("backend"), "runs_on": w.get("runs_on"),
                    "n_gpu_layers": w.get("n_gpu_layers"), **figures,
                    "vram_charged": int(Catalog.load(ModelStore(data / "models"), [], model).get(model).memory_estimate),
                    "vram_seen_by_pool": w.get("vram_bytes"),
                    "vram_measured_peak": watch.vram_peak.get(w.get("pid", -1), 0),
                    "ram_bytes": w.get("ram_bytes")})
        finally:
            watch.stop()
    vram_budget = sum(budget.get("vram_bytes") or [])
    results["budget"] = {"ram": budget["ram_bytes"], "vram": vram_budget,
                         "pss_peak": watch.pss_peak, "vram_peak": watch.vram_total_peak,
                         "samples": watch.samples,
                         "held": watch.pss_peak <= budget["ram_bytes"]
                         and (not vram_budget or watch.vram_total_peak <= vram_budget)}
    return results


def report(results: dict[str, Any]) -> str:
    mib = lambda v: f"{v / 2**20:.0f}" if v else "-"  # noqa: E731
    lines = [f"{results['machine']}: {results['gpus']} GPU(s), graphs built for {results['target']}",
             f"{'model':<40} {'runs on':<8} {'text tok/s':>10} {'tool tok/s':>10} {'TTFT ms':>8} "
             f"{'VRAM charged':>12} {'NVML peak':>10} {'RAM MiB':>8}"]
    for m in results["models"]:
        lines.append(f"{m['model']:<40} {m['runs_on'] or '?':<8} {m['text']['tok_s'] or 0:>10} "
                     f"{m['tool']['tok_s'] or 0:>10} {m['text']['ttft_ms'] or 0:>8} "
                     f"{mib(m['vram_charged']):>12} {mib(m['vram_measured_peak']):>10} {mib(m['ram_bytes']):>8}")
    b = results["budget"]
    lines.append(f"budget: RAM {mib(b['ram'])} MiB (PSS peak {mib(b['pss_peak'])}), VRAM {mib(b['vram'])} MiB "
                 f"(NVML peak {mib(b['vram_peak'])}), {b['samples']} samples: "
                 f"{'held' if b['held'] else 'EXCEEDED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"a catalog GGUF model (default {DEFAULT_MODEL})")
    ap.add_argument("--requests", type=int, default=5, help="answers per model and mode (default 5)")
    ap.add_argument("--ram", help="[budget] ram (default 8GiB)")
    ap.add_argument("--vram", help="[budget] vram per GPU (default: 80%% of what is free)")
    ap.add_argument("--data-dir", help="scratch data dir, kept (default: a new temporary one)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU")
    ap.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    args = ap.parse_args(argv)
    if not memory.Gpus().count and not args.allow_cpu:
        print("gpu_check: NVML sees no NVIDIA GPU here (use --allow-cpu to run the steps on the CPU)",
              file=sys.stderr)
        return 2
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    on_gpu = all(m["runs_on"] in ("gpu", "CUDA", "Tensorrt") for m in results["models"])
    return 0 if results["budget"]["held"] and (on_gpu or args.allow_cpu) else 1


if __name__ == "__main__":
    sys.exit(main())
