"""Six everyday agent turns, asked as an agent asks them: the real OpenAI SDK over
`outpost serve --http`, `tool_choice` left out (auto), each streamed and not. SmolLM2-135M
with the rule the catalog ships should decide each the way it should: a call where the
turn needs one, text where it does not (a question no tool serves, and the turn after a
tool's result); MISSED says where it does not yet. The stream and the whole reply decide
alike, and no format marker reaches content, a tool's name or its arguments."""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import SMOLLM2, free_port, make_data_dir, start_daemon
from .test_streaming import reassemble

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current local time",
    "parameters": {"type": "object", "properties": {}}}}
BOOK = {"type": "function", "function": {
    "name": "book_table", "description": "Book a table at a restaurant",
    "parameters": {"type": "object", "properties": {
        "restaurant": {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                       "required": ["name", "city"]},
        "guests": {"type": "integer", "minimum": 1}},
        "required": ["restaurant", "guests"]}}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
FOLLOW_UP = [*PARIS, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18, "sky": "cloudy"}'}]

# name -> (messages, tools, the tool a call must name; None: the turn needs text)
SCENARIOS = {
    "one call": (PARIS, [WEATHER], "get_weather"),
    "parallel": ([{"role": "user", "content": "What is the weather in Paris and in Rome?"}], [WEATHER],
                 "get_weather"),
    "nested, unicode": ([{"role": "user", "content": "Book a table for 4 people at Café Zürich in Genève."}],
                        [BOOK, WEATHER], "book_table"),
    "no arguments": ([{"role": "user", "content": "What time is it?"}], [TIME, WEATHER], "get_time"),
    "after the result": (FOLLOW_UP, [WEATHER], None),
    "needs no tool": ([{"role": "user", "content": "Tell me a joke about cats."}], [WEATHER], None),
}
MARKERS = ("<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>", "<tool_response>")


@pytest.fixture(scope="module")
def sdk(tmp_path_factory, model_cache):
    port = free_port()
    data = make_data_dir(tmp_path_factory.mktemp("agents"), cache=model_cache)
    with start_daemon(data, SMOLLM2, http={"listen": f"127.0.0.1:{port}"}):
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            yield client


# The shipped rule was fitted on BFCL's prompts, which open with BFCL's system prompt:
# these turns have none, and it answers them (or calls a tool too many). Measured, not
# hidden: each is expected to fail until a fit covers plain agent prompts, and a pass
# fails the test (strict) so the marks come off when it does.
MISSED = {"one call": "answers (score -1.39 vs -0.18)", "parallel": "answers (score -1.48)",
          "no arguments": "answers (score -0.50)", "nested, unicode": "also calls get_weather"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=MISSED[n], strict=True))
                                  if n in MISSED else n for n in SCENARIOS])
def test_auto_decides_each_everyday_turn_right(sdk, name):
    messages, tools, tool = SCENARIOS[name]
    whole = sdk.chat.completions.create(model=SMOLLM2, messages=messages, tools=tools, max_tokens=96)
    message = whole.choices[0].message
    decision = whole.model_extra["outpost"]["decision"]
    assert decision["rule"].startswith(f"{SMOLLM2} ")  # the shipped rule decided, not the raw odds
    if tool is None:
        assert decision["choice"] == "answer" and not message.tool_calls and message.content
    else:
        assert decision["choice"] == "call" and message.tool_calls
        assert {c.function.name for c in message.tool_calls} == {tool}
        for call in message.tool_calls:
            assert isinstance(json.loads(call.function.arguments), dict)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_stream_decides_and_answers_as_the_whole_reply_and_no_marker_leaks(sdk, name):
    messages, tools, _ = SCENARIOS[name]
    whole = sdk.chat.completions.create(model=SMOLLM2, messages=messages, tools=tools, max_tokens=96)
    message = whole.choices[0].message
    decision = whole.model_extra["outpost"]["decision"]
    stream = sdk.chat.completions.create(model=SMOLLM2, messages=messages, tools=tools, max_tokens=96, stream=True)
    chunks = [chunk.model_dump() for chunk in stream]
    content, calls, last = reassemble(chunks)
    assert last["outpost"]["decision"]["choice"] == decision["choice"]
    assert content == message.content
    assert [c["function"] for c in calls] == [c.function.model_dump() for c in message.tool_calls or []]
    seen = (content or "") + "".join(c["function"]["name"] + c["function"]["arguments"] for c in calls)
    assert not any(marker in seen for marker in MARKERS)
