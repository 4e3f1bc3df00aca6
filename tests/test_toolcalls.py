"""OpenAI tool semantics end to end: tool_choice modes, parallel calls, multi-turn,
validation reports, per-call log-probabilities, and calls that would never have
closed (a repetition loop, max_tokens mid-call) closed and flagged.

The tiny random model proves what the grammar guarantees whatever the weights;
SmolLM2-135M shows it on a real model (greedy decoding, so the replies are fixed).
"""

from __future__ import annotations

import json

import pytest

from outpost.models import toolcalls
from outpost.models.grammar import GrammarCache, TokenMask, Vocabulary
from outpost.models.decoding import cut_quality as _cut_quality, degenerate_loop as _degenerate_loop
from outpost.models.templates import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

from .conftest import REPO, SMOLLM2, make_data_dir, start_daemon

WEATHER = json.loads((REPO / "examples" / "weather_tool.json").read_text())
TRIP = [{"type": "function", "function": {
    "name": "plan_trip", "description": "Plan a road trip and estimate its driving time.",
    "parameters": {"type": "object", "properties": {
        "origin": {"type": "string", "description": "Where the trip starts."},
        "destination": {"type": "string", "description": "Where the trip ends."},
        "stops": {"type": "array", "items": {"type": "string"}, "description": "Places to stop on the way."}},
        "required": ["origin", "destination", "stops"]}}}]
SERIES = [{"type": "function", "function": {
    "name": "plot_series", "description": "Plot a series of numbers.",
    "parameters": {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"}}},
                   "required": ["values"]}}}]
NOTE = [{"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["text", "tags"]}}}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- the grammar itself, on exact text -----------------------------------------------------
BYTES = Vocabulary(pieces=[bytes([i]) for i in range(256)] + [b""], stop_ids=[256], size=257)


def call_text(name: str, args: dict) -> str:
    return f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n{TOOL_CALL_CLOSE}'


@pytest.mark.parametrize("parallel, accepted", [(True, True), (False, False)])
def test_parallel_tool_calls_decides_whether_a_second_call_may_follow(parallel, accepted):
    grammars = GrammarCache(BYTES)
    mask = TokenMask(grammars.compiled(WEATHER, "required", parallel), BYTES.size)
    one = call_text("get_weather", {"city": "Paris"})
    assert mask.matcher.accept_string(one.encode())
    second = "\n" + call_text("get_weather", {"city": "Rome"})
    assert mask.matcher.accept_string(second.encode()) is accepted


def test_auto_decodes_under_the_grammar_of_the_side_it_decided():
    """A turn decided for an answer is text that never opens a call; one decided for a
    call is calls and nothing else, the grammar `required` compiles (shared with it)."""
    grammars = GrammarCache(BYTES)
    text = TokenMask(grammars.answer(), BYTES.size)
    assert text.matcher.accept_string(b"It is sunny.") and text.matcher.accept_token(256)
    assert not TokenMask(grammars.answer(), BYTES.size).matcher.accept_string(b"so: <tool_call>")
    calls = TokenMask(grammars.compiled(WEATHER, "auto", True), BYTES.size)
    assert not calls.matcher.accept_string(b"It is")
    broken = TokenMask(grammars.compiled(WEATHER, "required", True), BYTES.size)  # from the cache
    assert not broken.matcher.accept_string(b'<tool_call>\n{"name": "get_weather", "arguments": {"town": 1}}')
    assert grammars.stats()["misses"] == 1 and grammars.stats()["hits"] == 1


# -- loop and length repair, the pieces ---------------------------------------------------
def test_degenerate_loop_detection():
    assert _degenerate_loop([1, 2, 3] * 3) is None  # too short to call a loop
    assert _degenerate_loop(list(range(40))) is None  # a counting sequence is no loop
    assert _degenerate_loop([9] + [1, 2, 3, 4] * 5) == (16, 4)  # keep one copy of the four
    assert _degenerate_loop([7] * 20) == (19, 1)


def test_a_loop_is_cut_where_the_call_closes_cleanly():
    def quality(text: bytes, at: bytes) -> int:
        head = b'<tool_call>\n{"name": "f", "arguments": '
        return _cut_quality(bytearray(head + text), len(head + at))

    assert quality(b'{"stops": ["A B", "A B', b'{"stops": ["A B", "A') == 2  # mid-string
    assert quality(b'{"stops": ["A B", "A B", "', b'{"stops": ["A B", "A B') == 1  # string whole
    assert quality(b'{"n": 1, ', b'{"n": 1, ') == 3  # after a comma
    assert quality(b'{"n": 1}', b'{"n": 1') == 0


# -- through the daemon --------------------------------------------------------------------
def test_tiny_model_calls_always_close_under_max_tokens(client):
    """Random weights write long strings; max_tokens arrives mid-call every time, and
    every call still comes back closed, valid and flagged."""
    for seed in range(4):
        reply = client.chat(user("write"), tools=NOTE, tool_choice="required", max_tokens=120,
                            parallel_tool_calls=False, temperature=0.7, seed=seed)
        [report] = reply["outpost"]["validation"]
        assert report["valid"], report
        assert report["repaired"] == "length"
        assert reply["usage"]["completion_tokens"] <= 120


def test_parallel_calls_come_back_as_several_valid_calls(client):
    """Sampling from random weights under the grammar: with parallel_tool_calls some
    answers hold several calls, every one valid; without it, never more than one."""
    from .test_wire import TOOLS

    counts = {True: [], False: []}
    for parallel in counts:
        for seed in range(12):
            reply = client.chat(user("go"), tools=TOOLS, tool_choice="required", max_tokens=200,
                                parallel_tool_calls=parallel, temperature=1.0, seed=seed)
            calls = reply["choices"][0]["message"]["tool_calls"]
            assert all(r["valid"] for r in reply["outpost"]["validation"])
            assert len(reply["outpost"]["validation"]) == len(calls)
            counts[parallel].append(len(calls))
    assert max(counts[True]) >= 2, counts
    assert max(counts[False]) == 1, counts


def test_validator_reports_what_the_grammar_cannot_enforce(client):
    """oneOf is decoded as anyOf: a value that matches both alternatives is produced by
    the grammar and caught by the validator, and the reply says so."""
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"oneOf": [{"const": 1}, {"enum": [1]}]}},
        "required": ["n"], "additionalProperties": False}}}]
    reply = client.chat(user("pick"), tools=tools, tool_choice="required")
    [report] = reply["outpost"]["validation"]
    assert report["valid"] is False
    assert any("valid under each of" in e for e in report["errors"]), report["errors"]
    assert json.loads(reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"n": 1}


