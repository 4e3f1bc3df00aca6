"""Many agents, one model: what continuous batching gives, beside llama.cpp's own, in one run.

    python -m outpost.tools.bench_batching [--clients 1,2,4,8] [--requests 8] [--threads 1]
                                           [--no-peer] [--baseline DIR] [--out FILE]

For each number of clients N, `outpost serve` runs SmolLM2-135M (the cached store's
copy, hard-linked) twice: batching off (`[llama] n_parallel = 1`) and on
(`n_parallel = N`). N client threads each send `--requests` chats one after another,
alternating a weather tool call (`tool_choice` required) and free text, greedy, 64
tokens at most. Reported per run: aggregate completion tokens per second (wall clock,
first send to last reply), p50 and p95 latency, and the mean batch size the log
recorded; per N, the gain (tok/s at N over tok/s at 1, batching on) and the latency
ratio on/off.

The peers, on the same model file and threads, built from the llama.cpp source that
llama-cpp-python's sdist vendors (once, into `.cache/llama.cpp-<version>`; a few
minutes on 2 cores): `llama-batched-bench` (prompt 128, 64 generated, N sequences:
its generation tok/s at N over at 1 is the ceiling of what batching can give here) and
`llama-server --parallel N` (the same free-text chats over HTTP, N clients).

The engine alone (models/batching.py, no daemon) is tools/bench_engine.py.

The peers get `-t THREADS -tb <every core>`, as Outpost's worker has them: one thread
for a single token, every core for a pass of several (a prompt, or a batch).

`--baseline DIR`: a checkout of an earlier Outpost (e.g. `git worktree add DIR <rev>`);
its daemon serves the one-client run too, for "1 client >= 0.97x today".

Targets (issue 16, on a CPU): gain at 4 clients >= 0.9x llama-batched-bench's gain at
4 sequences; p50 latency at 4 clients no worse than batching off; 1 client >= 0.97x
the baseline. Ratios hold on any machine; absolute rates only on the one named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.client import OutpostClient
from outpost.runtime.logs.stats import percentile

from .bench_engine import MAX_TOKENS, MODEL, chats
from .bench_specialise import REPO_STORE, link_model
from .serve_process import ServeProcess, http_server

LLAMA_CPP_VERSION = "0.3.36"  # the Makefile's pin: the same llama.cpp source Outpost runs
BUILD = REPO_STORE.parent / f"llama.cpp-{LLAMA_CPP_VERSION}"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() == "x86_64" else ""


def clients_run(n_clients: int, per_client: int, send) -> dict[str, Any]:
    """`n_clients` threads, each sending its chats one after another through `send`
    (chat -> (completion tokens, reply)); aggregate tok/s and latency."""
    work = chats(n_clients * per_client)
    latencies: list[float] = []
    tokens, replies, errors = [0], [], []
    lock = threading.Lock()

    def client(k: int) -> None:
        for chat in work[k::n_clients]:
            t0 = time.perf_counter()
            try:
                n, reply = send(chat)
            except Exception as exc:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                latencies.append((time.perf_counter() - t0) * 1e3)
                tokens[0] += n
                replies.append(reply)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tok_s": round(tokens[0] / wall, 1), "p50_ms": round(percentile(latencies, 0.5), 1),
            "p95_ms": round(percentile(latencies, 0.95), 1), "requests": len(latencies),
            "errors": errors[:3], "n_errors": len(errors), "_replies": replies}


def outpost_run(data: Path, n_clients: int, per_client: int, threads: int, slots: int,
                name: str, source: Path | None = None) -> dict[str, Any]:
    config = (f'default_model = "{MODEL}"\npreload = ["{MODEL}"]\n[llama]\nn_threads = {threads}\n'
              f'n_parallel = {slots}\n[pool]\nmax_queue = 64\n')
    if source is not None:  # an earlier Outpost: its package first on the path, no n_parallel
        config = config.replace(f"n_parallel = {slots}\n", "")
    with _pythonpath(source), ServeProcess(data, config, name) as d:
        def send(chat: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            with OutpostClient(d.endpoint, timeout_s=300) as c:
                reply = c.chat(**chat)
            return reply["usage"]["completion_tokens"], reply
        send(chats(1)[0])  # warm: the grammar compiled, the prompt cache primed
        result = clients_run(n_clients, per_client, send)
    ids = [r["outpost"]["log_id"] for r in result.pop("_replies") if r["outpost"].get("log_id")]
    result["batch_size"] = _mean_batch(data, ids) if source is None else None
    return result


def _mean_batch(data: Path, ids: list[int]) -> float | None:
    if not ids:
        return None
    with sqlite3.connect(data / "logs.db") as db:
        row = db.execute(f"SELECT avg(batch_size) FROM attempts WHERE kind = 'local' AND request_id IN "
                         f"({','.join('?' * len(ids))})", ids).fetchone()
    return round(row[0], 2) if row and row[0] is not None else None


@contextmanager
def _pythonpath(source: Path | None) -> Iterator[None]:
    """Run `outpost serve` from `source` (a folder whose `outpost` is an older checkout)."""
    if source is None:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="outpost-baseline-") as tmp:
        (Path(tmp) / "outpost").symlink_to(source.resolve())
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = tmp + (os.pathsep + old if old else "")
        try:
            yield
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old


# -- llama.cpp's own ----------------------------------------------------------------------
def build_llama_cpp() -> Path:
    """llama-batched-bench and llama-server from the vendored source; their folder."""
    bin_dir = BUILD / "build" / "bin"
    if (bin_dir / "llama-batched-bench").exists() and (bin_dir / "llama-server").exists():
        return bin_dir
    BUILD.mkdir(parents=True, exist_ok=True)
    src = BUILD / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if not src.exists():
        print("  fetching llama-cpp-python's sdist (it vendors llama.cpp) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(BUILD), f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True)
        with tarfile.open(BUILD / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz") as tar:
            tar.extractall(BUILD, filter="data")
    print("  building llama-batched-bench and llama-server (a few minutes) ...", flush=True)
    build = BUILD / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_CUDA=off", "-DLLAMA_CURL=OFF", f"-DCMAKE_C_FLAGS={NO_AMX}",
                    f"-DCMAKE_CXX_FLAGS={NO_AMX}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target",
                    "llama-batched-bench", "llama-server"], check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def threads_batch(threads: int) -> int:
    """What Outpost's worker decodes a multi-token pass with (models/llama.py: every
    core), so the peers are given the same."""
    return max(threads, os.cpu_count() or 1)


def batched_bench(bin_dir: Path, model: Path, threads: int, npl: list[int]) -> dict[int, float]:
    """Generation tok/s at each number of sequences."""
    out = subprocess.run([str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(4096 * max(npl)),
                          "-b", "512", "-ub", "512", "-npp", "128", "-ntg", str(MAX_TOKENS),
                          "-npl", ",".join(map(str, npl)), "-t", str(threads), "-tb", str(threads_batch(threads)),
                          "--output-format", "jsonl"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    return {int(r["pl"]): round(float(r["speed_tg"]), 1) for r in rows}


def server_run(bin_dir: Path, model: Path, threads: int, n_clients: int, per_client: int) -> dict[str, Any]:
    with http_server([str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                      "-t", str(threads), "-tb", str(threads_batch(threads)), "--parallel", str(n_clients),
                      "-c", str(2048 * n_clients), "--no-webui"], "/health", "llama-server", 120) as url:

        def send(chat: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            body = {"messages": chat["messages"], "max_tokens": MAX_TOKENS, "temperature": 0.0}
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
            return reply["usage"]["completion_tokens"], reply
        send({"messages": [{"role": "user", "content": "warm"}]})
        result = clients_run(n_clients, per_client, send)
        result.pop("_replies")
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--clients", default="1,2,4,8", help="numbers of concurrent clients (default 1,2,4,8)")
    ap.add_argument("--requests", type=int, default=8, help="chats per client (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads, for every server (default 1)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp's batched-bench and server")
    ap.add_argument("--no-outpost", action="store_true", help="run only the peers (and --baseline)")
    ap.add_argument("--baseline", type=Path, help="an earlier Outpost checkout for the one-client baseline")
    ap.add_argument("--store", type=Path, default=REPO_STORE, help="where SmolLM2 is pulled already")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args(argv)
    npl = [int(n) for n in args.clients.split(",")]

    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {psutil.cpu_count(logical=False)} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB; llama.cpp threads {args.threads}",
        "requests_per_client": args.requests, "max_tokens": MAX_TOKENS, "outpost": {}}
    with tempfile.TemporaryDirectory(prefix="outpost-bench-batching-") as tmp:
        store = ModelStore(Path(tmp) / "models")
        link_model(store, ModelStore(args.store), MODEL)
        model_path = store.weights_path(Catalog.load(store, [], MODEL).get(MODEL))
        for n in ([] if args.no_outpost else npl):
            for mode, slots in (("off", 1), ("on", n)):
                if n == 1 and mode == "on":
                    continue  # one client: on and off are the same worker
                print(f"outpost, {n} clients, batching {mode} ...", flush=True)
                with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
                    data = Path(run_dir)
                    link_model(ModelStore(data / "models"), store, MODEL)
                    report["outpost"].setdefault(str(n), {})[mode] = outpost_run(
                        data, n, args.requests, args.threads, slots, f"n{n}-{mode}")
        if args.baseline:
            print("the baseline, 1 client ...", flush=True)
            with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
                link_model(ModelStore(Path(run_dir) / "models"), store, MODEL)
                report["baseline_1_client"] = outpost_run(Path(run_dir), 1, args.requests, args.threads, 1,
                                                          "baseline", source=args.baseline)
        if not args.no_peer:
            bin_dir = build_llama_cpp()
            print("llama-batched-bench ...", flush=True)
            report["llama_batched_bench_tg_tok_s"] = batched_bench(bin_dir, model_path, args.threads, npl)
            report["llama_server"] = {}
            for n in npl:
                print(f"llama-server --parallel {n} ...", flush=True)
                report["llama_server"][str(n)] = server_run(bin_dir, model_path, args.threads, n, args.requests)
    if not args.no_outpost:
        report["ratios"] = ratios(report, npl)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def ratios(report: dict[str, Any], npl: list[int]) -> dict[str, Any]:
    runs = report["outpost"]
    one = runs.get("1", {}).get("off", {}).get("tok_s")
    out: dict[str, Any] = {}
    for n in npl:
        on = runs[str(n)].get("on", runs[str(n)]["off"])
        off = runs[str(n)]["off"]
        row = {"outpost_gain": round(on["tok_s"] / one, 2) if one else None,
               "outpost_gain_off": round(off["tok_s"] / one, 2) if one else None,
               "p50_on_over_off": round(on["p50_ms"] / off["p50_ms"], 2)}
        bench = report.get("llama_batched_bench_tg_tok_s")
        if bench and 1 in bench and n in bench:
            row["batched_bench_gain"] = round(bench[n] / bench[1], 2)
            row["gain_vs_batched_bench"] = round(row["outpost_gain"] / row["batched_bench_gain"], 2) \
                if row["outpost_gain"] else None
        server = report.get("llama_server")
        if server and "1" in server and str(n) in server:
            row["llama_server_gain"] = round(server[str(n)]["tok_s"] / server["1"]["tok_s"], 2)
        out[str(n)] = row
    if report.get("baseline_1_client") and one:
        out["1_client_vs_baseline"] = round(one / report["baseline_1_client"]["tok_s"], 3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
