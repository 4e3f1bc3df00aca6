"""Soak: `outpost serve` under mixed load for a while, measured window by window.

    python -m outpost.tools.soak [--duration 600] [--window 300] [--clients 2] [--check] [--json]

In a temporary data dir it runs the daemon in its own process with two tiny random
models under a budget that holds one of them (calibrated first, as bench_swap does), so
requests that alternate between them swap; escalation `on_low_confidence` for the `weather` task
(a third of the tool calls) to a local OpenAI-compatible server (tools/oracle_server.py, real HTTP on 127.0.0.1); and, in the
background, `outpost logs export` and `outpost sync push` to a file:// hub as real
commands. `--clients` threads send a mix: tool calls and text on either model, with
errors among them (an unknown model, a schema the grammar refuses, a prompt over the
context, a malformed frame).

Every 2 s it samples the process tree (RSS of the daemon, its forkserver and each
worker), the daemon's open file descriptors, and the log's WAL size. Per window it
reports RSS by process, descriptors, WAL, request p50/p95 and errors by code. With
`--check` it exits 1 if the daemon died, an `internal` error was answered, or the last
window grew past the first by more than the tolerances (TOLERANCE).

What this module must not do: import the daemon (it measures it from outside).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq

from outpost.manifests.errors import OutpostError
from outpost.tools import bfcl
from outpost.tools.oracle_server import OracleServer
from outpost.tools.serve_process import ServeProcess
from outpost.tools.tiny_gguf import tiny_data_dir, tiny_manifest_toml, write_tiny_gguf

MODELS = ("tiny-a", "tiny-b")
SAMPLE_S = 2.0
# What the last window may exceed the first by before --check fails: the daemon's RSS
# (allocator high-water marks of large frames and the log's page cache settle within a
# window), its descriptors, and the WAL (SQLite checkpoints it at about 4 MiB).
TOLERANCE = {"daemon_rss": 24 << 20, "fds": 4, "wal": 64 << 20}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTION = "What is the weather in Paris?"


@dataclass
class Window:
    index: int
    requests: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    rss: dict[str, int] = field(default_factory=dict)  # process role -> max RSS in the window
    fds: int = 0
    wal: int = 0
    escalated: int = 0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else 0.0

        return {"window": self.index, "requests": self.requests, "p50_ms": pct(0.5), "p95_ms": pct(0.95),
                "escalated": self.escalated, "outcomes": dict(self.outcomes),
                "rss_mib": {k: round(v / 2**20, 1) for k, v in sorted(self.rss.items())},
                "fds": self.fds, "wal_mib": round(self.wal / 2**20, 2)}


class Soak:
    def __init__(self, daemon: ServeProcess, window_s: float) -> None:
        self.daemon, self.window_s = daemon, window_s
        self.windows: list[Window] = []
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.background: dict[str, int] = collections.defaultdict(int)  # command -> failures

    def window(self) -> Window:
        index = int((time.monotonic() - self.t0) // self.window_s)
        while len(self.windows) <= index:
            self.windows.append(Window(len(self.windows)))
        return self.windows[index]

    def record(self, ms: float, outcome: str, escalated: bool) -> None:
        with self.lock:
            w = self.window()
            w.requests += 1
            w.latencies_ms.append(ms)
            w.outcomes[outcome] += 1
            w.escalated += escalated

    # -- the load ------------------------------------------------------------------------
    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with self.daemon.client(120) as c:
            while not self.stop.is_set():
                kind = rng.choices(["tool", "text", "error", "raw"], [6, 3, 1, 0.3])[0]
                t = time.perf_counter()
                escalated, outcome = False, "result"
                try:
                    if kind == "raw":
                        outcome = _raw_frame(self.daemon.endpoint, rng)
                    else:
                        messages, kwargs = _request(kind, rng)
                        reply = c.chat(messages, **kwargs)
                        escalated = reply["outpost"].get("escalated", False)
                except OutpostError as exc:
                    outcome = exc.code
                self.record((time.perf_counter() - t) * 1e3, outcome, bool(escalated))

    def every(self, period_s: float, name: str, argv: list[str]) -> None:
        """Run a CLI command every `period_s` (log export, sync push), counting failures."""
        exe = str(Path(sys.executable).with_name("outpost"))
        while not self.stop.wait(period_s):
            done = subprocess.run([exe, *argv, "--data-dir", str(self.daemon.data)], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode:
                self.background[name] += 1
                print(f"{name} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)

    def sample(self) -> None:
        wal = self.daemon.data / "logs.db-wal"
        while not self.stop.wait(SAMPLE_S):
            try:
                tree = _tree(self.daemon.pid)
                fds = psutil.Process(self.daemon.pid).num_fds()
            except psutil.Error:
                return  # the daemon is gone: the report says so
            with self.lock:
                w = self.window()
                for role, rss in tree.items():
                    w.rss[role] = max(w.rss.get(role, 0), rss)
                w.fds = max(w.fds, fds)
                w.wal = max(w.wal, wal.stat().st_size if wal.exists() else 0)


def _request(kind: str, rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, chat keyword arguments) for one request of the mix."""
    model = rng.choice(MODELS)
    if kind == "tool":
        # A third of the calls are the `weather` task, which escalates when unsure; the
        # rest stay local (a random model is unsure of everything).
        task = {"task": "weather"} if rng.random() < 1 / 3 else {}
        return [{"role": "user", "content": QUESTION}], {"model": model, "tools": WEATHER,
                                                          "tool_choice": "required", "max_tokens": 24, **task}
    if kind == "text":
        return [{"role": "user", "content": f"Say something about {rng.randint(0, 999)}."}], \
            {"model": model, "max_tokens": 16}
    error = rng.choice(["unknown_model", "unsupported_schema", "context_overflow"])
    if error == "unknown_model":
        return [{"role": "user", "content": "hi"}], {"model": "no-such-model"}
    if error == "unsupported_schema":
        tools = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}]
        return [{"role": "user", "content": "hi"}], {"model": model, "tools": tools}
    return [{"role": "user", "content": "word " * 5000}], {"model": model, "max_tokens": 4}


