"""One generation's state and the pure helpers of llama.py's decode loop: sampling,
repetition-loop detection, where to cut a looping call, per-call log-probability stats.

Nothing here touches llama.cpp: the loop (llama.py) owns the model and the context;
these functions only read what it has generated so far.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import GenerationRequest
from . import toolcalls


@dataclass
class Run:
    """One generation's output as it grows: tokens, their bytes and log-probabilities."""

    budget: int  # max_tokens, or what the context has left
    prompt_len: int
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # chosen tokens, after the mask
    offsets: list[int] = field(default_factory=list)  # each token's byte offset in `written`
    written: bytearray = field(default_factory=bytearray)  # the exact bytes generated
    repairs: list[tuple[int, str]] = field(default_factory=list)  # (byte offset, why) a call was cut
    finish: str = "length"
    dead_end: bool = False
    calls: toolcalls.CallScanner = field(default_factory=toolcalls.CallScanner)
    floor: int = 0  # tokens already streamed to the agent: never cut (see settled)

    def add(self, tok: int, piece: bytes, logprob: float) -> None:
        self.out.append(tok)
        self.offsets.append(len(self.written))
        self.written += piece
        self.logprobs.append(logprob)
        self.calls.feed(piece)

    def truncate(self, n: int) -> None:
        del self.written[self.offsets[n]:]
        del self.out[n:], self.offsets[n:], self.logprobs[n:]
        self.calls = toolcalls.CallScanner(bytes(self.written))

    @property
    def in_call(self) -> bool:
        return self.calls.in_call


# A loop is a run of tokens repeated back to back at least LOOP_MIN_REPEATS times and
# over at least LOOP_MIN_TOKENS tokens, with a period of at most LOOP_MAX_PERIOD. Real
# arguments rarely do that ("1000000000000" is 4 x "000" but only 4 tokens).
LOOP_MIN_REPEATS = 4
LOOP_MIN_TOKENS = 16
LOOP_MAX_PERIOD = 24
# Tokens kept for steering a cut call to its end; also how close to max_tokens an open
# call is closed early.
LOOP_CLOSE_TOKENS = 32


def degenerate_loop(tokens: list[int]) -> tuple[int, int] | None:
    """(tokens to drop to leave one copy, the loop's period), or None if no loop."""
    n = len(tokens)
    for period in range(1, LOOP_MAX_PERIOD + 1):
        need = max(LOOP_MIN_REPEATS, -(-LOOP_MIN_TOKENS // period))
        if n < period * need:
            break
        if tokens[-1] != tokens[-1 - period]:
            continue  # not even one repeat at this period (most periods, most tokens)
        unit = tokens[n - period:]
        reps = 1
        while reps * period + period <= n and tokens[n - (reps + 1) * period: n - reps * period] == unit:
            reps += 1
        if reps >= need:
            return (reps - 1) * period, period
    return None


def settled(run: Run) -> int:
    """How many leading tokens of `run` no later loop cut can remove (streaming sends
    only those). Cuts happen only inside a call, and only to a tail that repeats with
    some period p <= LOOP_MAX_PERIOD, keeping its first copy: a loop found later can
    reach back into the tokens there are now only as far as they already repeat with
    that period. (The cut's choice of phase, `_cut_loop`, never goes below
    `run.floor`, the tokens already sent.) So outside a call everything is settled, and
    inside one only a tail that is already repeating waits."""
    n = len(run.out)
    spans = run.calls.spans
    if not run.in_call or not spans:
        return n
    tokens, repeating = run.out, 0
    for period in range(1, LOOP_MAX_PERIOD + 1):
        k = 0
        while n - 1 - k - period >= 0 and tokens[n - 1 - k] == tokens[n - 1 - k - period]:
            k += 1
        repeating = max(repeating, k)
    if repeating == 0:
        return n
    call_start = next((i for i, at in enumerate(run.offsets) if at >= spans[-1][0]), n)
    return max(call_start, n - repeating, run.floor)


class TextStream:
    """Sends a generation's settled text as it grows, whole UTF-8 characters only; the
    pieces sent join to a prefix of the final text (decoded the same way).

    `push(run, forced)` may also send text the grammar forces next and the loop has not
    decoded yet (a call's head: the tag, the name): no choice is left in it, so it is
    sent as soon as the model has chosen it, not a token at a time after that."""

    def __init__(self, send: Callable[[str], None]) -> None:
        self._send = send
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._sent = 0  # bytes of the output passed to the decoder (may run ahead of `written`)

    def push(self, run: Run, forced: bytes = b"") -> None:
        k = settled(run)
        upto = len(run.written) if k >= len(run.out) else run.offsets[k]
        data, sent = b"", self._sent
        if upto > sent:
            data, sent = bytes(run.written[sent:upto]), upto
        if forced and upto == len(run.written) and upto + len(forced) > sent:
            # Everything decoded is settled, so the forced text follows what was sent.
            data += forced[sent - upto:]
            sent = upto + len(forced)
        if sent > self._sent:
            self._sent = sent
            if text := self._decoder.decode(data):
                self._send(text)
        # A loop cut keeps what has been sent: every token whose bytes went out.
        run.floor = max(k, sum(1 for at in run.offsets if at < self._sent))


def cut_quality(written: bytearray, at: int) -> int:
    """How cleanly a call cut at byte `at` can be closed: 0 best."""
    kept, rest = written[:at], written[at:]
    if toolcalls.CallScanner(bytes(kept)).in_string:
        return 1 if rest.startswith(b'"') else 2  # `"abc` + `"...`: the string was whole
    return 0 if kept.rstrip()[-1:] not in (b",", b":", b"[", b"{") else 3


def repeats_a_call(run: Run) -> bool:
    """Has the call that just closed been made before in this answer?"""
    spans = run.calls.spans
    if not spans or spans[-1][1] != len(run.written):
        return False
    block = lambda span: bytes(run.written[span[0]:span[1]]).strip()  # noqa: E731
    return block(spans[-1]) in {block(s) for s in spans[:-1]}


def call_stats(run: Run) -> list[dict[str, Any]]:
    """Per tool call, in order: its tokens' log-probabilities (mean, min, count) and,
    if it was cut short and closed, why ("loop" or "length"; else None)."""
    stats = []
    starts = np.asarray(run.offsets)
    lp = np.asarray(run.logprobs)
    for start, end in run.calls.spans:
        end = len(run.written) if end is None else end
        mine = lp[(starts >= start) & (starts < end)]
        stats.append({
            # `free`: tokens the grammar left a choice for (a forced token's log-prob is 0
            # after the mask), the ones that carry the model's doubt.
            "logprob": {"mean": float(mine.mean()) if mine.size else None,
                        "min": float(mine.min()) if mine.size else None, "tokens": int(mine.size),
                        "sum": float(mine.sum()), "free": int((mine < -1e-6).sum())},
            "repaired": next((why for at, why in run.repairs if start <= at <= end), None)})
    return stats


def sample(logits: np.ndarray, request: GenerationRequest, rng: np.random.Generator) -> int:
    if request.temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / request.temperature
    if 0 < request.top_k < scaled.shape[0]:
        kth = np.partition(scaled, -request.top_k)[-request.top_k]
        scaled[scaled < kth] = -np.inf
    probs = np.exp(scaled - np.max(scaled))
    probs /= probs.sum()
    if request.top_p < 1.0:
        order = np.argsort(-probs)
        cut = np.searchsorted(np.cumsum(probs[order]), request.top_p) + 1
        keep = np.zeros_like(probs, dtype=bool)
        keep[order[:cut]] = True
        probs[~keep] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))
