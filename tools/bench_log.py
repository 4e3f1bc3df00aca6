"""What logging costs a request, and how many rows the log sustains, in one run.

    python -m outpost.tools.bench_log [--requests N] [--concurrency C]

The daemon answers only after the request's row is committed, so the time of
`LogStore.record` is what logging adds to a reply. Rows are realistic: a chat with a
tools block, the prompt as the model saw it (about 3 KB), tool calls, validation.

1. Overhead: N requests logged one after another; p50/p99 of `record`, against the
   same hop to the log's thread doing nothing (the baseline, same run).
2. Throughput: C requests in flight at once, as under load; committed rows per
   second (a request and its attempt are two rows).

The database is a fresh file in a temporary directory on the same filesystem as the
default data dir (pass --dir to choose), in WAL mode as the daemon runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from outpost.runtime.logs.stats import percentile
from outpost.runtime.logs.records import AttemptKind, AttemptRecord, RequestRecord
from outpost.runtime.logs.store import LogStore

TOOLS = [{"type": "function", "function": {
    "name": f"tool_{i}", "description": "Look something up in the fleet's inventory by site and tag.",
    "parameters": {"type": "object", "properties": {
        "site": {"type": "string"}, "tag": {"type": "string"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 100}}, "required": ["site", "tag"]}}}
    for i in range(3)]


def row(i: int) -> tuple[RequestRecord, list[AttemptRecord]]:
    messages = [{"role": "user", "content": f"Which pumps at site {i % 17} are tagged overdue?"}]
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "tool_0", "arguments": json.dumps({"site": str(i % 17), "tag": "overdue"})}}]
    request = RequestRecord(
        method="chat", model_requested=None, model="smollm2-135m-instruct", model_version="q4_1-1",
        task="tool_call", policy="off", messages=messages, tools=TOOLS, tool_choice="auto",
        params={"max_tokens": 256}, content=None, tool_calls=calls, finish_reason="tool_calls",
        timings={"total": 412.5, "decode": 380.1}, prompt_tokens=310, completion_tokens=28)
    attempt = AttemptRecord(
        kind=AttemptKind.LOCAL, model="smollm2-135m-instruct", model_version="q4_1-1",
        output="<tool_call>" + calls[0]["function"]["arguments"] + "</tool_call>",
        tool_calls=calls, finish_reason="tool_calls", constrained=True, grammar_dead_end=False,
        validation=[{"name": "tool_0", "valid": True, "errors": []}], mean_logprob=-0.1,
        min_logprob=-1.2, prompt_tokens=310, completion_tokens=28, prefill_ms=30.0,
        decode_ms=380.1, prompt="x" * 3000, grammar="xgrammar tool_choice=auto parallel=True",
        repaired=0)
    return request, [attempt]



async def measure(store: LogStore, n: int, concurrency: int) -> dict[str, Any]:
    hop, record = [], []
    for i in range(n):
        t = time.perf_counter()
        await store._run(lambda: None)  # the same trip to the writer thread, no SQL
        hop.append((time.perf_counter() - t) * 1e3)
        request, attempts = row(i)
        t = time.perf_counter()
        await store.record(request, attempts)
        record.append((time.perf_counter() - t) * 1e3)

    pending: set[asyncio.Task[int]] = set()
    t0 = time.perf_counter()
    for i in range(n):
        if len(pending) >= concurrency:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.ensure_future(store.record(*row(n + i))))
    await asyncio.gather(*pending)
    seconds = time.perf_counter() - t0
    return {
        "record_ms": {"p50": round(statistics.median(record), 3), "p99": round(percentile(record, 0.99), 3)},
        "baseline_hop_ms": {"p50": round(statistics.median(hop), 3), "p99": round(percentile(hop, 0.99), 3)},
        "overhead_p99_ms": round(percentile(record, 0.99) - percentile(hop, 0.99), 3),
        "sustained": {"requests_per_s": round(n / seconds), "rows_per_s": round(2 * n / seconds),
                      "concurrency": concurrency},
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m outpost.tools.bench_log",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--dir", type=Path, help="where to put the scratch database")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="outpost-bench-log-", dir=args.dir) as tmp:
        store = LogStore(Path(tmp) / "logs.db")
        try:
            result = asyncio.run(measure(store, args.requests, args.concurrency))
        finally:
            store.close()
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
