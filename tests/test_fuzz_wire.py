"""The fuzzed door (tools/fuzz_wire.py): generated frames against `outpost serve` in its
own process, every one answered with a typed reply, the daemon alive and back to its
baseline after. The short run is in the fast suite; the 10,000-frame one is slow."""

from __future__ import annotations

import pytest

from outpost.runtime.errors import UnsupportedSchema
from outpost.tools import fuzz_wire
from outpost.tools.serve_process import ServeProcess
from outpost.tools.tiny_gguf import tiny_data_dir


def _fuzz(tmp_path, frames: int, seed: int) -> fuzz_wire.Report:
    data = tiny_data_dir(tmp_path)
    config = f'manifest_dirs = ["{data / "manifests"}"]\n' + fuzz_wire.CONFIG
    with ServeProcess(data, config, "fuzz") as daemon:
        report = fuzz_wire.run(daemon.endpoint, daemon.pid, frames, seed)
    fuzz_wire.print_report(report, fuzz_wire.MEMORY_SLACK)
    return report


def _check(report: fuzz_wire.Report, frames: int) -> None:
    assert report.frames - report.warmup >= frames
    assert report.failures == [], report.failures[:5]
    assert report.internal == [], report.internal[:5]
    assert report.same_process and report.served_after
    assert report.after["fds"] <= report.before["fds"]
    assert report.after["uss"] <= report.before["uss"] + fuzz_wire.MEMORY_SLACK
    # Every kind was sent, and most frames were refused at the door, typed.
    assert {k.split(":")[0] for k in report.by_kind} >= {"bytes", "truncated", "deep", "numbers", "types",
                                                        "multipart", "giant", "schemas"}
    assert report.replies["bad_request"] > frames // 2


def test_a_thousand_fuzzed_frames(tmp_path):
    _check(_fuzz(tmp_path, 1000, seed=1), 1000)


@pytest.mark.slow
def test_ten_thousand_fuzzed_frames(tmp_path):
    _check(_fuzz(tmp_path, 10_000, seed=0), 10_000)


def test_a_grammar_over_its_compile_time_is_refused_and_its_worker_replaced(tmp_path):
    data = tiny_data_dir(tmp_path)
    config = (f'manifest_dirs = ["{data / "manifests"}"]\ndefault_model = "tiny-random"\n'
              '[server]\ngrammar_timeout_s = 0.0005\n')
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {
        "x": {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                        for i in range(200)]}}, "required": ["x"]}}}]
    with ServeProcess(data, config, "slowgrammar") as daemon, daemon.client(60) as c:
        assert c.chat([{"role": "user", "content": "hi"}], max_tokens=2)["outpost"]["model"] == "tiny-random"
        pid = c.status()["loaded"][0]["pid"]
        with pytest.raises(UnsupportedSchema) as refused:
            c.chat([{"role": "user", "content": "pick"}], tools=tools, tool_choice="required", max_tokens=8)
        assert refused.value.data["keyword"] == "compile_timeout"
        # The worker that started the compile is gone; a new one serves the next request.
        assert c.chat([{"role": "user", "content": "hi"}], max_tokens=2)["outpost"]["model"] == "tiny-random"
        assert c.status()["loaded"][0]["pid"] != pid
        assert daemon.proc.poll() is None
