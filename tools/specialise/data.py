"""A task's examples, as `outpost logs export` wrote them, typed.

One JSONL line (the export's `openai` format) is one `Example`: the conversation an
agent sent, the tools it offered, and the assistant message to learn (the cloud's
answer, or a local one an agent called good). Which examples are trustworthy, the
redaction, the deduplication and the train/held-out split by a hash of the content
are the export's (runtime/logs/export.py); this module only reads and fingerprints.

What this module must not do: read the log itself, or tokenize (train.py does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outpost.manifests.errors import BadRequest


class BadExample(BadRequest):
    """A line of an examples file that is not an exported example."""

    code = "bad_example"

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}", path=path, line=line, reason=reason)
        self.path, self.line, self.reason = path, line, reason


@dataclass(frozen=True)
class Call:
    name: str
    arguments: Any  # parsed JSON (an object, normally)


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]]  # what the agent sent, without the answer
    tools: list[dict[str, Any]] | None
    answer: dict[str, Any]  # the assistant message to learn
    parallel_tool_calls: bool
    line: str  # the canonical JSON it was read from (its identity and fingerprint)

    @property
    def calls(self) -> list[Call]:
        return [Call(c["function"]["name"], _arguments(c["function"].get("arguments")))
                for c in self.answer.get("tool_calls") or []]

    @property
    def tool_choice(self) -> str:
        """What held-out evaluation asks with: `auto`, what agents send, so each candidate
        decides between calling and answering before it is scored on either."""
        return "auto"

    @classmethod
    def from_json(cls, data: Any, where: tuple[str, int] = ("<string>", 0)) -> Example:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
            raise BadExample(*where, "not an object with a non-empty `messages` list")
        *messages, answer = data["messages"]
        if not isinstance(answer, dict) or answer.get("role") != "assistant":
            raise BadExample(*where, "the last message is not the assistant's answer")
        tools = data.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadExample(*where, "`tools` is not a list")
        for call in answer.get("tool_calls") or []:
            if not isinstance(call, dict) or not isinstance(call.get("function", {}).get("name"), str):
                raise BadExample(*where, "a tool call without a function name")
        line = json.dumps(data, ensure_ascii=False, sort_keys=True)
        return cls(messages=messages, tools=tools or None, answer=answer,
                   parallel_tool_calls=bool(data.get("parallel_tool_calls", True)), line=line)


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def load(path: Path) -> list[Example]:
    """Every example in a JSONL file; a malformed line is a `BadExample` naming it."""
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise BadExample(str(path), number, f"not JSON: {exc.msg}") from None
                out.append(Example.from_json(data, (str(path), number)))
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from None
    return out


def fingerprint(examples: list[Example]) -> str:
    """sha256 over the examples in order: two adapters trained on the same data say so."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.line.encode())
        digest.update(b"\n")
    return digest.hexdigest()
