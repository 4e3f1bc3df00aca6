"""Fuzz the daemon's door: thousands of generated frames to a live daemon, each one answered.

    python -m outpost.tools.fuzz_wire [--frames 10000] [--seed 0] [--json]

It starts `outpost serve` on the tiny random model in a temporary data dir, warms it up,
measures the daemon process (memory, open file descriptors), then sends frames drawn
from hypothesis strategies, one at a time over one DEALER socket:

    bytes       random bytes (not UTF-8, not JSON)
    truncated   a valid request cut short
    deep        JSON nested 65 to 200,000 levels
    numbers     huge, infinite and not-a-number values where numbers go
    types       a value of a random JSON type in one field of a valid request
    multipart   2-5 frames in one message
    giant       hundreds of tools, enums of thousands, long patterns, frames over the limit
    schemas     schemas meant to make grammar compilation blow up, within the limits or not

Every frame must get a typed reply (a `result`, or an `error` whose code is in Outpost's
error tree) within `--bound` seconds. Afterwards the daemon must still be the same
process, its memory back near the baseline and its descriptors back to it, and a valid
request must be served. The report gives frames by kind, reply codes, the slowest reply,
and memory and descriptors before and after; exit 1 if any check failed. Needs the `dev`
extra (hypothesis).

What this module must not do: import the daemon (it talks to it over its socket).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from outpost.manifests.errors import OutpostError, error_class
from outpost.tools.serve_process import ServeProcess
from outpost.tools.tiny_gguf import tiny_data_dir

MODEL = "tiny-random"
TRIM_WAIT_S = 6.0  # a little over the daemon's heap trim period (pool.TRIM_EVERY reaper rounds)
CHECKPOINT = 2000  # frames between memory readings (a leak climbs; a high-water mark levels off)
CONFIG = 'preload = ["tiny-random"]\ndefault_model = "tiny-random"\n[server]\ngrammar_timeout_s = 5\n'
# Leaves of generated JSON values; the recursion builds lists and objects of them.
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = [("v",), ("id",), ("method",), ("params",), ("params", "messages"), ("params", "messages", 0),
          ("params", "messages", 0, "role"), ("params", "messages", 0, "content"), ("params", "model"),
          ("params", "task"), ("params", "tools"), ("params", "tools", 0), ("params", "tools", 0, "type"),
          ("params", "tools", 0, "function"), ("params", "tools", 0, "function", "name"),
          ("params", "tools", 0, "function", "parameters"), ("params", "tool_choice"),
          ("params", "max_tokens"), ("params", "temperature"), ("params", "top_p"), ("params", "seed"),
          ("params", "stream"), ("params", "priority"), ("params", "client"), ("params", "escalation"),
          ("params", "constrained"), ("params", "parallel_tool_calls"), ("params", "stream_options"),
          ("params", "user"), ("params", "max_completion_tokens")]
METHODS = ["chat", "ping", "status", "models.list", "models.activate", "models.rollback", "feedback",
           "cancel", "nope"]
PATTERNS = ["(a|aa)*b", "(a*)*$", "((a+)+)+c", "[\\s\\S]{0,900}", "^(\\d{1,3}\\.){3}\\d{1,3}$",
            "(x+x+)+y", "(?=a)b", "\\p{L}+", "a{1,100000}", "(", "[z-a]", "\\", "(?P<n>a)(?P=n)"]


def _tool(params: dict[str, Any], name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": params}}


def _request(draw: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"messages": [{"role": "user", "content": draw(st.text(max_size=40))}],
                              "max_tokens": draw(st.integers(1, 8))}
    if draw(st.booleans()):
        params["tools"] = [_tool({"type": "object", "properties": {"city": {"type": "string"}},
                                  "required": ["city"]}, "weather")]
        params["tool_choice"] = draw(st.sampled_from(["auto", "required", "none"]))
    if draw(st.integers(0, 9)) == 0:
        params["stream"] = True
    return {"v": 1, "id": draw(st.text(max_size=12)), "method": "chat", "params": params}


def _put(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        obj = obj[step]
    obj[path[-1]] = value


def _deep(n: int, arrays: bool) -> bytes:
    inner = "[" * n + "]" * n if arrays else '{"a":' * n + "1" + "}" * n
    return f'{{"v":1,"id":"deep","method":"chat","params":{inner}}}'.encode()


KINDS = ("bytes", "truncated", "deep", "numbers", "types", "multipart", "giant", "schemas")


@st.composite
def frames(draw: Any, kinds: tuple[str, ...] = KINDS) -> tuple[str, list[bytes]]:
    """(kind, the message's frames)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        return kind, [draw(st.binary(max_size=2048))]
    if kind == "truncated":
        text = json.dumps(_request(draw)).encode()
        return kind, [text[:draw(st.integers(0, len(text) - 1))]]
    if kind == "deep":
        return kind, [_deep(draw(st.integers(65, 200_000)), draw(st.booleans()))]
    request = _request(draw)
    if kind == "numbers":
        number = draw(st.sampled_from(["1" + "0" * 5000, "1e999", "-1e999", "NaN", "Infinity", "-0",
                                       str(2**64), str(-(2**63) - 1), "1" * 4301, "0.0000001e-400"]))
        path = draw(st.sampled_from([f for f in FIELDS if f[-1] in ("v", "max_tokens", "temperature", "top_p",
                                                                    "seed", "id", "max_completion_tokens")]))
        _put(request, path, "\x00N\x00")
        return kind, [json.dumps(request).replace('"\\u0000N\\u0000"', number).encode()]
    if kind == "types":
        request["params"]["tools"] = [_tool({"type": "object", "properties": {"x": {"type": "string"}}})]
        if draw(st.integers(0, 4)) == 0:
            request["method"] = draw(st.sampled_from(METHODS))
        _put(request, draw(st.sampled_from(FIELDS)), draw(VALUES))
        return kind, [json.dumps(request).encode()]
    if kind == "multipart":
        parts = draw(st.lists(st.binary(max_size=256) | st.just(json.dumps(request).encode()),
                              min_size=2, max_size=5))
        return kind, parts
    if kind == "giant":
        shape = draw(st.sampled_from(["tools", "enum", "pattern", "oversize", "names"]))
        if shape == "tools":
            n = draw(st.integers(129, 3000))
            request["params"]["tools"] = [_tool({"type": "object"}, f"t{i}") for i in range(n)]
        elif shape == "enum":
            n = draw(st.integers(1025, 100_000))
            request["params"]["tools"] = [_tool({"type": "object", "properties": {
                "x": {"enum": [f"v{i}" for i in range(n)]}}})]
        elif shape == "pattern":
            request["params"]["tools"] = [_tool({"type": "object", "properties": {
                "x": {"type": "string", "pattern": "a" * draw(st.integers(1001, 200_000))}}})]
        elif shape == "names":
            request["params"]["tools"] = [_tool({"type": "object"}, "n" * draw(st.integers(65, 10_000)))]
        else:  # over [server] max_request_bytes (1 MiB), under the socket's hard cap
            request["params"]["messages"][0]["content"] = "x" * draw(st.integers(1 << 20, 3 << 20))
        request["params"]["tool_choice"] = "required"
        return f"{kind}:{shape}", [json.dumps(request).encode()]
    # kind == "schemas": aimed at the grammar compiler, most of them within the limits.
    shape = draw(st.sampled_from(["nested", "enum", "pattern", "anyof", "ref", "numbers", "strings"]))
    if shape == "nested":
        schema: dict[str, Any] = {"type": "integer"}
        for _ in range(draw(st.integers(1, 300))):
            schema = ({"type": "object", "properties": {"a": schema}, "required": ["a"]} if draw(st.booleans())
                      else {"type": "array", "items": schema})
    elif shape == "enum":
        schema = {"enum": [draw(st.sampled_from(["v", "w" * 50])) + str(i) for i in range(draw(st.integers(1, 1024)))]}
    elif shape == "pattern":
        schema = {"type": "string", "pattern": draw(st.sampled_from(PATTERNS)
                                                    | st.text(alphabet="()[]{}*+?|^$.\\ab0-9,-", max_size=40))}
    elif shape == "anyof":
        schema = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                            for i in range(draw(st.integers(2, 300)))]}
    elif shape == "ref":
        schema = {"$ref": draw(st.sampled_from(["#/$defs/a", "#/nowhere", "#", "http://x/y", "#/$defs/b"]))}
        request["params"].setdefault("tools", [])
        request["params"]["tools"] = [_tool({"type": "object", "properties": {"x": schema}, "required": ["x"],
                                             "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}},
                                                       "b": {"$ref": "#/$defs/b"}}})]
        request["params"]["tool_choice"] = "required"
        return f"{kind}:{shape}", [json.dumps(request).encode()]
    elif shape == "numbers":
        schema = {"type": "integer", "minimum": draw(st.integers(-(2**80), 2**80)),
                  "maximum": draw(st.integers(-(2**80), 2**80)), "multipleOf": draw(st.integers(-5, 10**12))}
    else:
        schema = {"type": "string", "minLength": draw(st.integers(0, 10**9)),
                  "maxLength": draw(st.integers(0, 10**9)), "format": draw(st.sampled_from(["uuid", "date", "x"]))}
    request["params"]["tools"] = [_tool({"type": "object", "properties": {"x": schema}, "required": ["x"]})]
    request["params"]["tool_choice"] = "required"
    return f"{kind}:{shape}", [json.dumps(request).encode()]


