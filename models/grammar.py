"""xgrammar-constrained decoding for tool calls, independent of the backend.

Life cycle, as in xgrammar itself:

    Vocabulary          one per loaded model: every token's exact bytes + stop tokens
      -> GrammarCache   one per loaded model: a GrammarCompiler and an LRU of
                        (tool set, tool_choice, parallel) -> CompiledGrammar, and the
                        one grammar of a text answer
      -> TokenMask      one per generation: a GrammarMatcher and a bitmask; masks
                        logits in place with numpy and accepts sampled tokens

Two kinds of grammar: calls (`tool_choice` required or a named function: well-formed
calls and nothing else) and a text answer (any text that never opens a call). Under
`auto` there is no third: the decision between them is made first (decision.py), and
the answer is decoded under the grammar of the side chosen.

The vocabulary is given to xgrammar as RAW bytes decoded by the backend's own
detokenizer, so byte-level BPE vocabularies (GPT-2 style "Ġ" pieces) and
SentencePiece byte-fallback ones ("▁" pieces, "<0x0A>") both arrive as the bytes
they really produce; control tokens arrive empty, which xgrammar treats as special
and never allows inside the grammar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xgrammar as xgr

from outpost.manifests.errors import BadRequest

from .errors import GrammarTooComplex, UnsupportedSchema

from .schemas import for_grammar, tool_parameters
from .templates import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

log = logging.getLogger(__name__)

ToolChoice = Literal["auto", "none", "required"] | str  # str: a function name


@dataclass(frozen=True)
class Vocabulary:
    pieces: list[bytes]  # token id -> bytes it decodes to (b"" for control tokens)
    stop_ids: list[int]
    size: int  # the logits' width; may exceed len(pieces) when the model pads

    def save(self, path: Path) -> None:
        """Binary file: a JSON header line, then (u32 length, bytes) per token. Best
        effort: a cache folder that cannot be written costs the next load the reading
        again, never this load."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                header = {"format": 1, "size": self.size, "stop_ids": self.stop_ids, "n": len(self.pieces)}
                out.write(json.dumps(header).encode() + b"\n")
                for piece in self.pieces:
                    out.write(struct.pack("<I", len(piece)))
                    out.write(piece)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot keep the vocabulary in %s (%s): read again at the next load", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    @classmethod
    def load(cls, path: Path, size: int) -> Vocabulary | None:
        """The saved vocabulary, or None if the file is unreadable or for another model."""
        try:
            data = path.read_bytes()
            end = data.index(b"\n")
            header = json.loads(data[:end])
            pieces, at = [], end + 1
            for _ in range(header["n"]):
                (n,) = struct.unpack_from("<I", data, at)
                pieces.append(data[at + 4: at + 4 + n])
                at += 4 + n
        except (OSError, ValueError, KeyError, struct.error):
            return None
        if header.get("format") != 1 or header["size"] != size or at != len(data):
            return None
        return cls(pieces=pieces, stop_ids=header["stop_ids"], size=size)

    def tokenizer_info(self) -> xgr.TokenizerInfo:
        return xgr.TokenizerInfo(self.pieces, xgr.VocabType.RAW, vocab_size=self.size,
                                 stop_token_ids=self.stop_ids)


