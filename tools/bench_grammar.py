"""Grammar-constrained decoding: xgrammar against no grammar and against llama.cpp's GBNF,
measured in one run, on one model, on the same prompts.

    python -m outpost.tools.bench_grammar [--model M] [--repeats N] [--max-tokens N]

For each schema (flat; nested with enums; nested arrays of objects with enums) and
each prompt, the assistant turn is started up to the arguments of a call
(`<tool_call>\\n{"name": "f", "arguments": `) and the arguments are decoded
greedily three ways, with the same decode loop:

  unconstrained   the model's own choice at each step
  xgrammar        Outpost's path: xgrammar's token bitmask, unpacked with numpy,
                  applied to the logits in place
  gbnf            llama.cpp's grammar sampler on the GBNF that llama-cpp-python
                  builds from the same schema (`LlamaGrammar.from_json_schema`)

It prints decode tokens/s per mode and schema with the ratios to unconstrained, and
the time to get a grammar ready for a request: xgrammar cold (compiled for this
vocabulary the first time) and cached (Outpost's per-worker LRU), and llama.cpp's
GBNF (converted and parsed on every request; it has no cache). Ratios carry over
between machines; absolute numbers describe only this one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from typing import Any

import llama_cpp
import numpy as np
import xgrammar as xgr
from llama_cpp._internals import LlamaTokenDataArray

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.models.grammar import GrammarCache, TokenMask
from outpost.models.llama import LlamaModel
from outpost.models.templates import TOOL_CALL_OPEN
from outpost.runtime.config import Settings

SCHEMAS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "flat": ("get_weather", {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"]}, [
        "What will the weather be in Paris for the next 3 days?",
        "Forecast for Tokyo, one day.",
    ]),
    "nested_enums": ("book_flight", {
        "type": "object", "properties": {
            "passenger": {"type": "object", "properties": {
                "name": {"type": "string"},
                "seat": {"enum": ["window", "aisle", "middle"]},
                "meal": {"enum": ["standard", "vegetarian", "vegan", "kosher", "halal"]}},
                "required": ["name", "seat", "meal"]},
            "route": {"type": "object", "properties": {
                "from": {"type": "string"}, "to": {"type": "string"},
                "class": {"enum": ["economy", "premium", "business", "first"]}},
                "required": ["from", "to", "class"]}},
        "required": ["passenger", "route"]}, [
        "Book Ana Silva a window seat in business class from Lisbon to Berlin, vegetarian meal.",
        "Economy flight for Tom Lee from Boston to Denver, aisle seat, standard meal.",
    ]),
    "arrays_of_objects": ("create_order", {
        "type": "object", "properties": {
            "customer": {"type": "string"},
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "quantity": {"type": "integer"},
                "size": {"enum": ["S", "M", "L", "XL"]},
                "color": {"enum": ["red", "green", "blue", "black", "white"]}},
                "required": ["sku", "quantity", "size", "color"]}},
            "shipping": {"enum": ["standard", "express", "overnight"]}},
        "required": ["customer", "items", "shipping"]}, [
        "Order for Maya: two red T-shirts size M (sku TS-1) and one black hoodie XL (sku HD-9), express.",
        "Ship 3 blue caps, size L, sku CP-3, to Omar by standard shipping.",
    ]),
}


class Decoder:
    """One greedy decode loop for every mode, so only the grammar differs."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.llama = model._llama  # a benchmark may reach into the backend
        self.n_vocab = model.n_vocab
        self.candidates = LlamaTokenDataArray(n_vocab=self.n_vocab)

    def prompt(self, name: str, schema: dict[str, Any], question: str) -> list[int]:
        tools = [{"type": "function", "function": {"name": name, "parameters": schema}}]
        text = self.model.template.render([{"role": "user", "content": question}], tools)
        text += f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": '
        return self.llama.tokenize(text.encode(), add_bos=True, special=True)

    def run(self, prompt: list[int], max_tokens: int, mask: TokenMask | None = None,
            sampler: Any = None) -> tuple[int, float]:
        """(tokens generated, seconds spent decoding them)."""
        self.model._eval_prompt(prompt)
        n, t0 = 0, time.perf_counter()
        for _ in range(max_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llama.ctx, -1),
                                           shape=(self.n_vocab,))
            if mask is not None:
                mask.apply(logits)
                tok = int(np.argmax(logits))
                if not mask.accept(tok) or mask.finished:
                    n += 1
                    break
            elif sampler is not None:
                self.candidates.copy_logits(logits)
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self.candidates.candidates))
                tok = int(np.argmax(self.candidates.candidates_data.logit))
                if not np.isfinite(self.candidates.candidates_data.logit[tok]):
                    break
                llama_cpp.llama_sampler_accept(sampler, tok)
            else:
                tok = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(self.model._vocab_ptr, tok):
                break
            n += 1
            self.llama.eval([tok])
        return n, time.perf_counter() - t0


