"""Behaviour with the real default model, SmolLM2-135M-Instruct, greedy decoding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outpost.runtime.errors import WorkerCrashed

from .conftest import REPO, SMOLLM2, TINY, make_data_dir, start_daemon

WEATHER = json.loads((REPO / "examples" / "weather_tool.json").read_text())
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_daemon(tmp_path_factory, model_cache, tiny_gguf):
    running = start_daemon(make_data_dir(tmp_path_factory.mktemp("s"), tiny_gguf, model_cache), SMOLLM2)
    yield running
    running.stop()


def test_weather_in_paris_is_a_get_weather_call(smol_daemon):
    with smol_daemon.client() as client:
        reply = client.chat([{"role": "user", "content": "What is the weather in Paris?"}],
                            tools=WEATHER, tool_choice="required")
    [call] = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert reply["outpost"]["model"] == SMOLLM2 and reply["outpost"]["validation"][0]["valid"]


def test_a_call_streams_through_the_openai_sdk_as_argument_deltas(smol_daemon):
    import openai

    from outpost.runtime.sdk import http_client

    from .test_streaming import reassemble

    asks = [{"role": "user", "content": "What is the weather in San Francisco, in celsius?"}]
    with openai.OpenAI(base_url="http://outpost/v1", api_key="unused", max_retries=0,
                       http_client=http_client(smol_daemon.settings.endpoint)) as sdk:
        whole = sdk.chat.completions.create(model=SMOLLM2, messages=asks, tools=WEATHER,
                                            tool_choice="required")
        chunks = [c.model_dump() for c in sdk.chat.completions.create(
            model=SMOLLM2, messages=asks, tools=WEATHER, tool_choice="required", stream=True)]
    _, calls, last = reassemble(chunks)
    assert [c["function"] for c in calls] == [c.function.model_dump() for c in whole.choices[0].message.tool_calls]
    # The arguments came as they were decoded, not in one piece at the end.
    pieces = [d for c in chunks[:-1] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert sum(1 for p in pieces if (p.get("function") or {}).get("arguments")) >= 3
    assert last["outpost"]["validation"][0]["valid"] and last["usage"]["completion_tokens"] > 0


def test_multi_turn_with_a_tool_result_answers_in_text(smol_daemon):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "sunny"}'},
    ]
    with smol_daemon.client() as client:
        reply = client.chat(messages, tools=WEATHER, tool_choice="none", max_tokens=40)
    text = reply["choices"][0]["message"]["content"]
    assert "21" in text or "sunny" in text.lower(), text


def test_plain_chat_without_tools(smol_daemon):
    with smol_daemon.client() as client:
        reply = client.chat([{"role": "user", "content": "What is the capital of France?"}],
                            max_tokens=24)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["outpost"]["constrained"] is False


def test_a_killed_worker_fails_its_request_and_the_model_reloads(smol_daemon):
    with smol_daemon.client() as client:
        client.chat([{"role": "user", "content": "hi"}], model=TINY, max_tokens=2)
        pid = next(w["pid"] for w in client.status()["loaded"] if w["model"] == TINY)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        client.chat([{"role": "user", "content": "hi"}], model=SMOLLM2, max_tokens=2)
        with pytest.raises(WorkerCrashed):
            _chat_while_killing(client)
        for model in (TINY, SMOLLM2):  # both reload on their next request
            reply = client.chat([{"role": "user", "content": "hi"}], model=model, max_tokens=2)
            assert reply["outpost"]["model"] == model
        new_pid = next(w["pid"] for w in client.status()["loaded"] if w["model"] == TINY)
        assert new_pid != pid


def _chat_while_killing(client):
    """Kill the SmolLM2 worker while it is generating a long answer."""
    pid = next(w["pid"] for w in client.status()["loaded"] if w["model"] == SMOLLM2)
    killer = subprocess.Popen([sys.executable, "-c",
                               f"import os,signal,time; time.sleep(0.5); os.kill({pid}, signal.SIGKILL)"])
    try:
        client.chat([{"role": "user", "content": "Write a long story about the sea."}],
                    model=SMOLLM2, max_tokens=1500)
    finally:
        killer.wait()


def test_cli_make_run_flow(tmp_path, model_cache):
    """The acceptance path: `outpost serve`, then `outpost call --tools ... --json`, then
    `outpost logs list`, as separate processes on a real ipc socket."""
    data = make_data_dir(tmp_path, None, model_cache)
    env = {**os.environ, "OUTPOST_DATA_DIR": str(data),
           "OUTPOST_ENDPOINT": f"ipc://{data}/cli.sock"}
    exe = str(Path(sys.executable).with_name("outpost"))
    server = subprocess.Popen([exe, "serve"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        banner = ""
        while "outpost call" not in banner:  # the ready-to-paste line ends the banner
            line = server.stdout.readline()
            assert line, f"serve exited early: {banner}"
            banner += line
        assert f"listening on ipc://{data}/cli.sock" in banner
        out = subprocess.run([exe, "call", "--tools", "examples/weather_tool.json",
                              "What is the weather in Paris?", "--json"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        [call] = reply["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert "paris" in json.loads(call["function"]["arguments"])["city"].lower()
        logs = subprocess.run([exe, "logs", "list", "--json"], env=env, capture_output=True,
                              text=True, timeout=60)
        [row] = json.loads(logs.stdout)
        assert row["id"] == reply["outpost"]["log_id"] and row["tool_calls"][0]["function"]["name"] == "get_weather"
        shown = subprocess.run([exe, "logs", "show", str(row["id"]), "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)["messages"][0]["content"] == "What is the weather in Paris?"
        bad = subprocess.run([exe, "call", "--model", "nope", "hi"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "unknown_model" in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert server.returncode == 0
    gone = subprocess.run([exe, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 3