@dataclass
class Report:
    frames: int = 0  # sent, with the warm-up's
    warmup: int = 0  # frames sent before the baseline was measured
    by_kind: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    replies: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))  # result / error code
    max_reply_s: float = 0.0
    slowest: str = ""
    failures: list[str] = field(default_factory=list)  # no typed reply in time, or an untyped one
    internal: list[str] = field(default_factory=list)  # `internal` errors: bugs, each a finding
    before: dict[str, int] = field(default_factory=dict)
    trace: list[tuple[int, int]] = field(default_factory=list)  # (frames, daemon USS) along the run
    after: dict[str, int] = field(default_factory=dict)
    same_process: bool = True
    served_after: bool = False
    wall_s: float = 0.0

    def ok(self, memory_slack: int) -> bool:
        return (not self.failures and not self.internal and self.same_process and self.served_after
                and self.after.get("fds", 0) <= self.before.get("fds", 0)
                and self.after.get("uss", 0) <= self.before.get("uss", 0) + memory_slack)


def _typed(reply: Any) -> str | None:
    """The reply's outcome (`result`, or its error code), or None if it is not typed."""
    if not isinstance(reply, dict) or reply.get("v") != 1:
        return None
    if "result" in reply:
        return "result"
    error = reply.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code = error["code"]
        known = code == "internal" or error_class(code) is not OutpostError
        return code if known else None
    return None


