"""The cloud client against scripted faults (httpx.MockTransport: the real client, a
scripted server), and the daemon's replies when the cloud fails: always an answer."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from outpost.runtime.errors import (BadRequest, CloudCircuitOpen, CloudInvalid, CloudInvalidCall, CloudOverBudget,
                                      CloudRejected, CloudTimeout, CloudUnreachable, OutpostError)
from outpost.runtime.logs import queries, schema
from outpost.runtime.escalation.cloud import CloudClient, retry_after
from outpost.runtime.config import CloudSettings

from .conftest import TINY, make_data_dir, start_daemon

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]


def completion(args: Any = None, content: str | None = None, tokens: tuple[int, int] = (30, 10)) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if args is not None:
        message["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": args if isinstance(args, str) else json.dumps(args)}}]
    return {"id": "x", "object": "chat.completion", "model": "teacher-1",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if args else "stop"}],
            "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}}


class Script:
    """A scripted endpoint: each request gets the next response (the last repeats)."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        if callable(step):
            return step(request)
        return step


def ok(**kw: Any) -> httpx.Response:
    return httpx.Response(200, json=completion(**kw))


def client(script: Script, **cfg: Any) -> tuple[CloudClient, list[float]]:
    slept: list[float] = []

    async def sleep(s: float) -> None:  # record the backoff instead of waiting it out
        slept.append(s)

    settings = CloudSettings(base_url="http://cloud.test/v1", api_key_env="OUTPOST_TEST_KEY",
                             **{"timeout_s": 5.0, "backoff_s": 0.1, **cfg})
    return CloudClient(settings, transport=httpx.MockTransport(script), sleep=sleep), slept


def ask(c: CloudClient, **kw: Any):
    return asyncio.run(c.ask(MESSAGES, TOOLS, "required", False, **kw))


def test_429_with_retry_after_is_honoured(monkeypatch):
    monkeypatch.setenv("OUTPOST_TEST_KEY", "sk-secret")
    script = Script(httpx.Response(429, headers={"Retry-After": "2"}), ok(args={"city": "Oslo"}))
    c, slept = client(script)
    answer = ask(c)
    assert slept == [2.0] and answer.attempts == 2
    assert json.loads(answer.tool_calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert answer.cost_usd == pytest.approx((30 * 0.00015 + 10 * 0.0006) / 1000)
    assert script.requests[0]["tools"] == TOOLS and script.requests[0]["tool_choice"] == "required"


def test_retry_after_as_an_http_date():
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 3) == pytest.approx(3.0)
    assert retry_after("soon", 0) is None


def test_500_then_success():
    c, slept = client(Script(httpx.Response(500), httpx.Response(503), ok(args={"city": "Oslo"})))
    answer = ask(c)
    assert answer.attempts == 3 and len(slept) == 2 and all(0 <= s <= 0.2 for s in slept)


def test_connection_errors_are_retried_then_reported():
    c, slept = client(Script(httpx.ConnectError("refused")), max_retries=2)
    with pytest.raises(CloudUnreachable) as err:
        ask(c)
    assert len(slept) == 2 and err.value.reason == "unreachable"


def test_a_timeout_past_the_deadline():
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return ok(args={"city": "Oslo"})

    settings = CloudSettings(base_url="http://cloud.test/v1", timeout_s=0.3)
    c = CloudClient(settings, transport=httpx.MockTransport(slow))
    t = time.monotonic()
    with pytest.raises(CloudTimeout):
        ask(c)
    assert time.monotonic() - t < 2


def test_a_retry_after_beyond_the_deadline_fails_at_once():
    c, slept = client(Script(httpx.Response(429, headers={"Retry-After": "60"})), timeout_s=1.0)
    with pytest.raises(CloudUnreachable):
        ask(c)
    assert slept == []


def test_truncated_json_is_an_invalid_answer_not_retried():
    body = json.dumps(completion(args={"city": "Oslo"}))[:70]
    script = Script(httpx.Response(200, text=body, headers={"content-type": "application/json"}))
    c, slept = client(script)
    with pytest.raises(CloudInvalid):
        ask(c)
    assert len(script.requests) == 1


def test_a_tool_call_with_invalid_arguments_is_a_failure():
    for args in ({"town": "Oslo"}, '{"city": "Os'):
        c, _ = client(Script(ok(args=args)))
        with pytest.raises(CloudInvalid) as err:
            ask(c)
        assert err.value.data["validation"][0]["valid"] is False
        # Its own type, for the breaker; the same code and reason for everyone else.
        assert isinstance(err.value, CloudInvalidCall) and err.value.code == "cloud_invalid_answer"


