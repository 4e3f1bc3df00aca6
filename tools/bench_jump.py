"""Jump-forward decoding (models/decoder.py, `Decoder._ahead`): what it saves on tool
calls, and whether it changes them, in one run on one model.

    python -m outpost.tools.bench_jump [--calls 40] [--threads 2] [--max-tokens 96]

SmolLM2-135M (the repository's cached store) answers the same weather questions
(`tool_choice` required, greedy) with text the grammar forces taken in one forward
pass and, as the baseline, sampled token by token; the two take turns question by
question. Reported per mode: forward passes and completion tokens per call, decode
time per call (p50), and the ratio; then how many of the calls came out identical
(same name and arguments) and how many were valid. Ratios carry over between
machines; absolute times describe only this one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

import psutil

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest
from outpost.models.llama import LlamaModel

from .bench_door import MODEL, WEATHER, questions
from .bench_specialise import REPO_STORE


def one(model: LlamaModel, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    seq = model.start(GenerationRequest(messages=messages, tools=WEATHER, tool_choice="required",
                                        max_tokens=max_tokens, temperature=0.0))
    seq.slot, passes = 0, 0
    for tokens in seq.steps:
        model._eval(tokens, 0)
        passes += 1
    gen = seq.result
    assert gen is not None
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in gen.tool_calls]
    return {"passes": passes - 1, "tokens": gen.completion_tokens, "decode_ms": gen.decode_ms,
            "calls": calls, "valid": all(v["valid"] for v in gen.validation) and bool(calls)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=40, help="questions, each asked both ways (default 40)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    ap.add_argument("--max-tokens", type=int, default=96, help="per call (default 96)")
    args = ap.parse_args(argv)

    store = ModelStore(REPO_STORE)
    manifest = Catalog.load(store, [], MODEL).get(MODEL)
    model = LlamaModel(manifest, store.weights_path(manifest), n_threads=args.threads)
    rows: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    asks = questions(args.calls)
    model.jump_forward = True
    one(model, asks[0], args.max_tokens)  # warm: the grammar compiled
    for i, messages in enumerate(asks):
        for jump in ((True, False) if i % 2 == 0 else (False, True)):
            model.jump_forward = jump
            rows[jump].append(one(model, messages, args.max_tokens))
    model.close()

    def summary(r: list[dict[str, Any]]) -> dict[str, Any]:
        return {"passes_per_call": statistics.mean(x["passes"] for x in r),
                "tokens_per_call": statistics.mean(x["tokens"] for x in r),
                "decode_ms_p50": statistics.median(x["decode_ms"] for x in r),
                "valid": sum(x["valid"] for x in r)}

    on, off = summary(rows[True]), summary(rows[False])
    report = {
        "machine": f"{platform.machine()}, {psutil.cpu_count(logical=False)} cores, llama.cpp threads {args.threads}",
        "calls": len(asks), "jump_forward": on, "token_by_token": off,
        "decode_time_ratio_p50": on["decode_ms_p50"] / off["decode_ms_p50"],
        "identical_calls": sum(a["calls"] == b["calls"] for a, b in zip(rows[True], rows[False], strict=True)),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
