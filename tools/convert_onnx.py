"""`outpost models convert ID --to onnx [--quant int4|int8|fp32]`: an ONNX model made
from a catalog GGUF model, into the store with its manifest.

    the GGUF (the store's, verified)
      -> transformers, dequantized: an fp32 folder with the tokenizer (hf_folder.py, cached)
      -> onnxruntime-genai's model builder, in a subprocess: model.onnx, model.onnx.data
         (weights 4- or 8-bit block-quantized, MatMulNBits; GroupQueryAttention with its
         KV cache as inputs and outputs), the tokenizer files
      -> int4 for the CPU: the GGUF's own Q4_0/Q4_1/Q8_0 blocks put back into those
         MatMulNBits nodes (gguf_blocks.py), so the weights are not quantized twice
      -> each file hashed and adopted into the store; a manifest (backend "onnx") staged
         and made active: `outpost call --model ID-onnx-int4` serves it, sync publishes it

Why the builder rather than optimum's exporter: in a trial here its graphs were 2-4x
faster and smaller, and optimum-onnx pins transformers below 4.58 where training needs
5.x. The builder runs as a script in its own process (its `onnxruntime_genai` package's
native library is never loaded) with this environment's transformers and torch; its
imports and its memory leave with it. All of this is the `convert` extra: a serving
device installs `onnx` (onnxruntime, tokenizers) and never an exporter.

What this module must not do: serve, or touch a running daemon (the store is shared on
disk; a daemon sees the new model on its next catalog read).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import BadRequest, OutpostError
from outpost.manifests.schema import MANIFEST_ID, Manifest
from outpost.manifests.store import ModelStore
from outpost.runtime.config import Settings

from .gguf_blocks import Carried, carry

log = logging.getLogger("outpost.convert")

QUANTS = ("int4", "int8", "fp32")
# The execution provider a graph is built for. `cuda`: fp16 activations and KV cache,
# with the attention op onnxruntime's CUDA kernels take (its CPU graph's fp32 attention
# would fall back to the CPU there); `cpu`: fp32, for laptops and CI.
TARGETS = ("cpu", "cuda")
# The builder's quantizer settings per --quant (its `--extra_options`). int4: k-quant,
# with the language-model head (the largest, most output-sensitive MatMul) at 8 bits.
# Tried on SmolLM2-135M, BFCL simple_python (first 100; GGUF Q4_1: 54% AST; int8: 55%):
# builder defaults (RTN, symmetric, block 32) 43%; accuracy_level=1 46% and 35%
# slower; asymmetric without shared embeddings 43%, with them a graph onnxruntime 1.32
# refuses; k_quant_last 50% (102 MiB, the fastest); k_quant_mixed 49% (112 MiB);
# k_quant_last with accuracy_level=1 over 4x slower (stopped unfinished); k_quant_last
# with block_size=16 48% (120 MiB, 27% slower). Whatever gguf_blocks.py can carry over
# exactly replaces these weights afterwards (all of SmolLM2's); they remain for the rest
# (K-quants, a Hugging Face folder's fp32 weights) and for --target cuda.
QUANT_OPTIONS: dict[str, list[str]] = {"int4": ["algo_config=k_quant_last"]}
# What the builder writes that the backend reads; genai_config.json is kept too, so the
# folder also runs under onnxruntime-genai (a user's choice, not Outpost's).
KEEP = ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "generation_config.json", "special_tokens_map.json", "genai_config.json")
# onnxruntime's arena and the graph's intermediate tensors beyond the weights and the KV
# cache, for a 100-300M model at batch 1 (seen: SmolLM2-135M int4, 512-token prompts).
RUNTIME_OVERHEAD = 96 << 20


class ConversionFailed(OutpostError):
    """The exporter could not make the model (its stderr's tail is in the message);
    nothing was written to the store."""

    code = "conversion_failed"


@dataclass(frozen=True)
class Converted:
    manifest: Manifest
    text: str
    seconds: float
    size: int  # bytes of all its files


def builder_script() -> Path:
    """onnxruntime-genai's builder.py, found without importing the package (its native
    library is not needed to build, and not loaded)."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        raise BadRequest("`outpost models convert` needs the `convert` extra: "
                         "pip install 'outpost[convert]'", field="to")
    script = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    if not script.is_file():
        raise BadRequest(f"onnxruntime-genai has no model builder at {script}", field="to")
    return script