class Sender:
    def __init__(self, endpoint: str, bound_s: float, report: Report) -> None:
        self.endpoint, self.bound_s, self.report = endpoint, bound_s, report
        self.ctx = zmq.Context()
        self.sock = self._socket()

    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def send(self, kind: str, parts: list[bytes]) -> None:
        r = self.report
        r.frames += 1
        r.by_kind[kind] += 1
        t0 = time.perf_counter()
        self.sock.send_multipart(parts)
        while True:  # a stream's chunks come before its result
            left = self.bound_s - (time.perf_counter() - t0)
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                r.failures.append(f"{kind}: no reply within {self.bound_s:g} s to {parts[0][:120]!r}")
                self.sock.close()
                self.sock = self._socket()  # a late reply must not be read as the next one's
                return
            try:  # the last frame: a leading empty one (REQ's delimiter) is mirrored back
                reply = json.loads(self.sock.recv_multipart()[-1])
            except ValueError:
                reply = None
            if isinstance(reply, dict) and "chunk" in reply:
                continue
            break
        elapsed = time.perf_counter() - t0
        if elapsed > r.max_reply_s:
            r.max_reply_s, r.slowest = elapsed, kind
        outcome = _typed(reply)
        if outcome is None:
            r.failures.append(f"{kind}: untyped reply {str(reply)[:200]} to {parts[0][:120]!r}")
            return
        r.replies[outcome] += 1
        if outcome == "internal":
            r.internal.append(f"{kind}: {reply['error'].get('message', '')[:200]} to {parts[0][:200]!r}")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def measure(pid: int) -> dict[str, int]:
    proc = psutil.Process(pid)
    info = proc.memory_full_info()
    return {"uss": info.uss, "rss": info.rss, "fds": proc.num_fds()}