def _raw_frame(endpoint: str, rng: random.Random) -> str:
    """A malformed frame on a socket of its own: answered with bad_request."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send(rng.choice([b"\xff\xfe", b"{", b'{"v": 1, "id": 3}', b"[]"]))
        if not sock.poll(30_000):
            return "no_reply"
        return json.loads(sock.recv()).get("error", {}).get("code", "result")
    finally:
        sock.close()


def _tree(pid: int) -> dict[str, int]:
    """RSS by process: the daemon, its forkserver, each worker (by pid), the rest."""
    daemon = psutil.Process(pid)
    out = {"daemon": daemon.memory_info().rss}
    for child in daemon.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            rss = child.memory_info().rss
        except psutil.Error:
            continue
        if "forkserver" in cmd and child.ppid() == pid:
            role = "forkserver"
        elif "resource_tracker" in cmd:
            role = "resource_tracker"
        else:
            role = f"worker-{child.pid}"
        out[role] = rss
    return out


def _models(root: Path) -> Path:
    """A data dir with the two tiny models (their own random weights) pulled."""
    from outpost.manifests.catalog import Catalog  # noqa: PLC0415
    from outpost.manifests.store import ModelStore  # noqa: PLC0415

    data = tiny_data_dir(root, MODELS[0], seed=0)
    text = tiny_manifest_toml(write_tiny_gguf(data / f"{MODELS[1]}.gguf", seed=7), model_id=MODELS[1])
    (data / "manifests" / f"{MODELS[1]}.toml").write_text(text)
    store = ModelStore(data / "models")
    store.pull(Catalog.load(store, [data / "manifests"], MODELS[0]).get(MODELS[1]), text)
    return data


def _budget(data: Path, top: str) -> int:
    """Room for the daemon and one model and a half: alternating requests swap."""
    with ServeProcess(data, top + '[budget]\nram = "8GiB"\n', "calibrate") as d, d.client() as c:
        base = c.status()["budget"]["used_bytes"]
        for m in MODELS:  # a tool call too: its grammar and vocabulary are part of a worker
            c.chat([{"role": "user", "content": "hi"}], model=m, max_tokens=2)
            c.chat([{"role": "user", "content": QUESTION}], model=m, tools=WEATHER, tool_choice="required",
                   max_tokens=24)
        sizes = [w["ram_bytes"] for w in c.status()["loaded"]]
    return base + max(sizes) + min(sizes) // 2 + (32 << 20)  # [budget] margin comes off it


def run(duration_s: float, window_s: float, clients: int, root: Path) -> dict[str, Any]:
    data = _models(root)
    hub = root / "hub"
    hub.mkdir()
    item = bfcl.Item(id="soak", category="soak", messages=[{"role": "user", "content": QUESTION}],
                     functions=[t["function"] for t in WEATHER], answer=[{"get_weather": {"city": ["Paris"]}}])
    with OracleServer([item]) as oracle:
        top = (f'preload = []\ndefault_model = "{MODELS[0]}"\nmanifest_dirs = ["{data / "manifests"}"]\n')
        budget = _budget(data, top)
        config = (top + f"[budget]\nram = {budget}\n"
                  '[escalation.tasks.weather]\npolicy = "on_low_confidence"\nthreshold = 0.5\n'
                  f'[cloud]\nbase_url = "{oracle.base_url}"\nmodel = "{oracle.model}"\n'
                  'api_key_env = "OUTPOST_SOAK_NO_KEY"\ndaily_max_requests = 1000000\ndaily_max_tokens = 1000000000\n'
                  f'[sync]\nhub = "file://{hub}"\ndevice_id = "soak"\npush_delay_s = 0\n')
        with ServeProcess(data, config, "soak") as daemon:
            soak = Soak(daemon, window_s)
            threads = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(clients)]
            threads += [threading.Thread(target=soak.sample, daemon=True),
                        threading.Thread(target=soak.every, daemon=True, args=(
                            20.0, "logs export", ["logs", "export", "--out", str(root / "export.jsonl")])),
                        threading.Thread(target=soak.every, daemon=True, args=(
                            30.0, "sync push", ["sync", "push", "--config", str(daemon.config)]))]
            for t in threads:
                t.start()
            soak.stop.wait(duration_s)
            soak.stop.set()
            for t in threads:
                t.join(300)
            alive = daemon.proc.poll() is None
            with daemon.client(30) as c:
                status = c.status()
    whole = int(duration_s // window_s)  # a last, partial window (the stop) is left out
    windows = [w.summary() for w in soak.windows[:max(whole, 1)] if w.requests]
    return {"duration_s": duration_s, "window_s": window_s, "clients": clients, "budget_mib": round(budget / 2**20),
            "daemon_alive": alive, "evictions": status["budget"]["evictions"],
            "oracle_requests": oracle.requests, "background_failures": dict(soak.background),
            "windows": windows}


def check(result: dict[str, Any]) -> list[str]:
    """What --check fails on: a dead daemon, an internal error, a failed background
    command, or growth of the last window over the first past TOLERANCE."""
    problems = []
    if not result["daemon_alive"]:
        problems.append("the daemon died")
    ws = result["windows"]
    if any("internal" in w["outcomes"] for w in ws):
        problems.append("an `internal` error was answered")
    if result["background_failures"]:
        problems.append(f"background commands failed: {result['background_failures']}")
    if len(ws) >= 2:
        first, last = ws[0], ws[-1]
        grew = (last["rss_mib"].get("daemon", 0) - first["rss_mib"].get("daemon", 0)) * 2**20
        if grew > TOLERANCE["daemon_rss"]:
            problems.append(f"the daemon's RSS grew {grew / 2**20:.1f} MiB from the first window to the last")
        if last["fds"] - first["fds"] > TOLERANCE["fds"]:
            problems.append(f"open fds grew from {first['fds']} to {last['fds']}")
    if any(w["wal_mib"] * 2**20 > TOLERANCE["wal"] for w in ws):
        problems.append("the WAL grew past 64 MiB")
    return problems


def print_result(result: dict[str, Any]) -> None:
    print(f"soak: {result['duration_s']:g} s, {result['clients']} clients, windows of {result['window_s']:g} s, "
          f"budget {result['budget_mib']} MiB (one model and a half), {result['evictions']} evictions, "
          f"{result['oracle_requests']} requests to the cloud server")
    print(f"{'win':>3} {'reqs':>6} {'p50 ms':>8} {'p95 ms':>8} {'escal':>6} {'daemon':>8} {'forksrv':>8} "
          f"{'worker':>8} {'seen':>5} {'fds':>4} {'WAL MiB':>8}  outcomes")
    for w in result["windows"]:
        rss = w["rss_mib"]
        workers = [v for k, v in rss.items() if k.startswith("worker-")]
        print(f"{w['window']:>3} {w['requests']:>6} {w['p50_ms']:>8.1f} {w['p95_ms']:>8.1f} {w['escalated']:>6} "
              f"{rss.get('daemon', 0):>8.1f} {rss.get('forkserver', 0):>8.1f} {max(workers, default=0):>8.1f} "
              f"{len(workers):>5} {w['fds']:>4} "
              f"{w['wal_mib']:>8.2f}  {', '.join(f'{k} {v}' for k, v in sorted(w['outcomes'].items()))}")
    print("(RSS in MiB, the most seen in the window; worker: the largest worker, of the `seen` ones that "
          "lived in it)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--window", type=float, default=300.0, help="seconds per reported window (default 300)")
    ap.add_argument("--clients", type=int, default=2, help="client threads (default 2)")
    ap.add_argument("--check", action="store_true", help="exit 1 on death, internal errors or growth")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="outpost-soak-") as tmp:
        result = run(args.duration, args.window, args.clients, Path(tmp))
    print(json.dumps(result, indent=2)) if args.json else print_result(result)
    problems = check(result)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
