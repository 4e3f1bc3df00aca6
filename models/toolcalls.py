"""Reading tool calls back out of generated text, and checking them.

The model writes calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(see templates.py). Under a grammar that shape is guaranteed; without one (tool_choice
"none" never parses, but an unconstrained caller may) anything may come out, so
parsing is forgiving and validation says what is wrong instead of raising.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for

from .schemas import tool_parameters
from .templates import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.S)


def parse(text: str, loose: bool = False) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into (content outside calls, calls as parsed dicts or raw text).

    `loose` (for unconstrained decoding only) also takes bare JSON objects with a
    "name" as calls when the model left out the tags; under a grammar, a text answer
    that merely contains JSON must stay text.
    """
    if loose and TOOL_CALL_OPEN not in text:
        return _parse_bare(text)
    calls: list[dict[str, Any]] = []
    for match in _BLOCK.finditer(text):
        raw = match.group(1).strip()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            calls.append({"raw": raw})
            continue
        calls.append(obj if isinstance(obj, dict) else {"raw": raw})
    content = _BLOCK.sub("", text).strip()
    return (content or None), calls


def _parse_bare(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    decoder = json.JSONDecoder()
    calls, spans, at = [], [], 0
    while (start := text.find("{", at)) >= 0:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            at = start + 1
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append(obj)
            spans.append((start, end))
        at = end
    content = text
    for start, end in reversed(spans):
        content = content[:start] + content[end:]
    return (content.strip() or None), calls


def to_openai(calls: list[dict[str, Any]], tools: list[dict[str, Any]],
              stats: list[dict[str, Any]] | None = None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parsed calls -> (OpenAI tool_calls, one validation record per call).

    `stats`, one per parsed call in the same order, is merged into its record (the
    backend's per-call log-probabilities and repair flag).
    """
    by_name = {t["function"]["name"]: t for t in tools}
    out, report = [], []
    seen: set[str] = set()
    for i, call in enumerate(calls):
        key = json.dumps(call, sort_keys=True)
        if key in seen:  # an exact repeat (a decoding loop), not a second call
            continue
        seen.add(key)
        name = call.get("name")
        args = call.get("arguments", {})
        errors: list[str] = []
        if "raw" in call:
            errors.append("not a JSON object")
        elif name not in by_name:
            errors.append(f"unknown tool {name!r}")
        elif not isinstance(args, dict):
            errors.append("arguments is not a JSON object")
        else:
            schema = tool_parameters(by_name[name])
            cls = validator_for(schema, default=Draft202012Validator)
            # Formats are checked too: the grammar enforces them, so must the validator.
            errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                      for e in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(args)]
        out.append({
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {
                "name": name if isinstance(name, str) else "",
                "arguments": json.dumps(args, ensure_ascii=False) if "raw" not in call else call["raw"],
            },
        })
        extra = stats[i] if stats is not None and i < len(stats) else {}
        report.append({"name": name, "valid": not errors, "errors": errors, **extra})
    return out, report
