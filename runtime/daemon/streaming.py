"""A chat answer as OpenAI `chat.completion.chunk` deltas, built from the worker's text.

The worker sends its output as it settles (text no loop repair can cut any more;
models/decoding.py). This turns that text into what an OpenAI client reassembles:
`content` deltas for text, and for each tool call one delta with its `id` and
`function.name`, then `function.arguments` deltas. The deltas must join to exactly
the answer the non-streaming reply would carry, so:

- a call's arguments are re-serialised as they arrive into the form the reply uses
  (`json.dumps(args, ensure_ascii=False)`: one space after `,` and `:`, strings and
  numbers in Python's spelling), by `JsonCanon`, one character at a time;
- content that the reply strips (leading and trailing whitespace, when calls are
  parsed out) is held back until text follows it;
- a call that so far repeats an earlier one is held back: the reply drops an exact
  repeat (a greedy loop), and a delta cannot be taken back once sent;
- whatever the live deltas have not carried by the end (a call the scanner could not
  follow, the rest of a held call) is sent from the final answer before the last frame.

Not every answer streams live: an answer that the escalation policy may replace, or
one decoded without a grammar, is sent whole at the end (`ChatStream(live=False)`),
so a client never sees text that the reply then takes back (docs/protocol.md).

What this module must not do: talk to sockets or workers; it maps text to deltas and
hands them to the request's `emit` (server.py sends them).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from outpost.models.backend import GenerationRequest
from outpost.models.canon import CALL_HEAD, JsonCanon
from outpost.models.templates import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from outpost.runtime.escalation.flow import Outcome
from outpost.runtime.escalation.settings import Policy

log = logging.getLogger("outpost.server")

class _Call:
    def __init__(self, name: str) -> None:
        self.index: int | None = None  # given when it is opened: a dropped repeat takes none
        self.id = f"call_{secrets.token_hex(12)}"
        self.name = name
        self.canon = JsonCanon()
        self.args = ""  # canonical arguments read so far
        self.sent = 0  # how much of `args` has gone out

    def same_as(self, other: _Call) -> bool:
        """Whole, and equal to `other` as the reply compares calls (by value)."""
        if not (self.canon.done and other.canon.done and self.name == other.name):
            return False
        try:
            return json.loads(self.args) == json.loads(other.args)
        except ValueError:
            return False


class ChatStream:
    """One streamed answer: `feed` the worker's text as it settles, then `finish` with
    the final answer; each returns the deltas to send, in order."""

    def __init__(self, parse_calls: bool, live: bool = True) -> None:
        self.parse_calls = parse_calls  # tools offered (and not tool_choice none)
        self.live = live
        self.calls: list[_Call] = []  # every call read, repeats included
        self._opened = 0  # calls given an index (sent to the client)
        self._mode = "text"  # text | head | args | tail | lost (could not follow)
        self._pending = ""  # text not yet read to the end (a tag or a head cut in two)
        self._content_sent = False
        self._held_space = ""  # whitespace held back: the reply strips it at the ends
        self._content = ""  # all content sent

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not self.live or self._mode == "lost":
            return []
        deltas: list[dict[str, Any]] = []
        self._pending += text
        while self._pending:
            before = (self._mode, len(self._pending))
            getattr(self, f"_read_{self._mode}")(deltas)
            if (self._mode, len(self._pending)) == before:
                break  # waiting for more text
        return deltas

    # -- reading modes ------------------------------------------------------------------
    def _read_text(self, deltas: list[dict[str, Any]]) -> None:
        if not self.parse_calls:
            self._content_delta(deltas, self._pending)
            self._pending = ""
            return
        at = self._pending.find(TOOL_CALL_OPEN)
        if at < 0:
            # Keep back what may be the start of a tag cut in two.
            keep = next((k for k in range(len(TOOL_CALL_OPEN) - 1, 0, -1)
                         if self._pending.endswith(TOOL_CALL_OPEN[:k])), 0)
            self._text(deltas, self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            return
        self._text(deltas, self._pending[:at])
        self._pending = self._pending[at + len(TOOL_CALL_OPEN):]
        self._mode = "head"

    def _read_head(self, deltas: list[dict[str, Any]]) -> None:
        match = CALL_HEAD.match(self._pending)
        if match is None:  # incomplete, or not the grammar's shape
            if len(self._pending) > 4096 or _not_a_head(self._pending):
                self._mode = "lost"
            return
        call = _Call(json.loads(match.group(1)))
        self.calls.append(call)
        self._pending = self._pending[match.end():]
        self._mode = "args"

    def _read_args(self, deltas: list[dict[str, Any]]) -> None:
        call = self.calls[-1]
        out, rest = call.canon.feed(self._pending)
        call.args += out
        self._pending = rest
        self._send_call(deltas, call)
        if call.canon.done:
            self._mode = "tail"

    def _read_tail(self, deltas: list[dict[str, Any]]) -> None:
        at = self._pending.find(TOOL_CALL_CLOSE)
        if at >= 0:
            self._pending = self._pending[at + len(TOOL_CALL_CLOSE):]
            self._mode = "text"

    def _read_lost(self, deltas: list[dict[str, Any]]) -> None:
        self._pending = ""

    # -- deltas ---------------------------------------------------------------------------
    def _text(self, deltas: list[dict[str, Any]], text: str) -> None:
        """Content that the reply strips at both ends: hold whitespace until text follows."""
        if not text:
            return
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body):]
        if not self._content_sent:
            body = body.lstrip()
        if body:
            self._content_delta(deltas, body)

    def _content_delta(self, deltas: list[dict[str, Any]], text: str) -> None:
        if text:
            self._content_sent = True
            self._content += text
            deltas.append({"content": text})

    def _send_call(self, deltas: list[dict[str, Any]], call: _Call, hold: bool = True) -> None:
        # Held while it could still turn out a repeat of an earlier call: the reply drops
        # a call equal to an earlier one (json.dumps(..., sort_keys) in toolcalls.py).
        earlier = self.calls[:self.calls.index(call)]
        if hold and any(c.name == call.name and (c.args.startswith(call.args) or call.same_as(c))
                        for c in earlier):
            return
        entry: dict[str, Any] = {}
        if call.index is None:
            call.index = self._opened
            self._opened += 1
            entry.update(id=call.id, type="function", function={"name": call.name, "arguments": ""})
        if call.sent < len(call.args):
            entry.setdefault("function", {})["arguments"] = call.args[call.sent:]
            call.sent = len(call.args)
        if entry:
            deltas.append({"tool_calls": [{"index": call.index, **entry}]})

    def finish(self, content: str | None, tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The deltas still owed for the final answer. Rewrites the final calls' ids to
        the ones streamed, so the reply and the log name the calls the client saw."""
        deltas: list[dict[str, Any]] = []
        if content and not self.calls:
            if content.startswith(self._content):
                self._content_delta(deltas, content[len(self._content):])
            else:
                log.warning("streamed content is not a prefix of the answer; sent as it was")
        # The calls read, less the repeats the reply dropped, line up with the reply's.
        kept = [c for i, c in enumerate(self.calls)
                if c.index is not None or not any(c.same_as(e) for e in self.calls[:i])]
        for i, final in enumerate(tool_calls):
            fn = final["function"]
            if i >= len(kept):
                kept.append(_Call(fn["name"]))
                self.calls.append(kept[-1])
            call = kept[i]
            if call.name != fn["name"] or not fn["arguments"].startswith(call.args[:call.sent]):
                log.warning("streamed call %d differs from the answer's; sent as it was", i)
            else:
                call.args = fn["arguments"]
                self._send_call(deltas, call, hold=False)
            final["id"] = call.id
        return deltas


