"""JSON in the one spelling replies use, written as it arrives.

A tool call's arguments go out as `json.dumps(args, ensure_ascii=False)` (toolcalls.py),
whatever spacing and escapes the model chose within what the grammar allows. When an
answer is streamed, the arguments are sent before they are complete, so the same
spelling has to be produced a character at a time (`JsonCanon`); a call cut short (by
max_tokens, say) is reported in that spelling too, so what was streamed of it and what
the reply says agree.

What this module must not do: decide whether a call is valid (toolcalls.py does).
"""

from __future__ import annotations

import json
import re

# The start of a call as the grammar writes it, up to its arguments (templates.py).
# (Whitespace after the colon is left to JsonCanon, which drops it: a stream can then
# name the call as soon as the colon is written.)
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')
_NUMBER = set("0123456789+-.eE")
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


class JsonCanon:
    """Re-serialises one JSON value as it arrives, character by character, the way
    `json.dumps(json.loads(value), ensure_ascii=False)` would write it whole. `feed`
    returns the canonical text for what it consumed and what it did not (the text
    after the value ends)."""

    def __init__(self) -> None:
        self.done = False
        self._depth = 0
        self._state = "value"  # value | string | escape | number | literal
        self._buf = ""  # a number, or escapes read (a high surrogate waits for its pair)
        self._esc = ""  # the escape being read

    def feed(self, text: str) -> tuple[str, str]:
        out: list[str] = []
        i = 0
        while i < len(text) and not self.done:
            c = text[i]
            state = self._state
            if state == "string":
                if c == "\\":
                    self._state, self._esc = "escape", c
                elif c == '"':
                    out.append(self._flush_escape() + '"')
                    self._state = "value"
                    self._end_scalar()
                else:
                    out.append(self._flush_escape() + json.dumps(c, ensure_ascii=False)[1:-1])
            elif state == "escape":
                self._esc += c
                if len(self._esc) == 2 and c != "u" or len(self._esc) == 6:
                    self._state, self._buf, self._esc = "string", self._buf + self._esc, ""
                    if not _HIGH_SURROGATE.fullmatch(self._buf[-6:]):  # else: wait for its pair
                        out.append(self._flush_escape())
            elif state == "number":
                if c in _NUMBER:
                    self._buf += c
                else:
                    out.append(_canonical(self._buf))
                    self._buf, self._state = "", "value"
                    self._end_scalar()
                    continue  # this character is read again, outside the number
            elif state == "literal":
                if c.isalpha():
                    out.append(c)
                else:
                    self._state = "value"
                    self._end_scalar()
                    continue
            elif c in "{[":
                out.append(c)
                self._depth += 1
            elif c in "}]":
                out.append(c)
                self._depth -= 1
                self._end_scalar()
            elif c in ",:":
                out.append(c + " ")
            elif c == '"':
                out.append(c)
                self._state = "string"
            elif c == "-" or c.isdigit():
                self._state, self._buf = "number", c
            elif c.isalpha():
                out.append(c)
                self._state = "literal"
            # whitespace between tokens: dropped, as json.dumps writes none
            i += 1
        return "".join(out), text[i:]

    def flush(self) -> str:
        """What is held back at the end of a value cut short: a number, an escape."""
        held = self._flush_escape() if self._state != "number" else _canonical(self._buf)
        return held + self._esc

    def _end_scalar(self) -> None:
        if self._depth == 0:
            self.done = True

    def _flush_escape(self) -> str:
        """The escapes read so far (a surrogate pair waits for its second half), as
        json.dumps spells the characters they stand for."""
        if not self._buf:
            return ""
        try:
            text = json.dumps(json.loads(f'"{self._buf}"'), ensure_ascii=False)[1:-1]
        except ValueError:
            text = self._buf
        self._buf = ""
        return text


def _canonical(number: str) -> str:
    try:
        return json.dumps(json.loads(number))
    except ValueError:
        return number


def partial(text: str) -> str:
    """A JSON value that may be cut short, in the replies' spelling as far as it goes."""
    canon = JsonCanon()
    out, _ = canon.feed(text)
    return out + ("" if canon.done else canon.flush())
