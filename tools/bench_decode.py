"""Decode speed with and without the xgrammar mask, measured in one run on one model.

    python -m outpost.tools.bench_decode [--model-path GGUF] [--repeats N]

Each prompt is answered twice with greedy decoding: unconstrained (plain chat, no
tools) and constrained (the same conversation with tools, tool_choice "required").
It prints decode tokens/s for both and their ratio; the ratio is what transfers
between machines, the absolute numbers only describe this one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest
from outpost.models.llama import LlamaModel
from outpost.models.templates import tools_system_prompt
from outpost.runtime.config import Settings

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
            "required": ["to", "subject", "body"]}}},
]
PROMPTS = [
    "What is the weather in Paris?",
    "Email alice@example.com that the meeting moved to 3pm, subject 'meeting'.",
    "How warm is it in Tokyo in fahrenheit?",
    "Send bob@example.com a note saying thanks for the report.",
]


def tokens_per_s(model: LlamaModel, request: GenerationRequest) -> tuple[float, int]:
    gen = model.generate(request)
    return gen.completion_tokens / (gen.decode_ms / 1e3), gen.completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a pulled manifest id")
    ap.add_argument("--model-path", type=Path, help="use this GGUF instead of the store's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    settings = Settings.load(None)
    store = ModelStore(settings.store_dir)
    manifest = Catalog.load(store, settings.manifest_dirs, settings.default_model).get(args.model)
    model = LlamaModel(manifest, args.model_path or store.weights_path(manifest))
    free, constrained = [], []
    for _ in range(args.repeats):
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            # The same prompt text both ways (the tools block written in by hand for the
            # unconstrained run), so only the mask differs.
            listed = [{"role": "system", "content": tools_system_prompt(TOOLS)}, *messages]
            free.append(tokens_per_s(model, GenerationRequest(
                listed, None, max_tokens=args.max_tokens)))
            constrained.append(tokens_per_s(model, GenerationRequest(
                messages, TOOLS, tool_choice="required", max_tokens=args.max_tokens,
                parallel_tool_calls=False)))
    cold = model.grammars.stats()
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "model": manifest.id,
        "unconstrained_tok_s": round(statistics.median(r for r, _ in free), 1),
        "constrained_tok_s": round(statistics.median(r for r, _ in constrained), 1),
        "tokens": {"unconstrained": sum(n for _, n in free), "constrained": sum(n for _, n in constrained)},
        "grammar_cache": cold,
    }
    result["ratio_constrained_over_unconstrained"] = round(
        result["constrained_tok_s"] / result["unconstrained_tok_s"], 3)
    print(json.dumps(result, indent=2))
    model.close()


if __name__ == "__main__":
    main()