def build(hf: Path, out: Path, quant: str, threads: int | None = None, target: str = "cpu") -> None:
    """Run the builder on a transformers folder; ConversionFailed with its stderr's tail."""
    cmd = [sys.executable, str(builder_script()), "-i", str(hf), "-o", str(out), "-p", quant,
           "-e", target, "-c", str(out.parent / "builder-cache"),
           # Logits for the last position only: a prompt's prefill does not pay the
           # vocabulary-wide projection for every token. Windowed KV caches (Gemma 3's
           # sliding layers) would need pre-sized buffers; the backend feeds plain ones.
           "--extra_options", "prune_lm_head=true", "windowed_kv_cache=false", *QUANT_OPTIONS.get(quant, [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise ConversionFailed(f"the model builder failed (exit {proc.returncode}):\n{tail}",
                               exit_code=proc.returncode)


def kv_bytes(hf: Path, context_length: int, target: str = "cpu") -> int:
    """The KV cache at the full context (fp32 on the CPU, fp16 on CUDA), from the config."""
    cfg = json.loads((hf / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * context_length * (2 if target == "cuda" else 4)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def eog_ids(gguf: Path) -> list[int]:
    """The tokens llama.cpp ends a generation on for this GGUF (its end-of-generation
    set: EOS, EOT and the end-of-turn tokens it recognises by name)."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llama.close()


def write_stops(path: Path, stops: list[int]) -> None:
    """Make `eos_token_id` in generation_config.json the GGUF's whole end-of-generation
    set, so the ONNX model stops where the GGUF does (the tokenizer's own files name
    fewer: SmolLM2's leave out one that llama.cpp stops on)."""
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    eos = config.get("eos_token_id")
    named = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    config["eos_token_id"] = sorted({*named, *stops})
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def manifest_text(base: Manifest, model_id: str, quant: str, files: list[Path], kv: int,
                  store: ModelStore, target: str = "cpu", carried: Carried | None = None) -> str:
    import tomli_w

    entries = []
    for path in files:
        sha = _sha256(path)
        entries.append({"name": path.name, "size": path.stat().st_size, "sha256": sha,
                        # Where it lives once adopted; a hub that publishes it adds its own URL.
                        "sources": [{"kind": "path", "path": str(store.blob_path(sha))}]})
    doc: dict[str, Any] = {
        "id": model_id, "version": base.version,
        "description": f"{base.id} {base.version} converted to ONNX ({quant}, for {target}) by "
                       f"onnxruntime-genai's model builder from GGUF {base.weights.sha256[:12]}"
                       + (f", the GGUF's own blocks in {carried.exact} of {carried.exact + carried.kept} "
                          "MatMulNBits nodes" if carried else ""),
        "tasks": list(base.tasks), "backend": "onnx", "chat_template": base.chat_template,
        "context_length": base.context_length, "sampling": base.sampling.model_dump(),
        "memory_estimate": sum(e["size"] for e in entries) + kv + RUNTIME_OVERHEAD,
        "smoke_test": base.smoke_test.model_dump(), "files": entries,
    }
    if base.escalation_threshold is not None:
        doc["escalation_threshold"] = base.escalation_threshold
    if base.decision is not None:
        # The GGUF's rule for tool_choice auto reads logits this graph computes nearly as it
        # did (fp32 alike, int4/int8 within about a logit): a start, which `outpost models
        # calibrate` on the converted model's own traffic refines.
        doc["decision"] = base.decision.model_copy(update={
            "fitted_on": f"the rule of {base.id} {base.version} (GGUF), carried over: {base.decision.fitted_on}",
            "auroc": None}).model_dump(exclude_none=True)
    text = tomli_w.dumps(doc)
    Manifest.from_toml(text, f"converted {model_id}")  # what we write must read back
    return text


def convert(settings: Settings, model_id: str, quant: str = "int4", new_id: str | None = None,
            threads: int | None = None, target: str = "cpu") -> Converted:
    """Convert the configured catalog's `model_id` into the configured store."""
    store = ModelStore(settings.store_dir)
    catalog = Catalog.load(store, settings.manifest_dirs, settings.default_model)
    return convert_in(store, catalog, model_id, quant, new_id, threads, target)


def convert_in(store: ModelStore, catalog: Catalog, model_id: str, quant: str = "int4",
               new_id: str | None = None, threads: int | None = None, target: str = "cpu") -> Converted:
    from .hf_folder import hf_folder

    if quant not in QUANTS:
        raise BadRequest(f"--quant must be one of {', '.join(QUANTS)}", field="quant")
    if target not in TARGETS:
        raise BadRequest(f"--target must be one of {', '.join(TARGETS)}", field="target")
    base = catalog.get(model_id)
    if base.backend != "gguf" or base.adapter is not None:
        raise BadRequest(f"{model_id} is not a GGUF base model (backend {base.backend}"
                         f"{', a task adapter' if base.adapter else ''}): only those convert", field="model")
    new_id = new_id or f"{model_id}-onnx-{quant}" + ("-cuda" if target == "cuda" else "")
    if not re.match(MANIFEST_ID, new_id):
        raise BadRequest(f"{new_id!r} is not a valid model id", field="id")
    t0 = time.perf_counter()
    store.weights_path(base)  # ModelNotPulled before any work
    gguf = store.ensure_verified(base.weights)
    hf = hf_folder(gguf, base.weights.sha256, store.cache)
    store.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.tmp, prefix="convert-") as tmp:
        out = Path(tmp) / "onnx"
        build(hf, out, quant, threads, target)
        carried = carry(gguf, hf, out) if quant == "int4" and target == "cpu" else None
        for name in ("generation_config.json", "chat_template.jinja"):  # if the builder left them out
            if not (out / name).exists() and (hf / name).exists():
                (out / name).write_bytes((hf / name).read_bytes())
        write_stops(out / "generation_config.json", eog_ids(gguf))
        files = [out / name for name in KEEP if (out / name).is_file()]
        text = manifest_text(base, new_id, quant, files, kv_bytes(hf, base.context_length, target), store, target,
                             carried)
        manifest = Manifest.from_toml(text, f"converted {new_id}")
        for path, mf in zip(files, manifest.files, strict=True):
            store.adopt(path, mf, mf.sha256)  # renamed in: the temp dir is on the store's disk
        store.pull(manifest, text)  # every file is here: records and activates the version
    return Converted(manifest=manifest, text=text, seconds=time.perf_counter() - t0,
                     size=sum(f.size for f in manifest.files))


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             client: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert", parents=[common, as_json], help="make an ONNX model from a GGUF one (the convert extra)",
        description="Convert a pulled GGUF model to ONNX: transformers dequantizes it, onnxruntime-genai's "
        "model builder writes the graph with 4- or 8-bit weights, and the result goes into the store with "
        "its manifest (docs/onnx.md). Minutes for a 100-300M model on a laptop CPU.")
    p.add_argument("model", help="the GGUF model's id (pulled)")
    p.add_argument("--to", choices=["onnx"], default="onnx", help="the format (only onnx)")
    p.add_argument("--quant", choices=QUANTS, default="int4",
                   help="weights: int4 (MatMulNBits, block 32: the GGUF's own Q4_0/Q4_1/Q8_0 blocks "
                        "where it has them, else k-quant with the head at 8 bits; the default), int8, or fp32")
    p.add_argument("--target", choices=TARGETS, default="cpu",
                   help="the execution provider the graph is built for: cpu (fp32 activations; the "
                        "default) or cuda (fp16; onnxruntime-gpu's CUDA or TensorRT provider)")
    p.add_argument("--id", dest="new_id", default=None,
                   help="the new model's id (default ID-onnx-QUANT, with -cuda for --target cuda)")
    p.add_argument("--threads", type=int, default=None, help="threads for the export (default all)")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace, settings: Settings) -> int:
    from outpost.runtime import cli_format as fmt

    print(f"converting {args.model} to ONNX ({args.quant}); this takes minutes ...", file=sys.stderr, flush=True)
    done = convert(settings, args.model, args.quant, args.new_id, args.threads, args.target)
    if args.json:
        fmt.print_json({"id": done.manifest.id, "version": done.manifest.version, "backend": "onnx",
                        "quant": args.quant, "target": args.target, "bytes": done.size, "seconds": round(done.seconds, 1),
                        "files": [f.name for f in done.manifest.files]})
    else:
        print(f"{done.manifest.id} {done.manifest.version}: {done.size / 2**20:.0f} MiB in "
              f"{len(done.manifest.files)} files, {done.seconds:.0f} s; try: "
              f"outpost call --model {done.manifest.id} \"hello\"")
    return 0