def _valid(sender: Sender) -> bool:
    chat = {"v": 1, "id": "after", "method": "chat", "params": {
        "messages": [{"role": "user", "content": "weather in Paris?"}], "max_tokens": 32,
        "tools": [_tool({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                        "weather")], "tool_choice": "required"}}
    before = dict(sender.report.replies)
    sender.send("valid", [json.dumps(chat).encode()])
    return sender.report.replies.get("result", 0) > before.get("result", 0)


def _campaign(sender: Sender, n_frames: int, seed: int, kinds: tuple[str, ...], progress: bool,
              trace_pid: int | None = None) -> None:
    report = sender.report
    start = report.frames

    @fixed_seed(seed)
    @settings(max_examples=n_frames, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(frames(kinds))
    def one(case: tuple[str, list[bytes]]) -> None:
        sender.send(*case)
        if trace_pid and (report.frames - start) % CHECKPOINT == 0:
            report.trace.append((report.frames - start, measure(trace_pid)["uss"]))
        if progress and (report.frames - start) % 500 == 0:
            print(f"\r{report.frames - start}/{n_frames} frames, {len(report.failures)} failures", end="",
                  file=sys.stderr, flush=True)

    one()
    if progress:
        print(file=sys.stderr)


def run(endpoint: str, pid: int, n_frames: int, seed: int = 0, bound_s: float = 30.0,
        progress: bool = False, kinds: tuple[str, ...] = KINDS, warmup: int = 300) -> Report:
    """Send `n_frames` generated frames to the daemon at `endpoint` (process `pid`), after
    `warmup` others: the baseline is taken once every kind of frame has been through (the
    allocator keeps the high-water mark of the largest frames; a leak grows past it)."""
    report = Report()
    sender = Sender(endpoint, bound_s, report)
    t0 = time.perf_counter()
    try:
        for _ in range(3):  # the first compile and generation grow the daemon legitimately
            _valid(sender)
        if warmup:
            _campaign(sender, warmup, seed + 1_000_003, kinds, False)
        report.warmup = report.frames
        report.by_kind.clear()  # the figures are of the measured run (its failures stay)
        report.replies.clear()
        report.before = measure(pid)
        _campaign(sender, n_frames, seed, kinds, progress, trace_pid=pid)
        time.sleep(TRIM_WAIT_S)  # the last log writes land; the daemon returns its free heap
        report.served_after = _valid(sender)
        report.after = measure(pid)
        report.same_process = psutil.pid_exists(pid)
    finally:
        sender.close()
        report.wall_s = round(time.perf_counter() - t0, 1)
    return report


def print_report(report: Report, memory_slack: int) -> None:
    print(f"frames sent: {report.frames - report.warmup} after a warm-up of {report.warmup}, "
          f"{report.wall_s:g} s in all")
    for kind, n in sorted(report.by_kind.items()):
        print(f"  {kind:<18} {n}")
    print("replies: " + ", ".join(f"{k} {v}" for k, v in sorted(report.replies.items(), key=lambda kv: -kv[1])))
    print(f"slowest reply: {report.max_reply_s * 1e3:.0f} ms ({report.slowest})")
    b, a = report.before, report.after
    print(f"daemon memory (USS): {b.get('uss', 0) / 2**20:.1f} MiB before, {a.get('uss', 0) / 2**20:.1f} MiB "
          f"after (slack {memory_slack / 2**20:.0f} MiB); open fds {b.get('fds')} before, {a.get('fds')} after")
    if report.trace:
        print("daemon USS along the run: " + ", ".join(f"{n} frames {uss / 2**20:.1f} MiB" for n, uss in report.trace))
    print(f"same daemon process: {report.same_process}; a valid request served after: {report.served_after}")
    print(f"crashes: {0 if report.same_process else 1}; frames without a typed reply: {len(report.failures)}; "
          f"internal errors: {len(report.internal)}")
    for line in (report.failures + report.internal)[:10]:
        print(f"  {line}")


MEMORY_SLACK = 16 << 20  # allocator high-water marks; a leak of one frame's size each would show


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--frames", type=int, default=10_000, help="frames to send (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    ap.add_argument("--bound", type=float, default=30.0, help="seconds a reply may take (default 30)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which kinds of frame (default: all)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="outpost-fuzz-") as tmp:
        data = tiny_data_dir(Path(tmp))
        config = f'manifest_dirs = ["{data / "manifests"}"]\n' + CONFIG
        with ServeProcess(data, config, "fuzz") as daemon:
            report = run(daemon.endpoint, daemon.pid, args.frames, args.seed, args.bound, progress=True,
                         kinds=tuple(args.kinds.split(",")))
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print_report(report, MEMORY_SLACK)
    return 0 if report.ok(MEMORY_SLACK) else 1


if __name__ == "__main__":
    sys.exit(main())