def test_auto_on_random_weights_is_text_or_valid_calls(client):
    for seed in range(4):
        reply = client.chat(user("weather?"), tools=WEATHER, tool_choice="auto", max_tokens=60,
                            temperature=1.0, seed=seed)
        message = reply["choices"][0]["message"]
        assert all(r["valid"] for r in reply["outpost"]["validation"])
        if not message.get("tool_calls"):
            assert TOOL_CALL_OPEN not in (message["content"] or "")


def test_loose_parsing_is_for_unconstrained_output_only():
    text = 'Sure. {"name": "get_weather", "arguments": {"city": "Oslo"}} Done.'
    content, calls = toolcalls.parse(text, loose=True)
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}] and content == "Sure.  Done."
    assert toolcalls.parse(text)[1] == []  # under a grammar, JSON in text stays text


@pytest.fixture(scope="module")
def smol(tmp_path_factory, model_cache, tiny_gguf):
    running = start_daemon(make_data_dir(tmp_path_factory.mktemp("tc"), tiny_gguf, model_cache), SMOLLM2)
    with running.client() as c:
        yield c
    running.stop()


@pytest.mark.slow
def test_a_repetition_loop_is_cut_and_the_call_closed(smol):
    reply = smol.chat(user("Plan a trip from Santa Barbara to Santa Barbara."), tools=TRIP,
                      tool_choice="required", parallel_tool_calls=False, max_tokens=128)
    [call] = reply["choices"][0]["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    [report] = reply["outpost"]["validation"]
    assert report == {**report, "valid": True, "repaired": "loop"}
    assert len(args["stops"]) <= 2, args  # greedy SmolLM2 would repeat it until max_tokens
    assert reply["outpost"]["repaired"] == 1 and reply["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.slow
def test_a_streamed_loop_is_cut_without_taking_back_what_was_sent(smol):
    from .test_streaming import reassemble

    chunks = list(smol.chat_stream(user("Plan a trip from Santa Barbara to Santa Barbara."), tools=TRIP,
                                   tool_choice="required", parallel_tool_calls=False, max_tokens=128))
    _, [call], last = reassemble(chunks)
    [report] = last["outpost"]["validation"]
    assert report == {**report, "valid": True, "repaired": "loop"}
    assert len(json.loads(call["function"]["arguments"])["stops"]) <= 2
    assert len(chunks) > 5  # it streamed while it decoded


@pytest.mark.slow
def test_a_list_that_outgrows_max_tokens_is_closed_valid(smol):
    reply = smol.chat(user("Plot the numbers from 1 to 100."), tools=SERIES, tool_choice="required",
                      parallel_tool_calls=False, max_tokens=64)
    [report] = reply["outpost"]["validation"]
    assert report["valid"] and report["repaired"] == "length"
    values = json.loads(reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])["values"]
    assert values[:5] == [1, 2, 3, 4, 5]
    assert reply["usage"]["completion_tokens"] <= 64


@pytest.mark.slow
def test_named_tool_choice_and_per_call_log_probabilities(smol):
    tools = WEATHER + TRIP
    reply = smol.chat(user("What is the weather in Paris?"), tools=tools,
                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    [report] = reply["outpost"]["validation"]
    stats = report["logprob"]
    assert report["valid"] and report["repaired"] is None
    assert stats["tokens"] > 0 and stats["min"] <= stats["mean"] <= 0.0
    assert reply["outpost"]["logprob"]["min"] <= stats["min"]


@pytest.mark.slow
def test_multi_turn_a_tool_result_then_a_new_call(smol):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
        {"role": "user", "content": "And the weather in Rome?"},
    ]
    reply = smol.chat(messages, tools=WEATHER, tool_choice="required")
    [call] = reply["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}


@pytest.mark.slow
def test_unconstrained_mode_decodes_freely_and_still_validates(smol):
    reply = smol.chat(user("What is the weather in Paris?"), tools=WEATHER, tool_choice="required",
                      constrained=False, max_tokens=48)
    assert reply["outpost"]["constrained"] is False
    calls = reply["choices"][0]["message"].get("tool_calls") or []
    assert len(reply["outpost"]["validation"]) == len(calls)


def test_a_tag_inside_a_string_argument_neither_closes_nor_splits_the_call():
    text = ('<tool_call>\n{"name": "note", "arguments": {"text": "use </tool_call> and <tool_call> '
            'freely", "tags": []}}\n</tool_call>')
    scanner = toolcalls.CallScanner()
    for i, ch in enumerate(text.encode()):
        scanner.feed(bytes([ch]))
        if i == text.index("use") + 10:
            assert scanner.in_call and scanner.in_string
    assert not scanner.in_call and scanner.spans == [[0, len(text.encode())]]
    content, calls = toolcalls.parse(text)
    assert content is None
    assert calls == [{"name": "note", "arguments": {"text": "use </tool_call> and <tool_call> freely",
                                                    "tags": []}}]


def test_an_unclosed_call_is_reported_raw_with_its_name_and_arguments_so_far():
    content, calls = toolcalls.parse('Sure. <tool_call>\n{"name": "note", "arguments": {"text":"ab')
    raw = '{"name": "note", "arguments": {"text":"ab'
    assert content == "Sure." and calls == [{"raw": raw, "name": "note", "partial": '{"text": "ab'}]
    [out], [report] = toolcalls.to_openai(calls, NOTE)
    assert out["function"] == {"name": "note", "arguments": '{"text": "ab'}  # as a stream sent it
    assert report["valid"] is False and report["errors"] == ["not a JSON object"]
    # Only the call's closing brace missing: the call is whole.
    _, calls = toolcalls.parse('<tool_call>\n{"name": "note", "arguments": {"text":"ab"}')
    assert calls == [{"name": "note", "arguments": {"text": "ab"}}]
    assert toolcalls.parse("<tool_call>\n[1, 2")[1] == [{"raw": "[1, 2"}]
