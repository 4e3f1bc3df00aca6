"""The batching engine alone: models/batching.py on SmolLM2-135M's file, no daemon.

    python -m outpost.tools.bench_engine GGUF [--slots 1,2,4,8,16] [--requests 8]
                                              [--threads 1] [--n-gpu-layers auto] [--out FILE]

For each number of slots N, one LlamaModel with N slots and a Batch kept full from a
queue of N x `--requests` chats (a weather tool call with `tool_choice` required and
free text by turns, greedy, 64 tokens at most). Reported per N: aggregate completion
tokens per second, p50 latency, forward passes, and the gain over the first N.

It imports only what the engine needs (llama_cpp, xgrammar, pydantic, jinja2, numpy),
so it runs where the daemon's own dependencies are not installed: a lent GPU box,
with `--n-gpu-layers` offloading the model. tools/bench_batching.py measures the
daemon and llama.cpp's own batching on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 64
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Perth", "Dakar", "Hanoi", "Kyiv"]


def chats(n: int) -> list[dict[str, Any]]:
    """`n` chats: a tool call (even) and free text (odd) by turns."""
    weather = json.loads((REPO / "examples" / "weather_tool.json").read_text())
    out = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        if i % 2 == 0:
            out.append({"messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
                        "tools": weather, "tool_choice": "required"})
        else:
            out.append({"messages": [{"role": "user", "content": f"Describe the climate of {city} in a few sentences."}]})
    return [{**c, "max_tokens": MAX_TOKENS, "temperature": 0.0} for c in out]


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def engine_run(model_path: Path, slots: list[int], per_slot: int, threads: int,
               n_gpu_layers: int | str) -> dict[str, Any]:
    from outpost.manifests.schema import Manifest  # noqa: PLC0415 (llama_cpp loads here, not at --help)
    from outpost.models.backend import GenerationRequest  # noqa: PLC0415
    from outpost.models.batching import Batch  # noqa: PLC0415
    from outpost.models.llama import LlamaModel  # noqa: PLC0415

    manifest = Manifest.from_toml((REPO / "manifests" / "catalog" / f"{MODEL}.toml").read_text())
    out: dict[str, Any] = {}
    for n in slots:
        model = LlamaModel(manifest, model_path, n_slots=n, n_threads=threads, n_gpu_layers=n_gpu_layers)
        batch = Batch(model)
        batch.join(GenerationRequest(**chats(1)[0]))  # warm: the grammar compiled, the vocabulary read
        while batch.active:
            batch.step()
        queue = [GenerationRequest(**chat) for chat in chats(n * per_slot)]
        started: dict[int, float] = {}
        latencies: list[float] = []
        tokens, passes = 0, batch.passes
        t0 = time.perf_counter()
        while queue or batch.active:
            while queue and batch.admits(queue[0]):
                started[id(batch.join(queue.pop(0)))] = time.perf_counter()
            for seq in batch.step():
                latencies.append((time.perf_counter() - started.pop(id(seq))) * 1e3)
                tokens += seq.result.completion_tokens if seq.result else 0
        wall = time.perf_counter() - t0
        out[str(n)] = {"tok_s": round(tokens / wall, 1), "p50_ms": round(p50(latencies), 1),
                       "passes": batch.passes - passes, "requests": len(latencies),
                       "runs_on": "gpu" if model.n_gpu_layers else "cpu"}
        model.close()
    first = out[str(slots[0])]["tok_s"]
    for row in out.values():
        row["gain"] = round(row["tok_s"] / first, 2)
    return out


COLOURS = ["#1f6fb4", "#c33", "#2a2", "#888", "#a5c"]


def gain_svg(title: str, series: dict[str, dict[int, float]], width: int = 560, height: int = 320) -> str:
    """Aggregate throughput over one sequence's, against the number of sequences, one
    line per series, as a small self-contained SVG (no plotting library needed)."""
    left, right, top, bottom = 48, 150, 36, 44
    xs = sorted({n for s in series.values() for n in s})
    y_max = max(max(s.values()) for s in series.values()) * 1.1

    def x_of(n: int) -> float:  # evenly spaced: 1, 2, 4, 8, 16
        return left + (width - left - right) * xs.index(n) / max(1, len(xs) - 1)

    def y_of(g: float) -> float:
        return top + (height - top - bottom) * (1 - g / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="13">{title}</text>']
    for tick in range(0, int(y_max) + 1):
        y = y_of(tick)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick}x</text>')
    for n in xs:
        out.append(f'<text x="{x_of(n):.1f}" y="{height - bottom + 16}" text-anchor="middle">{n}</text>')
    for k, (name, points) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{x_of(n):.1f},{y_of(g):.1f}" for n, g in sorted(points.items()))
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for n, g in sorted(points.items()):
            out.append(f'<circle cx="{x_of(n):.1f}" cy="{y_of(g):.1f}" r="3" fill="{colour}"/>')
        last = max(points)
        out.append(f'<text x="{x_of(last) + 8:.1f}" y="{y_of(points[last]) + 4:.1f}" fill="{colour}">'
                   f'{name} {points[last]:.2f}x</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" text-anchor="middle">'
               f'sequences decoded together (tok/s over one sequence\'s)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("gguf", type=Path, help="SmolLM2-135M-Instruct's GGUF file")
    ap.add_argument("--slots", default="1,2,4,8,16", help="numbers of slots (default 1,2,4,8,16)")
    ap.add_argument("--requests", type=int, default=8, help="chats per slot (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    ap.add_argument("--n-gpu-layers", default="auto", help="layers to offload (default auto: all, with a GPU build)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args(argv)
    layers = args.n_gpu_layers if args.n_gpu_layers == "auto" else int(args.n_gpu_layers)
    report = {"machine": f"{platform.machine()}; llama.cpp threads {args.threads}",
              "engine": engine_run(args.gguf, [int(n) for n in args.slots.split(",")], args.requests,
                                   args.threads, layers)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