def _not_a_head(text: str) -> bool:
    """True when `text` can no longer grow into the grammar's call head."""
    probe = '\n{"name": "'
    stripped = text.lstrip()
    head = probe.lstrip()
    return not (head.startswith(stripped[:len(head)]) or stripped.startswith(head))


def chunk(stream_id: str, created: int, model: str, delta: dict[str, Any],
          finish_reason: str | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`."""
    return {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def final_chunk(reply: dict[str, Any], stream_id: str) -> dict[str, Any]:
    """The stream's last frame, from the non-streaming reply: the finish reason, usage and
    the `outpost` block (log id, confidence, validation), and no delta."""
    choice = reply["choices"][0]
    return {"id": stream_id, "object": "chat.completion.chunk", "created": reply["created"],
            "model": reply["model"],
            "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
            "usage": reply["usage"], "outpost": reply["outpost"]}


class LiveStream:
    """A streamed chat's side of the socket: deltas out as the worker's text settles
    (live), or the whole answer as deltas at the end when the escalation policy may
    still replace it or no grammar shaped it (streaming.py says why)."""

    def __init__(self, emit: Callable[[dict[str, Any]], Awaitable[None]], model: str, request: GenerationRequest, policy: Policy) -> None:
        self._emit = emit
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.model = model
        self.created = int(time.time())
        parse_calls = bool(request.tools) and request.tool_choice != "none"
        self.live = policy in (Policy.OFF, Policy.SHADOW) and (request.constrained or not parse_calls)
        self._chunks = ChatStream(parse_calls, self.live)
        self.first_at: float | None = None  # perf_counter() when the first delta went out

    async def on_text(self, text: str) -> None:
        await self._send(self._chunks.feed(text))

    async def finish(self, outcome: Outcome) -> None:
        answer = outcome.cloud if outcome.cloud is not None else outcome.generation
        if outcome.cloud is not None:
            self.model = outcome.cloud.model
        await self._send(self._chunks.finish(answer.content, answer.tool_calls or []))

    async def _send(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            if self.first_at is None:
                delta = {"role": "assistant", **delta}
                self.first_at = time.perf_counter()
            await self._emit(chunk(self.id, self.created, self.model, delta))
