"""Prompt tokenization by turns, each turn's tokens remembered.

An agent sends the same system prompt and tools with every request, and a conversation
resends its earlier turns. The KV cache spares their prefill, but llama.cpp still
tokenizes the whole prompt each time: about 1 ms for SmolLM2's weather prompt, and it
grows with the tools block, on the path before the prefill. Here the rendered prompt is
cut before each occurrence of a turn's control token (`<|im_start|>`,
`<start_of_turn>`), every piece is tokenized on its own, and the pieces seen before
come from a cache, so a request tokenizes only its new turn.

Why the pieces add up to the whole, from llama.cpp's tokenizer (llama-vocab.cpp): a
prompt is first partitioned at special tokens (longest first), then each run of text
between them is tokenized alone, and a run's tokens depend on nothing before it but
whether a special token precedes it (SentencePiece's space prefix). Cutting just
before a special token `S` keeps that true for every piece when:
- no other special token as long as `S` contains it or overlaps it at either end
  (else the whole prompt could match that token where a piece matches `S`);
- `S` does not strip the whitespace to its left (LSTRIP), which lies in the piece
  before the cut;
- the vocabulary is SentencePiece or BPE and adds no EOS (the first piece gets the
  BOS, the others nothing).
`cut_marks` picks the tokens that qualify. Finding them reads every token's attributes
(22 ms for SmolLM2's 49k tokens, 126 ms for Gemma's 262k), so a worker keeps them on
disk beside the vocabulary, keyed by the model file and the template (`MarksFile`).
As a guard against a tokenizer that does not work that way, the first prompts are also
tokenized whole and compared; one difference turns the cache off for the model, with a
warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CHECKED_PROMPTS = 4  # prompts also tokenized whole, to confirm the pieces add up
MAX_PIECES = 512  # pieces remembered (least recently used go first)
MAX_BYTES = 2 << 20  # and the text they hold, at most (with their tokens, a few MiB of the worker's memory)


def cut_marks(specials: Iterable[tuple[bytes, bool]], template: str) -> list[bytes]:
    """The special tokens a prompt may be cut before: those the chat template writes,
    that no other special token of at least their length contains or overlaps, and
    that do not strip whitespace on their left. `specials` is every special token's
    text with whether it has LSTRIP."""
    specials = [(text, lstrip) for text, lstrip in specials if text]
    out = []
    for text, lstrip in specials:
        if lstrip or text.decode("utf-8", errors="replace") not in template or _self_overlaps(text):
            continue
        if all(other == text or len(other) < len(text) or not _overlaps(other, text) for other, _ in specials):
            out.append(text)
    return out


class MarksFile:
    """A model's marks on disk: `<folder>/marks-<sha256 of the weights' sha256 and the
    template>.json`. Unreadable or foreign content reads as absent (found again)."""

    def __init__(self, folder: Path, weights_sha256: str, template: str) -> None:
        key = hashlib.sha256(f"{weights_sha256}\n{template}".encode()).hexdigest()
        self.path = folder / f"marks-{key}.json"

    def load(self) -> list[bytes] | None:
        try:
            data = json.loads(self.path.read_text())
            return [bytes.fromhex(mark) for mark in data["marks"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, marks: list[bytes]) -> None:
        """Best effort: a cache folder that cannot be written costs the next load the
        search again, never this load."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"marks": [mark.hex() for mark in marks]}))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot keep the prompt marks in %s (%s): found again at the next load", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()


def _overlaps(a: bytes, b: bytes) -> bool:
    """Whether `a` contains `b`, or one's end is the other's start (in part)."""
    if b in a:
        return True
    return any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def _self_overlaps(text: bytes) -> bool:
    return any(text[:k] == text[-k:] for k in range(1, len(text)))


class PromptTokens:
    """`tokenize(data, first)` for one model: `first` is whether the piece starts the
    prompt (it gets the BOS); special tokens are parsed in every piece."""

    def __init__(self, tokenize: Callable[[bytes, bool], list[int]], marks: list[bytes]) -> None:
        self._tokenize = tokenize
        self._marks = marks
        self._pieces: OrderedDict[tuple[bool, bytes], array[int]] = OrderedDict()  # 4 bytes a token
        self._bytes = 0
        self._checks_left = CHECKED_PROMPTS
        self.enabled = bool(marks)
        self.hits = self.misses = 0  # pieces, for the benchmark and the tests

    def __call__(self, data: bytes) -> list[int]:
        if not self.enabled or not data:
            return self._tokenize(data, True)
        tokens: list[int] = []
        for i, piece in enumerate(self._cut(data)):
            tokens.extend(self._piece(piece, i == 0))
        if self._checks_left > 0:
            self._checks_left -= 1
            whole = self._tokenize(data, True)
            if whole != tokens:
                log.warning("tokenizing a prompt by turns differs from tokenizing it whole; "
                            "turn caching is off for this model")
                self.enabled = False
                self._pieces.clear()
                return whole
        return tokens

    def _cut(self, data: bytes) -> list[bytes]:
        """`data` cut before every occurrence of a mark (left to right, as llama.cpp finds them)."""
        starts = set()
        for mark in self._marks:
            at = data.find(mark)
            while at >= 0:
                starts.add(at)
                at = data.find(mark, at + len(mark))
        bounds = sorted(starts - {0})
        return [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)]) if b > a]

    def _piece(self, piece: bytes, first: bool) -> array[int]:
        key = (first, piece)
        hit = self._pieces.get(key)
        if hit is not None:
            self._pieces.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        tokens = array("i", self._tokenize(piece, first))
        self._pieces[key] = tokens
        self._bytes += len(piece)
        while len(self._pieces) > MAX_PIECES or self._bytes > MAX_BYTES:
            (_, old), _ = self._pieces.popitem(last=False)
            self._bytes -= len(old)
        return tokens
