"""Turning OpenAI-style messages (and tools) into the prompt text a model was trained on.

Small models rarely carry a tool-aware chat template, so tools are always presented
the same way: a system block listing them in <tools></tools> and asking for calls as
JSON inside <tool_call></tool_call> (the convention SmolLM2 and Hermes-style models
were trained on). The grammar in `grammar.py` enforces exactly that shape, and
`toolcalls.py` parses it back. Past calls and tool results in the history are
rewritten into the same tags, so every template sees plain role/content turns.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from jinja2 import Template, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from outpost.manifests.errors import BadRequest

from .errors import ModelInvalid, ModelLoadFailed

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma has no system role: the system text is folded into the first user turn.
_GEMMA = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_NAMED = {"chatml": (_CHATML, True), "gemma": (_GEMMA, False)}


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You are a helpful assistant with access to the following functions. "
        "Use them if required.\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call a function, reply with a JSON object with the function name and its "
        "arguments inside tags, like this:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": "function_name", "arguments": {{"arg": "value"}}}}\n{TOOL_CALL_CLOSE}'
    )


def format_tool_call(name: str, arguments: Any) -> str:
    """One call as the model is asked to write it (also used for history turns)."""
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n{TOOL_CALL_CLOSE}'


def answer_text(message: dict[str, Any]) -> str:
    """An assistant message as the model writes it when serving: its text, then its calls
    in the shape the grammar enforces (what training on logged answers must teach)."""
    return normalise([message], None)[0]["content"]


@functools.lru_cache(maxsize=32)
def _compiled(source: str) -> Template:
    """A template's source compiled once: parsing and compiling it again for every
    request took ~2 ms, on the path before the prompt's prefill. (A compiled template
    renders from any thread; one that fails to compile is not kept.)"""
    return ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False).from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    system_role: bool  # False: fold system text into the first user turn

    @classmethod
    def from_manifest(cls, spec: str, gguf_template: str | None) -> ChatTemplate:
        if spec in _NAMED:
            source, system_role = _NAMED[spec]
            return cls(source, system_role)
        if spec == "gguf":
            if not gguf_template:
                raise ModelLoadFailed("the manifest asks for the GGUF's chat template, "
                                      "but the file carries none")
            return cls.checked(gguf_template, "the model file's chat template")
        return cls.checked(spec, "the manifest's chat template")

    @classmethod
    def checked(cls, source: str, where: str) -> ChatTemplate:
        """A template from a model file or a manifest (untrusted text), refused with
        ModelInvalid unless it parses, keeps to public attributes, and renders a turn in
        the sandbox. Jinja's sandbox already stops `__class__` and friends at render
        time (CVE-2024-34359 was a template rendered outside one); refusing at load
        says so once, not on every request."""
        env = ImmutableSandboxedEnvironment()
        try:
            tree = env.parse(source)
        except TemplateError as exc:
            raise ModelInvalid(where, f"it does not parse: {exc}") from None
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            name = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
            if isinstance(name, str) and name.startswith("_"):
                raise ModelInvalid(where, f"it reaches for {name!r}, outside what a template may read")
        template = cls(source, True)
        try:
            template.render([{"role": "user", "content": "hi"}], None)
        except BadRequest as exc:
            raise ModelInvalid(where, f"it fails on a one-turn chat: {exc.message}") from None
        return template

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               extra: dict[str, Any] | None = None) -> str:
        turns = normalise(messages, tools)
        if not self.system_role:
            turns = _fold_system(turns)
        try:
            return _compiled(self.source).render(
                messages=turns, add_generation_prompt=True, bos_token="", eos_token="",
                **(extra or {}))
        except TemplateError as exc:
            raise BadRequest(f"chat template failed: {exc}") from exc


    def turn_end(self) -> str:
        """The text that closes an assistant turn (`<|im_end|>` for ChatML): what a
        trained answer ends with, so that the model learns to stop."""
        mark = "\x00answer\x00"
        prompt = self.render([{"role": "user", "content": "q"}], None)
        full = self.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}], None)
        if not full.startswith(prompt) or mark not in full:
            raise BadRequest("this chat template does not render an assistant turn after the prompt")
        tail = full[full.index(mark) + len(mark):]
        return tail.split("\n", 1)[0]


def normalise(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """OpenAI messages -> plain role/content turns, tools described in the system turn."""
    turns: list[dict[str, str]] = []
    for m in messages:
        role = m["role"]
        content = _text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call["function"]
                args = fn.get("arguments", "{}")
                try:
                    parsed = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    parsed = args
                calls.append(format_tool_call(fn["name"], parsed))
            content = "\n".join([content, *calls]) if content else "\n".join(calls)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        elif role == "developer":
            role = "system"
        turns.append({"role": role, "content": content})
    if tools:
        block = tools_system_prompt(tools)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{block}"}
        else:
            turns.insert(0, {"role": "system", "content": block})
    return turns


def _fold_system(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    if not turns or turns[0]["role"] != "system":
        return turns
    system, rest = turns[0]["content"], turns[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def _text(content: Any) -> str:
    """Message content may be a string or a list of OpenAI content parts (text only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
