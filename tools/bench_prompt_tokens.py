"""Prompt tokenization by turns (models/prompt_tokens.py) against llama.cpp tokenizing
the whole prompt, on the path of every request before its prefill.

    python -m outpost.tools.bench_prompt_tokens [--requests 60] [--store DIR]

For each catalog model pulled into the store (SmolLM2-135M, Gemma-3-270M): requests as
an agent sends them, the same system prompt and tools each time with a new question
(one tool, 5 and 20 copies of it: a longer tools block), and a conversation that
resends its earlier turns. Each prompt is tokenized whole and by turns (the cache warm
from the requests before, as in a worker); reported: prompt tokens, p50 of each, their
ratio, and whether every prompt got the same tokens both ways. Also the one-off cost of
finding the marks (kept on disk after the first load).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from outpost.manifests.catalog import Catalog
from outpost.manifests.errors import OutpostError
from outpost.manifests.store import ModelStore
from outpost.models.backend import GenerationRequest
from outpost.models.llama import LlamaModel

from .bench_specialise import REPO_STORE

REPO = Path(__file__).resolve().parent.parent
MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
SYSTEM = {"role": "system", "content": "You are the field agent's assistant. Answer briefly."}


def requests(n: int) -> dict[str, list[GenerationRequest]]:
    weather = json.loads((REPO / "examples" / "weather_tool.json").read_text())
    ask = [{"role": "user", "content": f"What is the weather in city {i}?"} for i in range(n)]
    out = {f"tools x{k}": [GenerationRequest(messages=[SYSTEM, a], tools=weather * k) for a in ask]
           for k in (1, 5, 20)}
    history, talk = [SYSTEM], []
    for i in range(n):
        history = [*history, ask[i]]
        talk.append(GenerationRequest(messages=history))
        history = [*history, {"role": "assistant", "content": f"It is sunny in city {i}, 21 degrees."}]
    out["a conversation"] = talk
    return out


def measure(model: LlamaModel, asks: list[GenerationRequest]) -> dict[str, Any]:
    whole, turns, same, n_tokens = [], [], 0, 0
    for request in asks:
        text = model.render(request).encode("utf-8")
        t0 = time.perf_counter()
        a = model._tokenize(text, bos=True, special=True)
        t1 = time.perf_counter()
        b = model.tokenize(text, prompt=True)
        t2 = time.perf_counter()
        whole.append((t1 - t0) * 1e3)
        turns.append((t2 - t1) * 1e3)
        same += a == b
        n_tokens = max(n_tokens, len(a))
    w, t = statistics.median(whole[5:]), statistics.median(turns[5:])  # the first ones fill the cache
    return {"prompt_tokens_max": n_tokens, "whole_ms_p50": round(w, 3), "by_turns_ms_p50": round(t, 3),
            "by_turns_over_whole": round(t / w, 3), "same_tokens": f"{same}/{len(asks)}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--requests", type=int, default=60, help="requests per kind (default 60)")
    ap.add_argument("--store", type=Path, default=REPO_STORE, help="where the models are pulled already")
    args = ap.parse_args(argv)
    store = ModelStore(args.store)
    report: dict[str, Any] = {"machine": f"{platform.machine()}, one thread (tokenization is single-threaded)"}
    for model_id in MODELS:
        try:
            manifest = Catalog.load(store, [], model_id).get(model_id)
            path = store.weights_path(manifest)
        except (OutpostError, OSError) as exc:
            report[model_id] = f"skipped: {exc}"
            continue
        model = LlamaModel(manifest, path, n_slots=1)
        try:
            t0 = time.perf_counter()
            marks = model._find_marks()
            row: dict[str, Any] = {"marks": [m.decode() for m in marks],
                                   "finding_marks_ms": round((time.perf_counter() - t0) * 1e3, 1)}
            for kind, asks in requests(args.requests).items():
                row[kind] = measure(model, asks)
            report[model_id] = row
        finally:
            model.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
