"""The optional OpenAI-compatible HTTP door on a real port: `curl` and the real `openai`
SDK over HTTP, streaming as server-sent events, the API key, the same log."""

from __future__ import annotations

import json
import subprocess

import openai
import pytest

from outpost.runtime.daemon.http import listen_address
from outpost.runtime.daemon.settings import HttpSettings
from outpost.runtime.errors import ConfigError

from .conftest import TINY, free_port, make_data_dir, start_daemon
from .test_streaming import reassemble
from .test_wire import TOOLS, USER

KEY = "sk-test-outpost"


@pytest.fixture(scope="module")
def door(tmp_path_factory, tiny_gguf):
    port = free_port()
    data = make_data_dir(tmp_path_factory.mktemp("http"), tiny_gguf)
    with start_daemon(data, TINY, http={"listen": f"127.0.0.1:{port}"}) as daemon:
        yield daemon, f"http://127.0.0.1:{port}/v1"


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


def test_curl_chat_and_a_streamed_chat(door):
    daemon, url = door
    body = {"model": TINY, "messages": USER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60}
    done = curl("-H", "content-type: application/json", "-d", json.dumps(body), f"{url}/chat/completions")
    reply = json.loads(done.stdout)
    assert reply["object"] == "chat.completion" and reply["outpost"]["log_id"] is not None
    streamed = curl("-N", "-H", "content-type: application/json", "-d", json.dumps({**body, "stream": True}),
                    f"{url}/chat/completions").stdout
    events = [line[len("data: "):] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    _, calls, last = reassemble([json.loads(e) for e in events[:-1]])
    assert [c["function"] for c in calls] == [c["function"] for c in reply["choices"][0]["message"]["tool_calls"]]
    assert last["outpost"]["log_id"] == reply["outpost"]["log_id"] + 1  # one daemon, one log


def test_curl_errors_have_statuses(door):
    _, url = door
    missing = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
                   "-d", json.dumps({"model": "nope", "messages": USER}), f"{url}/chat/completions")
    assert missing.stdout == "404"
    broken = curl("-w", "\n%{http_code}", "-d", "{not json", f"{url}/chat/completions").stdout
    assert broken.endswith("400") and json.loads(broken.rsplit("\n", 1)[0])["error"]["code"] == "bad_request"


def test_the_openai_sdk_over_real_http(door):
    _, url = door
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as sdk:
        whole = sdk.chat.completions.create(model=TINY, messages=USER, tools=TOOLS, tool_choice="required",
                                            max_tokens=60)
        chunks = [c.model_dump() for c in sdk.chat.completions.create(
            model=TINY, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=60, stream=True)]
        assert TINY in [m.id for m in sdk.models.list()]
        assert sdk.models.retrieve(TINY).id == TINY
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="nope", messages=USER)
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model=TINY, messages=USER, temperature=9)
        assert info.value.code == "bad_request"
    _, calls, _ = reassemble(chunks)
    assert [c["function"] for c in calls] == [c.function.model_dump() for c in whole.choices[0].message.tool_calls]


def test_off_loopback_needs_an_api_key():
    with pytest.raises(ConfigError):
        listen_address(HttpSettings(listen="0.0.0.0:8080"))
    assert listen_address(HttpSettings(listen="0.0.0.0:8080", api_key=KEY)) == ("0.0.0.0", 8080)
    with pytest.raises(ConfigError):
        listen_address(HttpSettings(listen="8080"))


def test_with_an_api_key_every_request_must_carry_it(tmp_path, tiny_gguf):
    port = free_port()
    data = make_data_dir(tmp_path, tiny_gguf)
    with start_daemon(data, TINY, http={"listen": f"127.0.0.1:{port}", "api_key": KEY}):
        url = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as sdk:
            with pytest.raises(openai.AuthenticationError):
                sdk.models.list()
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0) as sdk:
            assert sdk.chat.completions.create(model=TINY, messages=USER, max_tokens=4).choices