def test_an_invalid_tool_call_does_not_trip_the_breaker_but_a_broken_body_does():
    body = json.dumps(completion(args={"city": "Oslo"}))[:70]
    script = Script(ok(args={"town": "Oslo"}), ok(args={"town": "Oslo"}),
                    httpx.Response(200, text=body, headers={"content-type": "application/json"}))
    c, _ = client(script, breaker_failures=1)
    for _ in range(2):  # the endpoint answered: the model was wrong, twice
        with pytest.raises(CloudInvalid):
            ask(c)
        assert c.breaker.state == "closed"
    with pytest.raises(CloudInvalid):  # not a completion at all: the endpoint's failure
        ask(c)
    assert c.breaker.state == "open"


def test_a_400_is_not_retried_and_does_not_trip_the_breaker():
    script = Script(httpx.Response(400, json={"error": "bad"}))
    c, slept = client(script, breaker_failures=1)
    with pytest.raises(CloudRejected):
        ask(c)
    assert len(script.requests) == 1 and c.breaker.state == "closed"


def test_the_breaker_opens_and_closes():
    script = Script(httpx.Response(500), httpx.Response(500), ok(args={"city": "Oslo"}))
    c, _ = client(script, max_retries=0, breaker_failures=2, breaker_cooldown_s=0.2)
    for _ in range(2):
        with pytest.raises(CloudUnreachable):
            ask(c)
    assert c.breaker.state == "open"
    with pytest.raises(CloudCircuitOpen):  # not even sent
        ask(c)
    assert len(script.requests) == 2
    time.sleep(0.25)
    assert ask(c).attempts == 1  # half-open: one try, it succeeds, the breaker closes
    assert c.breaker.state == "closed"


def test_the_daily_cap():
    c, _ = client(Script(ok(args={"city": "Oslo"}, tokens=(60, 40))), daily_max_tokens=150)
    ask(c)
    c.seed(requests_today=1, tokens_today=200)
    with pytest.raises(CloudOverBudget):
        ask(c)


# -- through the daemon: every fault ends with a reply -------------------------------------
def daemon(tmp_path, tiny_gguf, script: Script, policy: str = "on_low_confidence", threshold: float = 1.0):
    data = make_data_dir(tmp_path, tiny_gguf)
    return start_daemon(data, TINY, cloud_transport=httpx.MockTransport(script),
                        escalation={"policy": policy, "threshold": threshold},
                        cloud={"base_url": "http://cloud.test/v1", "model": "teacher-1",
                               "timeout_s": 2.0, "backoff_s": 0.01, "max_retries": 1})


def attempts(d, log_id: int) -> list[dict[str, Any]]:
    return queries.get_request(schema.open_db(d.settings.log_path), log_id)["attempts"]


@pytest.mark.parametrize("fault", [
    httpx.Response(500), httpx.Response(429, headers={"Retry-After": "0"}),
    httpx.ConnectError("refused"), httpx.Response(200, text='{"choices": [{"mess'),
    httpx.Response(200, json=completion(args={"town": "Oslo"})),
])
def test_a_failing_cloud_degrades_to_the_local_answer(tmp_path, tiny_gguf, fault):
    with daemon(tmp_path, tiny_gguf, Script(fault)) as d, d.client() as c:
        reply = c.chat(MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=24)
        out = reply["outpost"]
        assert out["answered_by"] == TINY and out["escalated"] and out["degraded"]
        assert out["degraded_reason"] in ("unreachable", "invalid_answer")
        assert 0.0 <= out["confidence"] <= 1.0 and reply["choices"][0]["message"]["tool_calls"]
        kinds = [(a["kind"], a["error_code"]) for a in attempts(d, out["log_id"])]
        assert kinds[0] == ("local", None) and kinds[1][0] == "cloud" and kinds[1][1].startswith("cloud_")


