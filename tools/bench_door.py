"""What each door to the daemon costs, and whether priorities hold under a flood, in one run.

    python -m outpost.tools.bench_door [--requests 100] [--threads 2] [--no-peer]

`outpost serve` runs in its own process with SmolLM2-135M (the cached store's copy,
hard-linked) and the HTTP door on. The same tool calls (a weather tool, greedy, so
every door gets the same tokens) are asked:

1. **Overhead.** Through `OutpostClient`, the ZeroMQ transport alone (an httpx client,
   no SDK), the OpenAI SDK over that transport, and the OpenAI SDK over the HTTP door,
   interleaved question by question. For each: p50
   and p95 latency, the ratio to the daemon's own generation time (prefill + decode, as
   the reply's `timings_ms` report it), and the overhead: latency minus the daemon's
   `total` (what the door adds on top). Then the peer a user would otherwise pick:
   llama-cpp-python's own OpenAI server on the same model file and thread count
   (its own chat format, `chatml-function-calling`; its answers differ, so its tokens
   are reported beside its latency). And `sdk_alone`: the SDK against an in-memory
   httpx transport answering at once with a captured reply, the floor of what the SDK
   can add whatever the transport does. It takes its turn in the same rotation (right
   after a generation, as the SDK runs for real), and once more in a tight loop (warm
   caches, the best case).
2. **Streaming.** The SDK over ZeroMQ with `stream=True`: time to the first delta that
   carries output (a call's name, or text) against the prefill time, for tool calls
   and for plain text.
3. **Priorities.** 8 batch clients keep one request each in flight; 20 interactive
   requests are sent one after another meanwhile. Their queue wait (`timings_ms.queue`)
   p95 against one generation's duration (the batch requests' median), then the same
   20 sent as batch (the FIFO a queue without priorities gives) as the baseline; and
   every batch request must complete.

Ratios hold on any machine; absolute times only on the machine named in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.aclient import AsyncOutpostClient
from outpost.runtime.logs.stats import percentile
from outpost.runtime.sdk import http_client

from .bench_specialise import REPO_STORE, link_model
from .serve_process import ServeProcess

MODEL = "smollm2-135m-instruct"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Perth", "Dakar", "Hanoi", "Kyiv",
          "Rome", "Seoul", "Lagos", "Riga", "Doha", "Bern", "Accra", "Sofia", "Minsk", "Baku"]


def questions(n: int) -> list[list[dict[str, str]]]:
    asks = ["What is the weather in {}?", "Is it raining in {} right now?", "How warm is it in {} today?",
            "Weather report for {}, please.", "Do I need a coat in {}?"]
    return [[{"role": "user", "content": asks[i // len(CITIES) % len(asks)].format(CITIES[i % len(CITIES)])}]
            for i in range(n)]


def stats(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "n": len(values)}


def overhead(d: ServeProcess, http_url: str, asks: list[list[dict[str, str]]]) -> dict[str, Any]:
    """Each question through every door, in a rotating order; the SDK alone takes its
    turn in the same rotation, so it runs in the same conditions: right after another
    door's generation, with the caches the model's weights went through."""
    doors_measured = ("client", "transport", "sdk_zmq", "sdk_http")
    rows: dict[str, dict[str, list[float]]] = {k: {"latency": [], "gen": [], "over": []}
                                                for k in doors_measured}
    alone: list[float] = []
    with d.client() as client, \
            openai.OpenAI(base_url="http://outpost/v1", api_key="unused", max_retries=0,
                          http_client=http_client(d.endpoint)) as zmq_sdk, \
            openai.OpenAI(base_url=http_url, api_key="unused", max_retries=0) as http_sdk, \
            http_client(d.endpoint) as raw:
        def via_client(messages: list[dict[str, str]]) -> dict[str, Any]:
            return client.chat(messages, model=MODEL, tools=WEATHER, tool_choice="required")

        def via(sdk: openai.OpenAI) -> Any:
            def ask(messages: list[dict[str, str]]) -> dict[str, Any]:
                reply = sdk.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER,
                                                    tool_choice="required")
                return {"outpost": reply.outpost}
            return ask

        def via_transport(messages: list[dict[str, str]]) -> dict[str, Any]:
            # The transport alone, without the SDK's own request building and parsing.
            return raw.post("/chat/completions", json={"model": MODEL, "messages": messages, "tools": WEATHER,
                                                       "tool_choice": "required"}).json()

        doors = {"client": via_client, "transport": via_transport, "sdk_zmq": via(zmq_sdk),
                 "sdk_http": via(http_sdk)}
        for door in doors.values():  # warm: the grammar compiled, the prompt cache primed
            door(asks[0])
        with canned_sdk(via_transport(asks[0])) as sdk:
            names = [*doors, "sdk_alone"]
            for i, messages in enumerate(asks):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    t0 = time.perf_counter()
                    if name == "sdk_alone":
                        sdk.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER,
                                                    tool_choice="required")
                        alone.append((time.perf_counter() - t0) * 1e3)
                        continue
                    reply = doors[name](messages)
                    latency = (time.perf_counter() - t0) * 1e3
                    t = reply["outpost"]["timings_ms"]
                    rows[name]["latency"].append(latency)
                    rows[name]["gen"].append(t["prefill"] + t["decode"])
                    rows[name]["over"].append(latency - t["total"])
            hot = sdk_alone_hot(sdk, asks)
    out: dict[str, Any] = {}
    for name, r in rows.items():
        out[name] = {"latency_ms": stats(r["latency"]), "overhead_ms": stats(r["over"]),
                     "ratio_to_generation_p50": statistics.median(
                         [lat / gen for lat, gen in zip(r["latency"], r["gen"], strict=True)])}
    out["sdk_adds_ms_p50"] = out["sdk_zmq"]["overhead_ms"]["p50"] - out["client"]["overhead_ms"]["p50"]
    # Of that, what the transport adds (the rest is the SDK building and parsing its models).
    out["transport_adds_ms_p50"] = out["transport"]["overhead_ms"]["p50"] - out["client"]["overhead_ms"]["p50"]
    out["sdk_alone"] = {"latency_ms": stats(alone), "hot_latency_ms": hot}
    # What is left of the SDK path's cost once the SDK's own is taken away.
    out["sdk_path_minus_sdk_alone_ms_p50"] = out["sdk_adds_ms_p50"] - out["sdk_alone"]["latency_ms"]["p50"]
    return out


@contextlib.contextmanager
def canned_sdk(reply: dict[str, Any]) -> Iterator[openai.OpenAI]:
    """The SDK against an in-memory transport that answers at once with a reply captured
    from the daemon: no socket, no daemon. Its latency is the SDK's own cost (building
    the request, parsing the reply into its models); what the SDK path adds over
    `OutpostClient` cannot go below it, whatever the transport does."""
    body = json.dumps(reply).encode("utf-8")
    canned = httpx.MockTransport(lambda request: httpx.Response(
        200, content=body, headers={"content-type": "application/json"}))
    with openai.OpenAI(base_url="http://outpost/v1", api_key="unused", max_retries=0,
                       http_client=httpx.Client(transport=canned)) as sdk:
        yield sdk


def sdk_alone_hot(sdk: openai.OpenAI, asks: list[list[dict[str, str]]]) -> dict[str, float | None]:
    """The same in a tight loop (no generation between calls, caches warm): the best case."""
    times = []
    for messages in [asks[0]] * 10 + asks * 2:  # the first ten warm it
        t0 = time.perf_counter()
        sdk.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER, tool_choice="required")
        times.append((time.perf_counter() - t0) * 1e3)
    return stats(times[10:])


def streaming(d: ServeProcess, asks: list[list[dict[str, str]]]) -> dict[str, Any]:
    result = {}
    with openai.OpenAI(base_url="http://outpost/v1", api_key="unused", max_retries=0,
                       http_client=http_client(d.endpoint)) as sdk:
        for kind, extra in (("tool_call", {"tools": WEATHER, "tool_choice": "required"}),
                            ("text", {"max_tokens": 48})):
            ratios, ttfts, prefills = [], [], []
            for messages in asks:
                t0 = time.perf_counter()
                first = None
                last = None
                for chunk in sdk.chat.completions.create(model=MODEL, messages=messages, stream=True, **extra):
                    delta = chunk.choices[0].delta if chunk.choices else None
                    if first is None and delta is not None and (delta.content or delta.tool_calls):
                        first = (time.perf_counter() - t0) * 1e3
                    last = chunk
                t = last.outpost["timings_ms"]
                before_first = t["queue"] + t["load"] + t["prefill"]
                ttfts.append(first)
                prefills.append(before_first)
                ratios.append(first / before_first)
            result[kind] = {"ttft_ms": stats(ttfts), "prefill_ms": stats(prefills),
                            "ttft_over_prefill_p50": percentile(ratios, 0.5)}
    return result


async def priorities(endpoint: str, interactive_n: int = 20, batch_clients: int = 8) -> dict[str, Any]:
    async def flood(client: AsyncOutpostClient, stop: asyncio.Event, gens: list[float], done: list[int],
                    i: int) -> None:
        k = 0
        while not stop.is_set():
            reply = await client.chat(questions(40)[(i * 5 + k) % 40], model=MODEL, tools=WEATHER,
                                      tool_choice="required", priority="batch", client=f"batch{i}")
            t = reply["outpost"]["timings_ms"]
            gens.append(t["prefill"] + t["decode"])
            done.append(1)
            k += 1

    async def run(priority: str) -> dict[str, Any]:
        stop, gens, done = asyncio.Event(), [], []
        async with AsyncOutpostClient(endpoint) as client:
            floods = [asyncio.create_task(flood(client, stop, gens, done, i)) for i in range(batch_clients)]
            await asyncio.sleep(2.0)  # every batch client has a request queued
            waits = []
            for messages in questions(interactive_n):
                reply = await client.chat(messages, model=MODEL, tools=WEATHER, tool_choice="required",
                                          priority=priority, client="agent")
                waits.append(reply["outpost"]["timings_ms"]["queue"])
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*floods)  # each finishes the request it has in flight
        generation = statistics.median(gens)
        return {"queue_wait_ms": stats(waits), "generation_ms_p50": generation,
                "wait_p95_over_generation": percentile(waits, 0.95) / generation,
                "batch_completed": len(done), "batch_clients": batch_clients}

    return {"interactive": await run("interactive"), "as_batch_baseline": await run("batch")}


def peer(model_path: Path, threads: int, asks: list[list[dict[str, str]]]) -> dict[str, Any]:
    """llama-cpp-python's own OpenAI-compatible server on the same file and threads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                             "--n_threads", str(threads), "--n_ctx", "2048", "--host", "127.0.0.1",
                             "--port", str(port), "--chat_format", "chatml-function-calling"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as sdk:
            deadline = time.monotonic() + 120
            while True:
                try:
                    sdk.models.list()
                    break
                except openai.APIConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("llama_cpp.server did not start") from None
                    time.sleep(0.5)
            choice = {"type": "function", "function": {"name": "get_weather"}}
            ask = lambda m: sdk.chat.completions.create(model=MODEL, messages=m, tools=WEATHER,  # noqa: E731
                                                        tool_choice=choice, max_tokens=64)
            ask(asks[0])
            latencies, tokens = [], []
            for messages in asks:
                t0 = time.perf_counter()
                reply = ask(messages)
                latencies.append((time.perf_counter() - t0) * 1e3)
                tokens.append(reply.usage.completion_tokens)
        return {"latency_ms": stats(latencies), "completion_tokens_mean": statistics.mean(tokens)}
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100, help="tool calls per door (default 100)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads, for both servers")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python's server")
    ap.add_argument("--store", type=Path, default=REPO_STORE, help="where SmolLM2 is pulled already")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args(argv)

    asks = questions(args.requests)
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {psutil.cpu_count(logical=False)} cores, "
                              f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU offload "
                              f"assumed; llama.cpp threads {args.threads}", "requests": args.requests}
    with tempfile.TemporaryDirectory(prefix="outpost-bench-door-") as tmp:
        data = Path(tmp)
        store = ModelStore(data / "models")
        link_model(store, ModelStore(args.store), MODEL)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http_port = s.getsockname()[1]
        config = (f'default_model = "{MODEL}"\npreload = ["{MODEL}"]\n[llama]\nn_threads = {args.threads}\n'
                  f'[http]\nlisten = "127.0.0.1:{http_port}"\n[pool]\nmax_queue = 64\n')
        with ServeProcess(data, config, "bench") as d:
            print(f"1/4 overhead: {args.requests} tool calls through each door ...", flush=True)
            report["overhead"] = overhead(d, f"http://127.0.0.1:{http_port}/v1", asks)
            print("2/4 streaming: time to the first delta ...", flush=True)
            report["streaming"] = streaming(d, asks[: max(10, args.requests // 5)])
            print("3/4 priorities: 8 batch clients flooding, 20 interactive requests ...", flush=True)
            report["priorities"] = asyncio.run(priorities(d.endpoint))
        if not args.no_peer:
            print("4/4 the peer: llama-cpp-python's OpenAI server ...", flush=True)
            manifest = Catalog.load(store, [], MODEL).get(MODEL)
            report["peer_llama_cpp_server"] = peer(store.weights_path(manifest), args.threads, asks)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
