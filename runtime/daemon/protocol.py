"""The wire protocol: parsing and checking what agents send, shaping what they get.

One UTF-8 JSON frame per message. Requests are `{"v": 1, "id", "method", "params"}`;
replies carry either `result` or `error` (`{code, message, data}`). Everything an
agent sends is checked here with pydantic before anything else sees it, and every
failure becomes a typed `BadRequest` with the field that was wrong. See
docs/protocol.md for the agent-facing description.

What this module must not do: route, generate or log; it parses and serialises.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from outpost.manifests.errors import BadRequest, OutpostError
from outpost.manifests.schema import MANIFEST_ID, Sampling
from outpost.models.backend import GenerationRequest

from .errors import RequestTooLarge

VERSION = 1
# Deeper frames are refused: tool schemas nest (MAX_DEPTH 32 in models/schemas.py), and
# nothing an agent sends needs more than this.
MAX_NESTING = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Envelope(_Strict):
    v: Literal[1]
    id: Annotated[str, Field(min_length=1, max_length=128)]
    method: Annotated[str, Field(min_length=1, max_length=64)]
    params: dict[str, Any] = {}


class FunctionRef(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionRef


class Message(BaseModel):
    # Unknown message fields (e.g. `refusal`) are kept out of prompts but tolerated:
    # agents replay assistant messages they got from other OpenAI-compatible servers.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatParams(_Strict):
    model: str | None = None
    task: str | None = None  # Outpost extension: route by task when no model is named
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Outpost extension: false decodes freely and only parses and validates calls
    # afterwards (for measuring what the grammar buys; agents should leave it on).
    constrained: bool = True
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # Any 64-bit integer, signed or not (OpenAI leaves the range open; a negative one is
    # taken modulo 2^64, as numpy's generator wants it unsigned).
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    # Outpost extension: narrow the configured escalation policy for this request
    # ("off" keeps private data on the device); widening it is refused.
    escalation: Literal["off", "on_low_confidence", "shadow", "cloud_only"] | None = None
    # Outpost extensions: who asks (for [clients.<name>] limits), and how urgently
    # (interactive requests go ahead of batch ones in a model's queue).
    client: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    priority: Literal["interactive", "batch"] = "interactive"
    # Streaming: several frames with this request's id, `chunk`s then the `result`.
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # usage always comes in the last frame
    user: str | None = None

    def choice_name(self) -> str:
        """tool_choice as one string: auto | none | required | a function name."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    def wire_tool_choice(self) -> str | dict[str, Any] | None:
        """tool_choice as the agent sent it, for another OpenAI-compatible server."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice

    def generation(self, sampling: Sampling) -> GenerationRequest:
        """What the model is asked: this request, over the manifest's sampling defaults."""
        return GenerationRequest(
            messages=[m.model_dump(exclude_none=True) for m in self.messages],
            tools=self.tools or None, tool_choice=self.choice_name(),
            parallel_tool_calls=self.parallel_tool_calls, constrained=self.constrained,
            max_tokens=self.max_completion_tokens or self.max_tokens or sampling.max_tokens,
            temperature=sampling.temperature if self.temperature is None else self.temperature,
            top_p=sampling.top_p if self.top_p is None else self.top_p,
            top_k=sampling.top_k, seed=None if self.seed is None else self.seed % 2**64)


class FeedbackParams(_Strict):
    log_id: int  # the `outpost.log_id` of the reply being judged
    outcome: Literal["good", "bad"]
    note: Annotated[str, Field(max_length=4000)] | None = None


def parse_feedback(params: dict[str, Any]) -> FeedbackParams:
    try:
        return FeedbackParams.model_validate(params)
    except ValidationError as exc:
        raise bad_fields(exc) from exc


def decode_frame(frame: bytes, limit: int) -> tuple[dict[str, Any] | None, Envelope]:
    """bytes -> (raw object, envelope). Raises BadRequest; the raw object (if it got
    that far) lets an error reply still echo the request's id."""
    if len(frame) > limit:
        raise RequestTooLarge(len(frame), limit)
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"frame is not UTF-8 (byte {exc.start})") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"frame is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError:
        raise BadRequest(f"frame is nested deeper than {MAX_NESTING} levels") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise BadRequest(f"frame is not usable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BadRequest("a request must be a JSON object")
    _check_shape(raw)
    try:
        return raw, Envelope.model_validate(raw)
    except ValidationError as exc:
        raise bad_fields(exc) from exc


def _check_shape(value: Any) -> None:
    """Refuse a decoded frame that nests deeper than MAX_NESTING (code that walks it
    recursively later must not run out of stack) or holds a string with a lone surrogate
    (JSON can escape one, `\\ud800`; no UTF-8 encoder, SQLite or tokenizer takes it).
    Walked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("frame holds a string with a lone surrogate escape (\\ud800-\\udfff "
                                 "not in a pair): not Unicode text") from None
        elif isinstance(item, dict | list):
            if level > MAX_NESTING:
                raise BadRequest(f"frame is nested deeper than {MAX_NESTING} levels", limit=MAX_NESTING)
            if isinstance(item, dict):
                stack.extend((k, level) for k in item)
                stack.extend((v, level + 1) for v in item.values())
            else:
                stack.extend((v, level + 1) for v in item)


def bad_fields(exc: ValidationError) -> BadRequest:
    errors = [{"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
              for e in exc.errors(include_url=False)]
    summary = "; ".join(f"{e['field'] or '<root>'}: {e['problem']}" for e in errors[:5])
    return BadRequest(f"invalid request: {summary}", errors=errors)


def parse_chat(params: dict[str, Any]) -> ChatParams:
    try:
        return ChatParams.model_validate(params)
    except ValidationError as exc:
        raise bad_fields(exc) from exc


def text_param(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"`{name}` must be a non-empty string", field=name)
    return value


def model_param(params: dict[str, Any]) -> str:
    """A model id from a request, checked before it names a folder in the store."""
    model_id = text_param(params, "model")
    if not re.fullmatch(MANIFEST_ID, model_id):
        raise BadRequest(f"`model` {model_id!r} is not a model id", field="model")
    return model_id


def reply_ok(request_id: str | None, result: dict[str, Any]) -> bytes:
    # The body goes last, after `id`: the SDK's transport cuts it out of the frame as it
    # is and hands it on without decoding it (runtime/client.py, split_reply; a frame
    # written otherwise is still read, only decoded).
    return json.dumps({"v": VERSION, "id": request_id, "result": result},
                      ensure_ascii=False).encode("utf-8")


def reply_chunk(request_id: str, chunk: dict[str, Any]) -> bytes:
    """One streamed delta; the stream ends with the request's `result` (or `error`)."""
    return json.dumps({"v": VERSION, "id": request_id, "chunk": chunk},
                      ensure_ascii=False).encode("utf-8")


def reply_error(request_id: str | None, error: OutpostError) -> bytes:
    return json.dumps({"v": VERSION, "id": request_id, "error": error.to_wire()},
                      ensure_ascii=False, default=str).encode("utf-8")


def ping_frame() -> bytes:
    return json.dumps({"v": VERSION, "id": "probe", "method": "ping"}).encode("utf-8")
