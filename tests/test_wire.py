"""The wire protocol through a real ROUTER socket, with the tiny random model behind it.

Every bad input gets an error reply with its code, and the daemon keeps serving."""

from __future__ import annotations

import json
import os
import signal
import sqlite3

import pytest
import zmq

from outpost.runtime.errors import (ConfigError, ContextOverflow, InvalidSchema, UnknownModel,
                                      WorkerCrashed)
from outpost.runtime.config import Settings
from outpost.runtime.logs.queries import get_request
from outpost.runtime.logs.schema import open_db

from .conftest import TINY, RunningDaemon, make_data_dir

# Bounded arguments (enums only), so even random weights must finish a call.
TOOLS = [
    {"type": "function", "function": {"name": "set_mode", "parameters": {
        "type": "object", "properties": {"mode": {"enum": ["eco", "fast"]},
                                         "level": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["mode", "level"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "halt", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}},
]
USER = [{"role": "user", "content": "go"}]


@pytest.fixture
def raw(tiny_daemon):
    """A bare DEALER socket, to send frames no well-behaved client would."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(tiny_daemon.settings.endpoint)

    def send(*frames: bytes) -> dict:
        sock.send_multipart(list(frames))
        assert sock.poll(30_000), "no reply"
        return json.loads(sock.recv_multipart()[-1])

    yield send
    sock.close()
    ctx.term()


def ok(client) -> None:
    assert client.ping()["pong"] is True


@pytest.mark.parametrize("frame, code", [
    (b"not json", "bad_request"),
    (b"\xff\xfe{}", "bad_request"),
    (b"[1, 2]", "bad_request"),
    (b'{"v": 2, "id": "a", "method": "ping"}', "bad_request"),
    (b'{"v": 1, "id": 7, "method": "ping"}', "bad_request"),
    (b'{"v": 1, "method": "ping"}', "bad_request"),
    (b'{"v": 1, "id": "a", "method": "ping", "extra": 1}', "bad_request"),
    (b'{"v": 1, "id": "a", "method": "launch"}', "unknown_method"),
    (b'{"v": 1, "id": "a", "method": "chat", "params": {"messages": "hi"}}', "bad_request"),
    (b'{"v": 1, "id": "a", "method": "chat", "params": {"messages": []}}', "bad_request"),
    (b'{"v": 1, "id": "a", "method": "chat", "params": {"messages": [{"role": "robot", "content": "x"}]}}',
     "bad_request"),
    (b'{"v": 1, "id": "a", "method": "chat", "params": {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}}',
     "bad_request"),
])
def test_malformed_frames_get_typed_errors_and_the_daemon_keeps_serving(raw, client, frame, code):
    reply = raw(frame)
    assert reply["v"] == 1
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    ok(client)


def test_error_reply_echoes_the_request_id_and_names_the_field(raw):
    reply = raw(b'{"v": 1, "id": "req-9", "method": "chat", "params": {"messages": [], "max_tokens": -1}}')
    assert reply["id"] == "req-9"
    fields = {e["field"] for e in reply["error"]["data"]["errors"]}
    assert {"messages", "max_tokens"} <= fields


def test_oversized_frame_is_refused_with_its_size(raw, client, tiny_daemon):
    limit = tiny_daemon.settings.server.max_request_bytes
    big = json.dumps({"v": 1, "id": "big", "method": "chat",
                      "params": {"messages": [{"role": "user", "content": "x" * (limit + 10)}]}})
    reply = raw(big.encode())
    assert reply["error"]["code"] == "request_too_large"
    assert reply["error"]["data"]["limit"] == limit
    ok(client)


def test_two_payload_frames_are_refused(raw, client):
    assert raw(b"{}", b"{}")["error"]["code"] == "bad_request"
    ok(client)


def test_req_socket_delimiter_is_accepted_and_mirrored(tiny_daemon):
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)  # REQ adds and expects the empty delimiter frame
    req.linger = 0
    req.connect(tiny_daemon.settings.endpoint)
    req.send(b'{"v": 1, "id": "r1", "method": "ping"}')
    assert req.poll(10_000)
    reply = json.loads(req.recv())
    assert reply == {"v": 1, "id": "r1", "result": reply["result"]} and reply["result"]["pong"]
    req.close()
    ctx.term()


def test_unknown_model_is_an_error_never_a_default(client):
    with pytest.raises(UnknownModel) as info:
        client.chat(USER, model="no-such-model")
    assert info.value.code == "unknown_model"
    assert "tiny-random" in info.value.known
    ok(client)


def test_prompt_longer_than_the_context(client):
    # The tiny model's vocabulary is bytes, so 3000 characters are 3000+ tokens > 2048.
    with pytest.raises(ContextOverflow) as info:
        client.chat([{"role": "user", "content": "ab" * 1500}])
    assert info.value.n_ctx == 2048 and info.value.n_tokens > 2048
    reply = client.chat(USER, tools=TOOLS, tool_choice="required", max_tokens=200)
    assert reply["choices"][0]["message"]["tool_calls"]


def test_tool_schema_that_is_not_json_schema(client):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}]
    with pytest.raises(InvalidSchema) as info:
        client.chat(USER, tools=bad, tool_choice="required")
    assert info.value.code == "invalid_schema" and info.value.tool == "f"
    ok(client)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_call_is_well_formed_even_from_random_weights(client, seed):
    reply = client.chat(USER, tools=TOOLS, tool_choice="required", max_tokens=300,
                        temperature=1.0, seed=seed)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    for call in choice["message"]["tool_calls"]:
        args = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] in {"set_mode", "halt"}
        if call["function"]["name"] == "set_mode":
            assert args["mode"] in ("eco", "fast") and args["level"] in (1, 2, 3)
    assert all(v["valid"] for v in reply["outpost"]["validation"])


def test_named_tool_choice_forces_that_tool(client):
    choice = {"type": "function", "function": {"name": "set_mode"}}
    reply = client.chat(USER, tools=TOOLS, tool_choice=choice, max_tokens=300,
                        parallel_tool_calls=False, temperature=1.0, seed=3)
    calls = reply["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["set_mode"]


def test_named_tool_choice_must_name_a_given_tool(client):
    choice = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(Exception) as info:
        client.chat(USER, tools=TOOLS, tool_choice=choice)
    assert info.value.code == "bad_request"


def test_tool_choice_none_never_calls(client):
    reply = client.chat(USER, tools=TOOLS, tool_choice="none", max_tokens=20)
    message = reply["choices"][0]["message"]
    assert "tool_calls" not in message and reply["outpost"]["constrained"] is False


def test_reply_shape_and_its_log_row(client, tiny_daemon):
    reply = client.chat(USER, tools=TOOLS, tool_choice="required", max_tokens=300, seed=1)
    meta = reply["outpost"]
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny-random"
    assert set(meta["timings_ms"]) == {"queue", "load", "prefill", "decode", "total"}
    assert reply["usage"]["total_tokens"] == (reply["usage"]["prompt_tokens"]
                                              + reply["usage"]["completion_tokens"])
    db = open_db(tiny_daemon.settings.log_path)
    row = get_request(db, meta["log_id"])
    assert row["model"] == "tiny-random" and row["model_version"] == "1"
    assert row["messages"] == USER
    assert row["tools"] == json.loads(json.dumps(TOOLS, sort_keys=True))
    assert row["tool_calls"] == reply["choices"][0]["message"]["tool_calls"]
    assert row["attempts"][0]["kind"] == "local" and row["attempts"][0]["constrained"] == 1
    db.conn.close()


def test_failed_requests_are_logged_too(client, tiny_daemon):
    with pytest.raises(ContextOverflow) as info:
        client.chat([{"role": "user", "content": "z" * 3000}])
    conn = sqlite3.connect(tiny_daemon.settings.log_path)
    code, = conn.execute("select error_code from requests where id = ?",
                         [info.value.log_id]).fetchone()
    conn.close()
    assert code == "context_overflow"


def test_status_and_models_list(client):
    status = client.status()
    assert status["default_model"] == "tiny-random"
    assert any(w["model"] == "tiny-random" for w in status["loaded"])
    models = {m["id"]: m for m in client.models()}
    assert models["tiny-random"]["pulled"] and models["tiny-random"]["loaded"]
    assert not models["gemma-3-270m"]["pulled"]


def test_tcp_loopback_is_served_and_other_hosts_refused(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    ctx.term()
    base = dict(data_dir=data, default_model=TINY, manifest_dirs=[data / "manifests"])
    running = RunningDaemon(Settings.load(None, endpoint=f"tcp://127.0.0.1:{port}", **base))
    try:
        with running.client() as c:
            assert c.ping()["pong"]
    finally:
        running.stop()
    with pytest.raises(ConfigError):
        RunningDaemon(Settings.load(None, endpoint="tcp://0.0.0.0:5555", **base))


def test_a_second_daemon_does_not_steal_a_live_endpoint(tiny_daemon, client):
    with pytest.raises(ConfigError) as info:
        RunningDaemon(tiny_daemon.settings)
    assert "already serving" in info.value.message
    ok(client)


def test_a_request_to_a_just_killed_worker_is_answered_not_hung(tiny_daemon):
    with tiny_daemon.client(timeout_s=20) as c:  # a hang would surface as DaemonUnreachable
        c.chat(USER, max_tokens=2)
        pid = next(w["pid"] for w in c.status()["loaded"] if w["model"] == TINY)
        os.kill(pid, signal.SIGKILL)
        try:
            reply = c.chat(USER, max_tokens=2)
            assert reply["outpost"]["model"] == TINY  # the pool noticed first and reloaded
        except WorkerCrashed as exc:
            assert exc.code == "worker_crashed"
        assert c.chat(USER, max_tokens=2)["outpost"]["model"] == TINY