def tools_hash(tools: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(tools, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# A text answer: anything, as long as it never opens a call (the decision to call was
# made before it, decision.py), so no tag leaks into `content`.
ANSWER_TAG = {"type": "structural_tag", "format": {"type": "any_text", "excludes": [TOOL_CALL_OPEN]}}


def structural_tag(tools: list[dict[str, Any]], tool_choice: ToolChoice,
                   parallel: bool) -> dict[str, Any] | None:
    """The xgrammar structural tag of the calls one request may make, or None when
    nothing is constrained.

    Each tool gets a tag whose begin fixes the call's name, so the arguments are
    decoded against that tool's own schema: `<tool_call>\\n{"name": "f", "arguments": `
    + JSON per schema + `}\\n</tool_call>`. `auto` asks for the calls' grammar too: it
    is what a turn decided for a call is decoded under.
    """
    if not tools or tool_choice == "none":
        return None
    if tool_choice not in ("auto", "required"):
        chosen = [t for t in tools if t["function"]["name"] == tool_choice]
        if not chosen:
            raise BadRequest(f"tool_choice names {tool_choice!r}, which is not in tools",
                             tool_choice=tool_choice)
        tools = chosen
    tags = [{
        "type": "tag",
        "begin": f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
        # Unbounded JSON whitespace lets a weak model loop on "\r\r\r..." until
        # max_tokens without ever closing the call; one character is all JSON needs.
        "content": {"type": "json_schema", "json_schema": for_grammar(tool_parameters(t)),
                    "max_whitespace_cnt": 1},
        "end": f"}}\n{TOOL_CALL_CLOSE}",
    } for t in tools]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n",
             "at_least_one": True, "stop_after_first": not parallel}
    return {"type": "structural_tag", "format": calls}


class GrammarCache:
    """Compiles tool grammars for one vocabulary and keeps the recent ones."""

    def __init__(self, vocab: Vocabulary, capacity: int = 64, threads: int = 2,
                 timeout_s: float | None = None) -> None:
        self.vocab = vocab
        # A compile runs in a thread of its own (xgrammar releases the GIL), so a schema
        # that would compile for minutes is given up on; the thread cannot be stopped,
        # so the worker that started it exits after answering (worker_process.py).
        self.timeout_s = timeout_s
        self._compile_thread: ThreadPoolExecutor | None = None
        self._info = vocab.tokenizer_info()
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=threads)
        self._lru: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()  # key -> compiled
        self._closers: dict[bool, tuple[np.ndarray, ...]] = {}
        self._answer: xgr.CompiledGrammar | None = None
        self.capacity = capacity
        self.hits = 0
        self.misses = 0

    def compiled(self, tools: list[dict[str, Any]], tool_choice: ToolChoice,
                 parallel: bool) -> xgr.CompiledGrammar | None:
        """The grammar of the calls a request may make (`auto` shares `required`'s)."""
        tag = structural_tag(tools, tool_choice, parallel)
        if tag is None:
            return None
        choice = "required" if tool_choice == "auto" else tool_choice
        key = f"{tools_hash(tools)}:{choice}:{int(parallel)}"
        if key in self._lru:
            self.hits += 1
            self._lru.move_to_end(key)
            return self._lru[key]
        self.misses += 1
        try:
            compiled = self._compile(json.dumps(tag), tools)
        except (RuntimeError, ValueError) as exc:
            # xgrammar rejects schema features it cannot turn into a grammar.
            names = ",".join(t["function"]["name"] for t in tools)
            raise UnsupportedSchema(names, str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc
        self._lru[key] = compiled
        if len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return compiled

    def answer(self) -> xgr.CompiledGrammar:
        """The grammar of a text answer: one per vocabulary, whatever the tools."""
        if self._answer is None:
            self._answer = self._compiler.compile_structural_tag(json.dumps(ANSWER_TAG))
        return self._answer

    def _compile(self, tag: str, tools: list[dict[str, Any]]) -> xgr.CompiledGrammar:
        if self.timeout_s is None:
            return self._compiler.compile_structural_tag(tag)
        if self._compile_thread is None:
            self._compile_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        future = self._compile_thread.submit(self._compiler.compile_structural_tag, tag)
        try:
            return future.result(self.timeout_s)
        except FutureTimeout:
            raise GrammarTooComplex(",".join(t["function"]["name"] for t in tools), self.timeout_s) from None

    def closers(self, in_string: bool) -> tuple[np.ndarray, ...]:
        """Token ids that move a JSON value towards its end, best first.

        Inside a string: those that close it (and at most close arrays or objects
        after it). Outside: those made only of closing brackets, then those that
        start with a comma (an object with required members left must go on to the
        next one rather than grow the current number or word).
        """
        if in_string not in self._closers:
            # An odd number of quotes leaves the string; an even one (none) stays out.
            pieces = self.vocab.pieces
            quotes = [p.count(b'"') - p.count(b'\\"') for p in pieces]
            if in_string:
                tiers = [[i for i, (p, q) in enumerate(zip(pieces, quotes))
                          if q == 1 and not p[p.rindex(b'"') + 1:].strip(b" \t\n]}")]]
            else:
                # Only closing brackets: "}," closes one object but opens the next item.
                tiers = [[i for i, p in enumerate(pieces) if p.strip() and not p.strip().strip(b"]}")],
                         [i for i, p in enumerate(pieces) if p.lstrip()[:1] == b","]]
            self._closers[in_string] = tuple(np.array(t, dtype=np.int64) for t in tiers)
        return self._closers[in_string]

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._lru)}


class TokenMask:
    """One generation's grammar state: masks logits, accepts the sampled tokens."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = np.full(xgr.get_bitmask_shape(1, vocab_size), -1, dtype=np.int32)
        self._vocab_size = vocab_size
        self.dead_end = False

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar forbids to -inf, in place.

        Unpacking the bitmask with numpy works on any logits array, contiguous or
        strided (xgrammar's torch CPU kernel silently masks the wrong tokens on a
        strided view), and costs a few microseconds per token.
        """
        if (bits := self._bits()) is not None:
            logits[~bits[: logits.shape[-1]].astype(bool)] = -np.inf

    def allowed(self) -> np.ndarray:
        """Which tokens the grammar allows next (bool, one per token), without masking."""
        bits = self._bits()
        return np.ones(self._vocab_size, dtype=bool) if bits is None else bits[: self._vocab_size].astype(bool)

    def _bits(self) -> np.ndarray | None:
        """The next token's bitmask unpacked (1: allowed), or None when all are allowed."""
        if not self.matcher.fill_next_token_bitmask(self._bitmask):
            return None
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")

    def accept(self, token: int) -> bool:
        ok = self.matcher.accept_token(token)
        if not ok:
            self.dead_end = True
        return ok

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()