def gbnf_sampler(model: LlamaModel, schema: dict[str, Any]) -> Any:
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    return llama_cpp.llama_sampler_init_grammar(model._vocab_ptr, grammar._grammar.encode(),
                                                grammar._root.encode())


# A benchmark script read top to bottom (set up, each decoder, report): kept whole.
def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m outpost.tools.bench_grammar",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a pulled manifest id")
    ap.add_argument("--repeats", type=int, default=3, help="passes over every prompt (default 3)")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    settings = Settings.load(None)
    store = ModelStore(settings.store_dir)
    manifest = Catalog.load(store, settings.manifest_dirs, settings.default_model).get(args.model)
    model = LlamaModel(manifest, store.weights_path(manifest),
                       vocab_cache=store.cache / f"vocab-{manifest.weights.sha256}.bin")
    decoder = Decoder(model)
    vocab = model.vocab  # read (or loaded) before any timing

    compile_ms: dict[str, dict[str, float]] = {}
    speed: dict[str, dict[str, list[float]]] = {}
    for label, (name, schema, questions) in SCHEMAS.items():
        tools = [{"type": "function", "function": {"name": name, "parameters": schema}}]
        cache = GrammarCache(vocab)  # a fresh worker's cache: the first compile is cold
        t = time.perf_counter()
        cache.compiled(tools, "required", False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        cache.compiled(tools, "required", False)
        cached = time.perf_counter() - t
        t = time.perf_counter()
        llama_cpp.llama_sampler_free(gbnf_sampler(model, schema))
        gbnf = time.perf_counter() - t
        compile_ms[label] = {"xgrammar_cold": cold * 1e3, "xgrammar_cached": cached * 1e3, "gbnf": gbnf * 1e3}

        compiler = xgr.GrammarCompiler(vocab.tokenizer_info())
        arguments = compiler.compile_json_schema(json.dumps(schema), max_whitespace_cnt=1)
        rates: dict[str, list[float]] = {"unconstrained": [], "xgrammar": [], "gbnf": []}
        for _ in range(args.repeats):
            for question in questions:
                prompt = decoder.prompt(name, schema, question)
                for mode in rates:
                    mask = TokenMask(arguments, model.n_vocab) if mode == "xgrammar" else None
                    sampler = gbnf_sampler(model, schema) if mode == "gbnf" else None
                    n, seconds = decoder.run(prompt, args.max_tokens, mask, sampler)
                    if sampler is not None:
                        llama_cpp.llama_sampler_free(sampler)
                    rates[mode].append(n / seconds)
        speed[label] = rates

    result: dict[str, Any] = {"model": manifest.id, "cpus": os.cpu_count(),
                              "n_threads": model._llama.n_threads, "schemas": {}}
    for label, rates in speed.items():
        med = {mode: statistics.median(r) for mode, r in rates.items()}
        result["schemas"][label] = {
            "tok_s": {mode: round(v, 1) for mode, v in med.items()},
            "xgrammar_over_unconstrained": round(med["xgrammar"] / med["unconstrained"], 3),
            "gbnf_over_unconstrained": round(med["gbnf"] / med["unconstrained"], 3),
            "xgrammar_over_gbnf": round(med["xgrammar"] / med["gbnf"], 2),
            "grammar_ready_ms": {k: round(v, 3) for k, v in compile_ms[label].items()},
        }
    print(json.dumps(result, indent=2))
    model.close()


if __name__ == "__main__":
    main()
