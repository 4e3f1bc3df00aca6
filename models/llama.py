"""The llama.cpp backend: a GGUF file, loaded once, generating under an xgrammar mask.

Decoding is driven here, token by token, through llama.cpp's public low-level calls
(`eval`, `llama_get_logits_ith`) rather than `Llama.generate`: that keeps the logits
a contiguous numpy array we mask in place, gives the exact post-mask log-probability
of every chosen token, and makes `seed` mean the same thing on every backend.

The KV cache keeps the last prompt; a new prompt that shares its prefix (the same
system block and tools, say) only evaluates the rest.

The vocabulary xgrammar needs (every token's bytes) takes longer to read than a small
model takes to load, so it is built on the first constrained request, not at load,
and kept on disk beside the model (keyed by the file's sha256) for the next load.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import psutil
import numpy as np

from outpost.manifests.schema import Manifest

from .backend import Generation, GenerationRequest
from .errors import ContextOverflow, ModelLoadFailed
from .grammar import GrammarCache, TokenMask, Vocabulary
from .schemas import check_tools
from .templates import TOOL_CALL_CLOSE, ChatTemplate
from . import toolcalls


def gpu_offload_available() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaModel:
    """A GGUF model in memory. Not thread-safe: one generation at a time."""

    def __init__(self, manifest: Manifest, path: Path, *, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int | str = "auto",
                 vocab_cache: Path | None = None) -> None:
        if n_gpu_layers == "auto":
            n_gpu_layers = -1
        self.manifest = manifest
        # What is really offloaded: a CPU-only build of llama.cpp runs everything on CPU.
        self.n_gpu_layers = int(n_gpu_layers) if gpu_offload_available() else 0
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(path), n_ctx=manifest.context_length, n_batch=n_batch,
                n_threads=n_threads or default_threads(), n_gpu_layers=self.n_gpu_layers,
                logits_all=False, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadFailed(f"llama.cpp could not load {manifest.id}: {exc}",
                                  model=manifest.id) from exc
        self.n_ctx = self._llama.n_ctx()
        self.n_vocab = self._llama.n_vocab()
        self._vocab_ptr = llama_cpp.llama_model_get_vocab(self._llama.model)
        self._vocab_cache = vocab_cache
        # What closing an open call can cost at most in tokens, beyond the values:
        # a string, an array and two objects, then the closing tag.
        self._close_cost = len(self._llama.tokenize(
            b'"]}}\n' + TOOL_CALL_CLOSE.encode(), add_bos=False, special=False))
        self._grammars: GrammarCache | None = None
        self.template = ChatTemplate.from_manifest(
            manifest.chat_template, self._llama.metadata.get("tokenizer.chat_template"))

    @property
    def grammars(self) -> GrammarCache:
        if self._grammars is None:
            vocab = None
            if self._vocab_cache is not None and self._vocab_cache.exists():
                vocab = Vocabulary.load(self._vocab_cache, self.n_vocab)
            if vocab is None:
                vocab = self._read_vocabulary()
                if self._vocab_cache is not None:
                    vocab.save(self._vocab_cache)
            self._grammars = GrammarCache(vocab)
        return self._grammars

    @property
    def vocab(self) -> Vocabulary:
        return self.grammars.vocab

    # -- construction ----------------------------------------------------------------
    def _read_vocabulary(self) -> Vocabulary:
        n = llama_cpp.llama_vocab_n_tokens(self._vocab_ptr)
        buf = ctypes.create_string_buffer(256)
        pieces: list[bytes] = []
        stops: list[int] = []
        for tok in range(n):
            if llama_cpp.llama_vocab_is_eog(self._vocab_ptr, tok):
                stops.append(tok)
            # special=False: control tokens come back empty and stay out of grammars.
            size = llama_cpp.llama_token_to_piece(self._vocab_ptr, tok, buf, len(buf), 0, False)
            if size < 0:  # piece longer than the buffer
                big = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self._vocab_ptr, tok, big, len(big), 0, False)
                pieces.append(big.raw[:size])
            else:
                pieces.append(buf.raw[:size])
        return Vocabulary(pieces=pieces, stop_ids=stops, size=self.n_vocab)

    def info(self) -> dict[str, Any]:
        info = {"n_ctx": self.n_ctx, "n_vocab": self.n_vocab, "n_gpu_layers": self.n_gpu_layers,
                "n_layer": llama_cpp.llama_model_n_layer(self._llama.model)}
        if self._grammars is not None:
            info["grammar_cache"] = self._grammars.stats()
        return info

    def close(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is not None:
            llama.close()
            self._llama = None

    # -- generation ------------------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        tools = request.tools if request.tool_choice != "none" else None
        return self.template.render(request.messages, tools)

    def generate(self, request: GenerationRequest) -> Generation:
        if request.tools:
            check_tools(request.tools)
        compiled = None
        if request.tools and request.constrained:
            compiled = self.grammars.compiled(request.tools, request.tool_choice,
                                              request.parallel_tool_calls)
        prompt_text = self.render(request)
        prompt = self._llama.tokenize(prompt_text.encode("utf-8"), add_bos=True, special=True)
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        budget = min(request.max_tokens, self.n_ctx - len(prompt))
        mask = TokenMask(compiled, self.n_vocab) if compiled is not None else None
        rng = np.random.default_rng(request.seed)

        t0 = time.perf_counter()
        self._eval_prompt(prompt)
        t1 = time.perf_counter()
        run = _Run(budget=budget, prompt_len=len(prompt))
        self._decode(run, mask, request, rng)
        t2 = time.perf_counter()

        text = run.written.decode("utf-8", errors="replace")
        content, tool_calls, validation = text, [], []
        finish = run.finish
        if request.tools and request.tool_choice != "none":
            content, parsed = toolcalls.parse(text, loose=mask is None)
            stats = _call_stats(run) if mask is not None else None
            tool_calls, validation = toolcalls.to_openai(parsed, request.tools, stats)
            if tool_calls and finish == "stop":
                finish = "tool_calls"
        return Generation(
            text=text, content=content, tool_calls=tool_calls, finish_reason=finish,
            prompt_tokens=len(prompt), completion_tokens=len(run.out),
            prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3,
            constrained=mask is not None, grammar_dead_end=run.dead_end, logprobs=run.logprobs,
            validation=validation, repaired=len(run.repairs), prompt=prompt_text,
            grammar=(f"xgrammar tool_choice={request.tool_choice} "
                     f"parallel={request.parallel_tool_calls}") if mask is not None else None)

    # One loop on purpose (64 lines): the per-token hot path reads top to bottom, and
    # splitting it would add a call per token and hide the order of mask, sample, accept.
    def _decode(self, run: _Run, mask: TokenMask | None, request: GenerationRequest,
                rng: np.random.Generator) -> None:
        """Generate into `run`, one token per forward pass, until a stop token, the
        grammar's end or max_tokens.

        Under a grammar, a call must not end unclosed. Two things would leave it so:
        a degenerate loop (cut back to one copy of what repeats) and max_tokens
        arriving mid-call (the last `reserve` tokens are kept for closing). Either
        way the call is then steered to its end: the tokens that close the open
        string, array or object are preferred, and text the grammar forces (keys,
        `}`, the closing tag) is evaluated in one batch rather than token by token.
        """
        # Enough to close a string and a couple of containers, plus the closing tag.
        reserve = min(LOOP_CLOSE_TOKENS, max(12, run.budget // 8)) + self._close_cost
        closing_left = -1  # >= 0 while steering a cut call to its end
        for _ in range(2 * run.budget):  # rollbacks give tokens back; this bounds the passes
            if len(run.out) >= run.budget:
                return
            if closing_left >= 0:
                if (forced := mask.matcher.find_jump_forward_string()) and self._jump(run, mask, forced):
                    if not run.in_call:
                        closing_left = -1
                    continue
                closing_left -= 1
                if closing_left < 0:
                    return  # could not close it: reported as a truncated, invalid call
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self._llama.ctx, -1), shape=(self.n_vocab,))
            if mask is not None:
                mask.apply(logits)
                if (closing_left < 0 and not run.in_call and run.calls.spans
                        and run.budget - len(run.out) <= 2 * reserve
                        and np.isfinite(logits[self.grammars.vocab.stop_ids]).any()):
                    # Calls are done and the grammar lets the answer end here; another
                    # call could not be finished within max_tokens, so do not start one.
                    run.finish = "stop"
                    return
            tok = (self._closing_token(logits, run.calls.in_string) if closing_left >= 0
                   else _sample(logits, request, rng))
            if not np.isfinite(logits[tok]) or (mask is not None and not mask.accept(tok)):
                run.finish, run.dead_end = "stop", True  # the grammar allowed nothing
                return
            if llama_cpp.llama_vocab_is_eog(self._vocab_ptr, tok):
                run.finish = "stop"
                return
            run.add(tok, self._piece(tok), float(logits[tok] - _logsumexp(logits)))
            if mask is not None:
                if closing_left >= 0 and not run.in_call:
                    closing_left = -1
                if closing_left < 0 and run.in_call:
                    if run.budget - len(run.out) <= reserve:
                        # A long list or a counting sequence: close it now rather than
                        # have max_tokens cut it off invalid.
                        run.repairs.append((len(run.written), "length"))
                        closing_left = reserve
                    elif loop := _degenerate_loop(run.out):
                        tok = self._cut_loop(run, mask, *loop)
                        closing_left = LOOP_CLOSE_TOKENS
                elif _repeats_a_call(run):
                    # Greedy decoding also loops on whole calls; a repeat carries no
                    # information, so stop instead of burning max_tokens.
                    run.finish = "stop"
                    return
            self._llama.eval([tok])

    def _cut_loop(self, run: _Run, mask: TokenMask, cut: int, period: int) -> int:
        """Drop a loop's repeats (keeping one copy) from the output, the grammar state
        and the KV cache; returns the token to evaluate next."""
        # Of the copy's phases, cut where the rest closes cleanly:
        # `["a", "a", ...` -> `["a", "a` + `"]`, not `["a", "` + `"]`.
        cut += min((k for k in range(period) if cut + k < len(run.out)),
                   key=lambda k: _cut_quality(run.written, run.offsets[-(cut + k)]))
        mask.matcher.rollback(cut)
        run.truncate(len(run.out) - cut)
        run.repairs.append((len(run.written), "loop"))
        self._forget_tail(run.prompt_len + len(run.out) - 1)
        return run.out[-1]

    def _jump(self, run: _Run, mask: TokenMask, forced: str) -> bool:
        """Take text the grammar forces in one batch: accepted by the grammar,
        tokenized, evaluated at once. False if it does not fit in max_tokens."""
        data = forced.encode("utf-8")
        tokens = self._llama.tokenize(data, add_bos=False, special=False)
        if len(run.out) + len(tokens) > run.budget or not mask.matcher.accept_string(data):
            return False
        for tok in tokens:
            run.add(tok, self._piece(tok), 0.0)  # forced: probability 1
        self._llama.eval(tokens)
        return True

    def _piece(self, tok: int) -> bytes:
        if self._grammars is not None:
            return self._grammars.vocab.pieces[tok]
        buf = ctypes.create_string_buffer(256)
        size = llama_cpp.llama_token_to_piece(self._vocab_ptr, tok, buf, len(buf), 0, False)
        if size < 0:
            buf = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab_ptr, tok, buf, len(buf), 0, False)
        return buf.raw[:size]

    def _closing_token(self, logits: np.ndarray, in_string: bool) -> int:
        """The likeliest allowed token of the best tier that moves towards the end of
        the call (see GrammarCache.closers), else the likeliest allowed token: the
        call ends within a few tokens, with whatever the model had written before."""
        for tier in self.grammars.closers(in_string):
            allowed = tier[np.isfinite(logits[tier])]
            if allowed.size:
                return int(allowed[np.argmax(logits[allowed])])
        return int(np.argmax(logits))

    def _forget_tail(self, keep: int) -> None:
        """Drop every cached position from `keep` on (the caller evaluates the next)."""
        mem = llama_cpp.llama_get_memory(self._llama.ctx)
        llama_cpp.llama_memory_seq_rm(mem, -1, keep, -1)
        self._llama.n_tokens = keep

    def _eval_prompt(self, prompt: list[int]) -> None:
        """Evaluate `prompt`, reusing the KV cache for the prefix it shares with the last one."""
        llama = self._llama
        cached = llama.input_ids[: llama.n_tokens].tolist()
        keep = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # always evaluate >= 1 token to get fresh logits
        mem = llama_cpp.llama_get_memory(llama.ctx)
        if keep > 0 and not llama_cpp.llama_memory_seq_rm(mem, -1, keep, -1):
            keep = 0  # this cache cannot drop a suffix (e.g. recurrent state): start over
        if keep == 0:
            llama_cpp.llama_memory_clear(mem, True)
        llama.n_tokens = keep
        llama.eval(prompt[keep:])


@dataclass
class _Run:
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


def _degenerate_loop(tokens: list[int]) -> tuple[int, int] | None:
    """(tokens to drop to leave one copy, the loop's period), or None if no loop."""
    n = len(tokens)
    for period in range(1, LOOP_MAX_PERIOD + 1):
        need = max(LOOP_MIN_REPEATS, -(-LOOP_MIN_TOKENS // period))
        if n < period * need:
            break
        unit = tokens[n - period:]
        reps = 1
        while reps * period + period <= n and tokens[n - (reps + 1) * period: n - reps * period] == unit:
            reps += 1
        if reps >= need:
            return (reps - 1) * period, period
    return None


def _cut_quality(written: bytearray, at: int) -> int:
    """How cleanly a call cut at byte `at` can be closed: 0 best."""
    kept, rest = written[:at], written[at:]
    if toolcalls.CallScanner(bytes(kept)).in_string:
        return 1 if rest.startswith(b'"') else 2  # `"abc` + `"...`: the string was whole
    return 0 if kept.rstrip()[-1:] not in (b",", b":", b"[", b"{") else 3


def _repeats_a_call(run: _Run) -> bool:
    """Has the call that just closed been made before in this answer?"""
    spans = run.calls.spans
    if not spans or spans[-1][1] != len(run.written):
        return False
    block = lambda span: bytes(run.written[span[0]:span[1]]).strip()  # noqa: E731
    return block(spans[-1]) in {block(s) for s in spans[:-1]}


def _call_stats(run: _Run) -> list[dict[str, Any]]:
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


def _sample(logits: np.ndarray, request: GenerationRequest, rng: np.random.Generator) -> int:
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


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))


def default_threads() -> int:
    """Half the physical cores: several workers decode at once on one machine, and
    llama.cpp's threads spin while waiting, so oversubscribing the cores costs far
    more than it gains (measured: 2 workers x 2 threads on 2 cores served mixed
    requests at about half the rate of 2 x 1)."""
    return max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 2) // 2)
