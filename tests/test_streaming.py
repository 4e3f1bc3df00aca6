"""Streaming over ZeroMQ: chunk frames with the request's id, then the final frame; the
deltas join to exactly the answer a non-streaming request gets (greedy decoding makes
the two runs the same generation)."""

from __future__ import annotations

import json
import random

import pytest

from outpost.runtime.daemon.streaming import ChatStream, JsonCanon

from .test_wire import TOOLS, USER


def reassemble(chunks: list[dict]) -> tuple[str | None, list[dict], dict]:
    """What an OpenAI client builds from the deltas: content, calls, and the last chunk."""
    content, calls = None, {}
    for chunk in chunks[:-1]:
        assert chunk["object"] == "chat.completion.chunk"
        delta = chunk["choices"][0]["delta"]
        if delta.get("content"):
            content = (content or "") + delta["content"]
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
            call["id"] = part.get("id") or call["id"]
            fn = part.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)], chunks[-1]


@pytest.mark.parametrize("kwargs", [
    {},  # text
    {"tools": TOOLS, "tool_choice": "required"},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "set_mode"}}},
    {"tools": TOOLS, "tool_choice": "auto"},
    {"tools": TOOLS, "tool_choice": "none"},
])
def test_stream_reassembles_to_the_non_streaming_answer(client, kwargs):
    whole = client.chat(USER, max_tokens=40, **kwargs)
    chunks = list(client.chat_stream(USER, max_tokens=40, **kwargs))
    content, calls, last = reassemble(chunks)
    message = whole["choices"][0]["message"]
    assert content == message["content"]
    assert [c["function"] for c in calls] == [c["function"] for c in message.get("tool_calls") or []]
    assert len({c["id"] for c in calls}) == len(calls)
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["usage"] == whole["usage"]
    assert last["outpost"]["log_id"] is not None and last["outpost"]["validation"] == [
        {k: v for k, v in entry.items()} for entry in whole["outpost"]["validation"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1


def test_streamed_calls_keep_their_ids_in_the_log(client, tiny_daemon):
    from outpost.runtime.logs.queries import get_request
    from outpost.runtime.logs.schema import open_db

    chunks = list(client.chat_stream(USER, tools=TOOLS, tool_choice="required", max_tokens=40))
    _, calls, last = reassemble(chunks)
    db = open_db(tiny_daemon.settings.log_path)
    row = get_request(db, last["outpost"]["log_id"])
    db.close()
    assert [c["id"] for c in row["tool_calls"]] == [c["id"] for c in calls]


def test_a_streamed_error_is_one_error_frame(client):
    from outpost.runtime.errors import UnknownModel

    with pytest.raises(UnknownModel):
        list(client.chat_stream(USER, model="no-such-model"))
    assert client.ping()["pong"]  # the socket is still in step


# -- the pieces, without a daemon -------------------------------------------------------

def _random_value(rnd: random.Random, depth: int = 0):
    if depth > 3 or rnd.random() < 0.3:
        return rnd.choice([1, -2, 3.5, 1e21, 0.1, True, False, None, 'a"b\\c', "é☃", "😀 x",
                           "\n\t", "", "/path", "<tool_call>", "</tool_call>"])
    if rnd.random() < 0.5:
        return {f"k{i}é": _random_value(rnd, depth + 1) for i in range(rnd.randint(0, 3))}
    return [_random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]


def _spelled(rnd: random.Random, value) -> str:
    """The same JSON as a model may spell it: other spacing, \\u escapes, an escaped slash."""
    text = json.dumps(value, ensure_ascii=rnd.random() < 0.5,
                      separators=(rnd.choice([",", ", ", " ,"]), rnd.choice([":", ": ", " : "])))
    return text.replace("/", "\\/") if rnd.random() < 0.3 else text


def _pieces(rnd: random.Random, text: str):
    i = 0
    while i < len(text):
        k = rnd.randint(1, 6)
        yield text[i:i + k]
        i += k


def test_json_canon_writes_what_json_dumps_writes_in_any_pieces():
    rnd = random.Random(7)
    for _ in range(2000):
        value = {"a": _random_value(rnd)}
        spelled = _spelled(rnd, value)
        canon, out, rest = JsonCanon(), "", ""
        for piece in _pieces(rnd, spelled + "}\n</tool_call>"):
            if canon.done:
                rest += piece
                continue
            text, left = canon.feed(piece)
            out, rest = out + text, rest + left
        assert out == json.dumps(value, ensure_ascii=False)
        assert rest == "}\n</tool_call>"


def test_chat_stream_holds_a_repeated_call_and_sends_what_the_answer_keeps():
    rnd = random.Random(3)
    call = '<tool_call>\n{"name": "f", "arguments": {"x": [1,2]}}\n</tool_call>'
    stream, deltas = ChatStream(parse_calls=True), []
    for piece in _pieces(rnd, call + "\n" + call):  # a greedy loop repeats the call
        deltas += stream.feed(piece)
    final = [{"id": "call_x", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, 2]}'}}]
    deltas += stream.finish(None, final)
    content, calls, _ = reassemble([{"object": "chat.completion.chunk", "choices": [{"delta": d}]}
                                    for d in deltas] + [{}])
    assert content is None
    assert [c["function"] for c in calls] == [final[0]["function"]]
    assert final[0]["id"] == calls[0]["id"]


def test_chat_stream_strips_content_like_the_reply():
    stream = ChatStream(parse_calls=True)
    deltas = stream.feed("  \n Hello") + stream.feed(" there <tool") + stream.feed("ing>  \n")
    deltas += stream.finish("Hello there <tooling>", [])
    assert "".join(d["content"] for d in deltas) == "Hello there <tooling>"


def test_a_repeat_spelt_differently_takes_no_index_and_the_rest_line_up():
    rnd = random.Random(5)
    a = '<tool_call>\n{"name": "f", "arguments": {"city":"Paris"}}\n</tool_call>'
    a_again = '<tool_call>\n{"name": "f", "arguments": {"city": "Paris"}}\n</tool_call>'  # same value
    b = '<tool_call>\n{"name": "f", "arguments": {"city":"Oslo"}}\n</tool_call>'
    stream, deltas = ChatStream(parse_calls=True), []
    for piece in _pieces(rnd, "\n".join([a, a_again, b])):
        deltas += stream.feed(piece)
    final = [{"id": "x", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
             {"id": "y", "type": "function", "function": {"name": "f", "arguments": '{"city": "Oslo"}'}}]
    deltas += stream.finish(None, final)
    _, calls, _ = reassemble([{"object": "chat.completion.chunk", "choices": [{"delta": d}]}
                              for d in deltas] + [{}])
    assert [c["function"] for c in calls] == [f["function"] for f in final]
    assert [c["id"] for c in calls] == [f["id"] for f in final]
    indices = {p["index"] for d in deltas for p in d.get("tool_calls", [])}
    assert indices == {0, 1}


def test_a_call_cut_short_in_a_string_keeps_what_the_stream_sent():
    from outpost.models import toolcalls

    text = '<tool_call>\n{"name": "f", "arguments": {"q": "weather in '
    stream = ChatStream(parse_calls=True)
    deltas = stream.feed(text)
    _, [call] = toolcalls.parse(text)
    final = [{"id": "x", "type": "function", "function": {"name": "f", "arguments": call["partial"]}}]
    deltas += stream.finish(None, final)
    _, calls, _ = reassemble([{"object": "chat.completion.chunk", "choices": [{"delta": d}]}
                              for d in deltas] + [{}])
    assert calls[0]["function"]["arguments"] == '{"q": "weather in ' == call["partial"]
