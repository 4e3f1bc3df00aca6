"""The escalation flow on its own: a scripted local attempt and a scripted cloud (the
real CloudClient over httpx.MockTransport). No daemon, no model: each policy's path,
and what the outcome says happened, with the log records it turns into."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from outpost.models.backend import Generation
from outpost.runtime.config import CloudSettings, ConfidenceSettings
from outpost.runtime.errors import ContextOverflow, Timeout
from outpost.runtime.escalation.attempts import attempts
from outpost.runtime.escalation.cloud import CloudClient
from outpost.runtime.escalation.flow import Escalator, Outcome, Turn
from outpost.runtime.escalation.settings import Policy
from outpost.runtime.logs.records import AttemptKind

from .test_cloud import MESSAGES, TOOLS, Script, ok

CALL = [{"id": "call_0", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo"}'}}]


def generation(logprob: float, valid: bool = True) -> Generation:
    """A local answer whose one free token had this log-probability."""
    return Generation(
        text='<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
        content=None, tool_calls=CALL, finish_reason="tool_calls", prompt_tokens=20,
        completion_tokens=12, prefill_ms=5.0, decode_ms=40.0, constrained=True,
        logprobs=[0.0, logprob],
        validation=[{"name": "get_weather", "valid": valid, "errors": [],
                     "logprob": {"mean": logprob / 2, "min": logprob, "sum": logprob, "free": 1}}])


class Local:
    """A scripted local attempt: returns its answer, or raises its error; counts calls."""

    def __init__(self, answer: Generation | Exception) -> None:
        self.answer, self.calls = answer, 0

    async def __call__(self) -> Generation:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def run(policy: Policy, local: Local, script: Script | None, threshold: float = 0.5) -> Outcome:
    cfg = CloudSettings(base_url="http://cloud.test/v1" if script else None, max_retries=0,
                        api_key_env=None)
    cloud = CloudClient(cfg, transport=httpx.MockTransport(script) if script else None)
    turn = Turn(model="local-1", policy=policy, threshold=threshold, messages=MESSAGES, tools=TOOLS,
                tool_choice="required", cloud_tool_choice="required", parallel_tool_calls=False,
                max_tokens=64)

    async def go() -> Outcome:
        try:
            return await Escalator(cloud, ConfidenceSettings()).run(turn, local)
        finally:
            await cloud.close()

    return asyncio.run(go())


def kinds(outcome: Outcome) -> list[tuple[str, str | None]]:
    return [(a.kind, a.error_code) for a in attempts(outcome, "local-1", "1", "teacher-cfg")]


def test_off_answers_locally_and_never_asks():
    script = Script(ok(args={"city": "Oslo"}))
    out = run(Policy.OFF, Local(generation(-5.0)), script)
    assert out.generation is not None and out.cloud is None and not out.asked_cloud
    assert out.confidence is not None and out.confidence < 0.5 and script.requests == []
    assert kinds(out) == [("local", None)]


def test_a_confident_local_answer_stays_local():
    script = Script(ok(args={"city": "Oslo"}))
    out = run(Policy.ON_LOW_CONFIDENCE, Local(generation(-0.01)), script)
    assert out.confidence > 0.5 and out.cloud is None and script.requests == []


def test_low_confidence_escalates_and_both_attempts_are_kept():
    script = Script(ok(args={"city": "Oslo"}))
    out = run(Policy.ON_LOW_CONFIDENCE, Local(generation(-5.0)), script)
    assert out.cloud is not None and out.cloud.model == "teacher-1" and out.degraded_reason is None
    assert script.requests[0]["tool_choice"] == "required" and script.requests[0]["max_tokens"] == 64
    records = attempts(out, "local-1", "1", "teacher-cfg")
    assert [r.kind for r in records] == [AttemptKind.LOCAL, AttemptKind.CLOUD]
    assert records[0].confidence == out.confidence and records[1].model == "teacher-1"
    assert records[1].cost_usd and records[1].error_code is None


def test_an_invalid_call_is_escalated_whatever_its_probabilities():
    script = Script(ok(args={"city": "Oslo"}))
    out = run(Policy.ON_LOW_CONFIDENCE, Local(generation(-0.01, valid=False)), script)
    assert out.confidence == 0 and out.confidence_parts["invalid"] and out.cloud is not None


def test_a_failing_cloud_degrades_to_the_local_answer():
    script = Script(httpx.Response(500, json={}))
    out = run(Policy.ON_LOW_CONFIDENCE, Local(generation(-5.0)), script)
    assert out.answered and out.cloud is None and out.generation is not None
    assert out.degraded_reason == "unreachable"  # a 5xx past its retries: the endpoint is down
    assert kinds(out) == [("local", None), ("cloud", "cloud_unreachable")]
    # The failed cloud attempt is logged under the configured model's name.
    assert attempts(out, "local-1", "1", "teacher-cfg")[1].model == "teacher-cfg"


def test_no_cloud_configured_degrades_with_not_configured():
    out = run(Policy.ON_LOW_CONFIDENCE, Local(generation(-5.0)), None)
    assert out.generation is not None and out.degraded_reason == "not_configured"


def test_shadow_answers_locally_and_leaves_the_cloud_for_later():
    script = Script(ok(args={"city": "Oslo"}))
    out = run(Policy.SHADOW, Local(generation(-5.0)), script)
    assert out.shadow and out.generation is not None and not out.asked_cloud and script.requests == []


def test_cloud_only_asks_the_cloud_first_and_skips_the_local_model():
    local = Local(generation(-0.01))
    out = run(Policy.CLOUD_ONLY, local, Script(ok(content="Sunny.")))
    assert out.cloud is not None and out.cloud.content == "Sunny." and local.calls == 0
    assert out.confidence is None and kinds(out) == [("cloud", None)]


def test_cloud_only_falls_back_to_the_local_model():
    local = Local(generation(-0.01))
    out = run(Policy.CLOUD_ONLY, local, Script(httpx.ConnectError("down")))
    assert local.calls == 1 and out.generation is not None and out.degraded_reason == "unreachable"
    assert kinds(out) == [("local", None), ("cloud", "cloud_unreachable")]


def test_a_local_failure_is_answered_by_the_cloud_when_the_policy_allows():
    script = Script(ok(content="A short answer."))
    out = run(Policy.ON_LOW_CONFIDENCE, Local(ContextOverflow(5000, 2048)), script)
    assert out.cloud is not None and out.local_error.code == "context_overflow"
    assert kinds(out) == [("local", "context_overflow"), ("cloud", None)]


@pytest.mark.parametrize("policy", [Policy.OFF, Policy.ON_LOW_CONFIDENCE])
def test_a_local_failure_nobody_answers_is_the_agents_error(policy):
    script = Script(httpx.ConnectError("down"))
    out = run(policy, Local(Timeout("local-1", 1.0, "the model to load")), script)
    assert not out.answered and out.local_error.code == "timeout"
    if policy is Policy.OFF:  # nothing was escalated: the request row alone says what failed
        assert kinds(out) == [] and script.requests == []
    else:
        assert kinds(out) == [("local", "timeout"), ("cloud", "cloud_unreachable")]


def test_a_named_tool_choice_reaches_the_cloud_in_openais_shape():
    script = Script(ok(args={"city": "Oslo"}))
    named = {"type": "function", "function": {"name": "get_weather"}}
    cloud = CloudClient(CloudSettings(base_url="http://cloud.test/v1", api_key_env=None),
                        transport=httpx.MockTransport(script))
    turn = Turn(model="m", policy=Policy.CLOUD_ONLY, threshold=0.5, messages=MESSAGES, tools=TOOLS,
                tool_choice="get_weather", cloud_tool_choice=named, parallel_tool_calls=True,
                max_tokens=8)
    out = asyncio.run(Escalator(cloud, ConfidenceSettings()).run(turn, Local(generation(-0.01))))
    assert out.cloud is not None and script.requests[0]["tool_choice"] == named
    assert json.loads(out.cloud.tool_calls[0]["function"]["arguments"]) == {"city": "Oslo"}