def test_escalation_answers_from_the_cloud_and_logs_both(tmp_path, tiny_gguf):
    script = Script(ok(args={"city": "Oslo"}))
    with daemon(tmp_path, tiny_gguf, script) as d, d.client() as c:
        reply = c.chat(MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=24)
        out = reply["outpost"]
        assert out["answered_by"] == "teacher-1" and out["escalated"] and not out["degraded"]
        assert json.loads(reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
        assert out["local"]["tool_calls"] and out["cloud"]["cost_usd"] > 0
        local, cloud = attempts(d, out["log_id"])
        assert local["kind"] == "local" and local["confidence"] == out["confidence"]
        assert cloud["kind"] == "cloud" and cloud["model"] == "teacher-1" and cloud["cost_usd"] > 0
        # A request may narrow the policy, not widen it.
        kept = c.chat(MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=24, escalation="off")
        assert kept["outpost"]["answered_by"] == TINY and not kept["outpost"]["escalated"]
        with pytest.raises(BadRequest):
            c.chat(MESSAGES, max_tokens=4, escalation="shadow")
        assert len(script.requests) == 1


def test_shadow_answers_locally_and_logs_the_teacher(tmp_path, tiny_gguf):
    script = Script(ok(args={"city": "Oslo"}))
    with daemon(tmp_path, tiny_gguf, script, policy="shadow") as d, d.client() as c:
        reply = c.chat(MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=24)
        out = reply["outpost"]
        assert out["answered_by"] == TINY and out["shadow"] and not out["escalated"]
        deadline = time.monotonic() + 10
        while len(attempts(d, out["log_id"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        local, cloud = attempts(d, out["log_id"])
        assert cloud["kind"] == "cloud" and cloud["model"] == "teacher-1"


def test_cloud_only_falls_back_to_local_when_the_cloud_is_down(tmp_path, tiny_gguf):
    with daemon(tmp_path, tiny_gguf, Script(httpx.ConnectError("down")), policy="cloud_only") as d, \
            d.client() as c:
        out = c.chat(MESSAGES, max_tokens=4)["outpost"]
        assert out["answered_by"] == TINY and out["degraded"] and out["degraded_reason"] == "unreachable"


def test_policy_resolution_order_and_narrowing():
    from outpost.manifests.schema import Manifest
    from outpost.runtime.config import Settings
    from outpost.runtime.escalation.policy import resolve
    m = Manifest.model_validate({
        "id": "m", "version": "1", "tasks": ["tool_call"], "backend": "gguf", "context_length": 2048,
        "memory_estimate": "1MiB", "escalation_threshold": 0.4,
        "files": [{"name": "m.gguf", "size": 1, "sha256": "0" * 64,
                   "sources": [{"kind": "path", "path": "/x"}]}]})
    base = Settings.load(None, escalation={"policy": "on_low_confidence", "threshold": 0.5})
    assert resolve(base, m, None, None) == ("on_low_confidence", 0.4)  # the manifest's
    per_model = Settings.load(None, escalation={"policy": "on_low_confidence", "threshold": 0.5},
                              models={"m": {"escalation_threshold": 0.6}})
    assert resolve(per_model, m, None, None) == ("on_low_confidence", 0.6)
    per_task = Settings.load(None, escalation={"policy": "off", "tasks": {"tool_call": {"policy": "shadow",
                                                                                      "threshold": 0.7}}})
    assert resolve(per_task, m, "tool_call", None) == ("shadow", 0.7)
    assert resolve(per_task, m, "tool_call", "on_low_confidence") == ("on_low_confidence", 0.7)
    assert resolve(per_task, m, "tool_call", "off")[0] == "off"
    with pytest.raises(BadRequest):
        resolve(base, m, None, "cloud_only")


def test_a_slow_cloud_and_then_an_open_breaker_still_end_in_replies(tmp_path, tiny_gguf):
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return ok(args={"city": "Oslo"})

    data = make_data_dir(tmp_path, tiny_gguf)
    with start_daemon(data, TINY, cloud_transport=httpx.MockTransport(slow),
                      escalation={"policy": "on_low_confidence", "threshold": 1.0},
                      cloud={"base_url": "http://cloud.test/v1", "timeout_s": 0.5, "max_retries": 0,
                             "breaker_failures": 2, "breaker_cooldown_s": 60}) as d, d.client() as c:
        reasons = []
        for _ in range(3):
            t = time.monotonic()
            out = c.chat(MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=24)["outpost"]
            assert out["degraded"] and out["answered_by"] == TINY
            assert time.monotonic() - t < 10
            reasons.append(out["degraded_reason"])
        assert reasons == ["timeout", "timeout", "circuit_open"]
        assert c.status()["escalation"]["cloud"]["breaker"] == "open"


def test_when_the_local_model_cannot_answer_at_all_the_cloud_does(tmp_path, tiny_gguf):
    long = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 150}]  # past the tiny context
    with daemon(tmp_path, tiny_gguf, Script(ok(content="A short answer."))) as d, d.client() as c:
        reply = c.chat(long, max_tokens=8)
        out = reply["outpost"]
        assert out["answered_by"] == "teacher-1" and reply["choices"][0]["message"]["content"] == "A short answer."
        local, cloud = attempts(d, out["log_id"])
        assert (local["kind"], local["error_code"]) == ("local", "context_overflow")
        assert (cloud["kind"], cloud["error_code"]) == ("cloud", None)
    with daemon(tmp_path / "off", tiny_gguf, Script(ok(content="x")), policy="off") as d, d.client() as c:
        with pytest.raises(OutpostError) as err:
            c.chat(long, max_tokens=8)
        assert err.value.code == "context_overflow"
