"""More training examples from the logged ones: values the request spells out, swapped.

A logged call whose argument value appears verbatim in the user's message ("Boston",
"2010", "33.4484") holds a rule the model must learn: copy that span into that
argument. The same request with the span replaced by another value of its kind, in the
message and in the call alike, is an example the teacher would most likely have
answered the same way, so up to `copies` variants of each example teach the rule
without new traffic.

Only what is plainly a copy is swapped:
- the value's text occurs exactly once in the user's message, as a whole token (a
  number not inside a longer number, "1,500" included; a string on word boundaries),
  and nowhere else the model reads or writes: no other message (its text or its
  calls) and not the answer's text;
- no other argument value of the answer overlaps that span (the same value twice,
  "42" and 42, one inside another: which one the span feeds is unknown);
- neither it nor what replaces it is an enum member or, for a string, occurs in the
  tools' definitions (those values are the schema's, not the request's);
- an integer becomes one with as many digits, a float one within half and one and a
  half times it with at most as many decimals, both with the same sign; a string
  becomes another value logged verbatim under an argument of the same name, in any
  tool (a `location` for a `location`), and is left alone when there is none.
A variant is kept only if each new value occurs exactly once in its message and
nowhere else, its calls are valid for the tools (a swap past a schema's `maximum` is
dropped), and it does not ask what a held-out example asks (`exclude`).

What stays wrong: a value the request does not spell out is never swapped, which is
right when it is computed ("213 million" sent as 213000000: the model must learn
that) but leaves it stale when it depends on a swapped one (`state: "MA"` beside a
swapped `city`). The checks above make such pairs rare, not impossible.

Every choice is drawn from a generator seeded by `seed` and the example's sha256, so
each process of a distributed launch makes the same variants.

What this module must not do: tokenize, read files, or change an example it cannot
swap (an example with nothing to swap yields no variant).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from outpost.models.toolcalls import validate_calls

from .data import Example

MIN_STRING = 3  # shorter strings ("x", "km") are too often part of other words

Where = tuple[str | int, ...]  # a value's keys and indices in a call's arguments


@dataclass(frozen=True)
class Slot:
    """One argument value copied from the request: where it sits in both."""

    call: int  # index into the answer's tool calls
    path: Where
    value: str | int | float
    start: int  # its span in the user's message
    end: int


@dataclass(frozen=True)
class Swap:
    slot: Slot
    new: str | int | float


def augment(examples: list[Example], copies: int, seed: int = 0,
            exclude: Iterable[Example] = ()) -> list[Example]:
    """Up to `copies` variants of every example; the originals are not among them, and
    no variant asks what an example in `exclude` asks (the held-out ones: a variant
    that rebuilt one would train on the gate's question)."""
    if copies <= 0:
        return []
    slots = {ex.line: _slots(ex) for ex in examples}
    pool = _string_pool(slots.values())
    seen = {ex.line for ex in examples}
    asked = {_prompt(ex) for ex in exclude}
    out: list[Example] = []
    for ex in examples:
        if not slots[ex.line]:
            continue
        rng = random.Random(f"{seed}:{hashlib.sha256(ex.line.encode()).hexdigest()}")
        made = 0
        for _ in range(copies * 3):  # a draw can repeat one made already, or fail a check
            variant = _variant(ex, slots[ex.line], pool, rng)
            if variant is not None and variant.line not in seen and _prompt(variant) not in asked:
                seen.add(variant.line)
                out.append(variant)
                made += 1
                if made == copies:
                    break
    return out


def _prompt(ex: Example) -> str:
    return json.dumps([ex.messages, ex.tools], ensure_ascii=False, sort_keys=True)


def _user(ex: Example) -> int | None:
    """The index of the last user message, when its content is text."""
    for i in range(len(ex.messages) - 1, -1, -1):
        if ex.messages[i].get("role") == "user":
            return i if isinstance(ex.messages[i].get("content"), str) else None
    return None


def _leaves(value: Any, path: Where = ()) -> list[tuple[Where, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    return [(path, value)]


def _text(value: str | int | float) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _pattern(value: Any, min_string: int = MIN_STRING) -> re.Pattern[str] | None:
    """How the value reads when a message spells it out, as a whole token; None for
    what is never swapped (booleans, nulls, short strings, numbers in exponent form)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return re.compile(rf"(?<!\w){re.escape(value)}(?!\w)") if len(value) >= min_string else None
    if isinstance(value, (int, float)) and math.isfinite(value):
        text = json.dumps(value)
        if "e" in text or "E" in text:
            return None
        # Not inside a longer number ("1,500", "123.5") or a word ("H12" in C6H12O6);
        # a unit after it is fine ("100g").
        return re.compile(rf"(?<![\w.\-])(?<!\d,){re.escape(text)}(?!\d|\.\d|,\d{{3}}(?!\d))")
    return None


def _elsewhere(pattern: re.Pattern[str], ex: Example, messages: list[dict[str, Any]], skip: int) -> int:
    """Occurrences in everything the model reads or writes but message `skip` and the
    answer's calls: every other message's content (text or parts) and calls, and the
    answer's text."""
    texts = [ex.answer.get("content")]
    for i, m in enumerate(messages):
        if i != skip:
            texts += [m.get("content"), m.get("tool_calls")]
    return sum(len(pattern.findall(t if isinstance(t, str) else json.dumps(t, ensure_ascii=False)))
               for t in texts if t)


def _enums(tools: list[dict[str, Any]] | None) -> list[Any]:
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("enum"), list):
                found.extend(node["enum"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tools)
    return found


def _in_enum(value: Any, enums: list[Any]) -> bool:
    if isinstance(value, str):
        return value in [e for e in enums if isinstance(e, str)]
    return value in [e for e in enums if isinstance(e, (int, float)) and not isinstance(e, bool)]


def _slots(ex: Example) -> list[Slot]:
    u = _user(ex)
    if u is None:
        return []
    text = ex.messages[u]["content"]
    tools_text = json.dumps(ex.tools, ensure_ascii=False) if ex.tools else ""
    enums = _enums(ex.tools)
    found: list[Slot] = []
    spans: list[tuple[int, Where, int, int]] = []  # every value's spans, swappable or not
    for n, call in enumerate(ex.calls):
        if not isinstance(call.arguments, dict):
            continue
        for path, value in _leaves(call.arguments):
            loose = _pattern(value, min_string=1)
            if loose is not None:
                spans += [(n, path, *m.span()) for m in loose.finditer(text)]
            pattern = _pattern(value)
            if pattern is None or _in_enum(value, enums) or isinstance(value, str) and value in tools_text:
                continue
            hits = [m.span() for m in pattern.finditer(text)]
            if len(hits) == 1 and _elsewhere(pattern, ex, ex.messages, u) == 0:
                found.append(Slot(n, path, value, *hits[0]))
    return [s for s in found if not any((n, path) != (s.call, s.path) and start < s.end and s.start < end
                                        for n, path, start, end in spans)]


def _name(slot: Slot) -> str:
    return next(p for p in reversed(slot.path) if isinstance(p, str))


def _string_pool(all_slots: Iterable[list[Slot]]) -> dict[str, list[str]]:
    pool: dict[str, set[str]] = defaultdict(set)
    for slots in all_slots:
        for s in slots:
            if isinstance(s.value, str):
                pool[_name(s)].add(s.value)
    return {name: sorted(values) for name, values in pool.items()}  # sorted: the same draw everywhere


def _number(value: int | float, rng: random.Random) -> int | float:
    sign = -1 if value < 0 else 1
    if isinstance(value, int):
        digits = len(str(abs(value)))
        low = 10 ** (digits - 1) if digits > 1 else 1  # "the next 0 years" teaches nothing
        return sign * rng.randint(low, 10 ** digits - 1)
    text = json.dumps(abs(value))
    decimals = len(text.split(".")[1]) if "." in text else 0
    new = sign * round(rng.uniform(abs(value) * 0.5, abs(value) * 1.5 + 10 ** -decimals), decimals)
    return new or value  # rounded to zero: no swap (a zero reads as no value at all)


def _variant(ex: Example, slots: list[Slot], pool: dict[str, list[str]], rng: random.Random) -> Example | None:
    swaps: list[Swap] = []
    for s in slots:
        if isinstance(s.value, str):
            others = [v for v in pool.get(_name(s), []) if v != s.value]
            new: Any = rng.choice(others) if others else s.value
        else:
            new = _number(s.value, rng)
        if new != s.value:
            swaps.append(Swap(s, new))
    if not swaps:
        return None
    u = _user(ex)
    assert u is not None  # slots were found in it
    text = ex.messages[u]["content"]
    for sw in sorted(swaps, key=lambda sw: sw.slot.start, reverse=True):
        text = text[:sw.slot.start] + _text(sw.new) + text[sw.slot.end:]
    messages = [*ex.messages[:u], {**ex.messages[u], "content": text}, *ex.messages[u + 1:]]
    enums = _enums(ex.tools)
    tools_text = json.dumps(ex.tools, ensure_ascii=False) if ex.tools else ""
    for sw in swaps:  # each new value must be as plain a copy as the old one was
        if _in_enum(sw.new, enums) or isinstance(sw.new, str) and sw.new in tools_text:
            return None
        pattern = _pattern(sw.new, min_string=1)
        if pattern is None or len(pattern.findall(text)) != 1 or _elsewhere(pattern, ex, messages, u):
            return None
    calls = list(ex.answer["tool_calls"])
    for n in sorted({sw.slot.call for sw in swaps}):  # a call with no swap stays as logged
        arguments = json.loads(json.dumps(ex.calls[n].arguments))
        for sw in swaps:
            if sw.slot.call == n:
                node = arguments
                for p in sw.slot.path[:-1]:
                    node = node[p]
                node[sw.slot.path[-1]] = sw.new
        raw = calls[n]["function"].get("arguments")
        calls[n] = {**calls[n], "function": {**calls[n]["function"], "arguments":
                                             json.dumps(arguments, ensure_ascii=False) if isinstance(raw, str)
                                             else arguments}}
    if ex.tools and not all(r["valid"] for r in validate_calls(calls, ex.tools)):
        return None
    return Example.from_json({"messages": [*messages, {**ex.answer, "tool_calls": calls}],
                              "tools": ex.tools, "parallel_tool_calls": ex.parallel_tool_calls})
