"""Generation, the same for every backend: a prompt rendered and evaluated, under
`tool_choice: auto` the decision to call or to answer (decision.py), then one token per
forward pass under the xgrammar mask of the side chosen (text the grammar forces is
taken in one pass: jump-forward), with loop and length repair, the chosen tokens'
log-probabilities and streaming. A backend (llama.py, onnx.py) gives
the forward pass, the KV cache, tokenization and the vocabulary; everything an agent
or the log can see is decided here, so no behaviour forks by backend.

What this module must not do: import a backend's runtime (llama_cpp, onnxruntime).
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from outpost.manifests.errors import OutpostError
from outpost.manifests.schema import Manifest

from .backend import AdapterRef, Generation, GenerationRequest
from .deciding import Deciding, PendingDecision
from .decision import Decision
from .errors import AdapterLoadFailed, ContextOverflow
from .grammar import GrammarCache, TokenMask, Vocabulary
from .schemas import check_tools
from .templates import TOOL_CALL_CLOSE, ChatTemplate
from . import toolcalls
from .decoding import (LOOP_CLOSE_TOKENS, Run, TextStream, call_stats, cut_quality, degenerate_loop,
                       logsumexp, repeats_a_call, sample)


class Decoder(Deciding, ABC):
    """A loaded model that generates: the backend-independent half. Not thread-safe:
    one generation at a time.

    A subclass sets `manifest`, `n_ctx`, `n_vocab` (the logits' width) and `template`,
    calls `_init_decoder`, and provides the hooks below. Its `_eval`/`_eval_many` also
    keep the logits of one marked prompt position per slot, for the decision
    (deciding.py: `_marked` says where in a pass it falls, `_keep` stores the row).
    """

    manifest: Manifest
    n_ctx: int
    n_vocab: int
    template: ChatTemplate
    jump_forward = True  # off only to measure what it saves (tools/bench_jump.py)

    def _init_decoder(self, vocab_cache: Path | None, grammar_timeout_s: float | None = None) -> None:
        self._vocab_cache = vocab_cache
        self._grammar_timeout_s = grammar_timeout_s
        self._grammars: GrammarCache | None = None
        self._init_deciding()
        # What closing an open call can cost at most in tokens, beyond the values:
        # a string, an array and two objects, then the closing tag.
        self._close_cost = len(self.tokenize(b'"]}}\n' + TOOL_CALL_CLOSE.encode(), prompt=False))

    # -- what a backend provides ---------------------------------------------------------
    @abstractmethod
    def tokenize(self, data: bytes, *, prompt: bool) -> list[int]:
        """Token ids of `data`. A prompt gets the model's BOS and its control tokens
        parsed (`<|im_start|>`); generated text is plain text."""

    # A backend that decodes several sequences together (llama.py) has `n_slots` > 1
    # and a `slot` per sequence, each with its own cache; one that does not has slot 0.
    n_slots: int = 1
    n_batch: int = 1 << 30  # tokens one forward pass takes at most (a backend without a limit chunks itself)

    @abstractmethod
    def _eval(self, tokens: list[int], slot: int = 0) -> None:
        """Run `tokens` through the model after the slot's cached positions; their keys
        and values join its cache, and the last one's logits are what `_logits` returns."""

    def _eval_many(self, work: list[tuple[int, list[int], bool]]) -> None:
        """One forward pass for several slots: (slot, tokens, whether its logits are
        wanted). A backend with one slot runs them one by one."""
        for slot, tokens, _ in work:
            self._eval(tokens, slot)

    @abstractmethod
    def _logits(self, slot: int = 0) -> np.ndarray:
        """The slot's last evaluated position's logits: float32, contiguous, writable
        (the mask is applied in place), `n_vocab` wide."""

    @abstractmethod
    def _cached(self, slot: int = 0) -> list[int]:
        """The tokens whose keys and values the slot's cache holds, in order."""

    @abstractmethod
    def _truncate(self, keep: int, slot: int = 0) -> bool:
        """Forget every cached position of the slot from `keep` on; False if this cache cannot."""

    def _share(self, src: int, dst: int, n: int) -> bool:
        """Make slot `dst` hold slot `src`'s first `n` positions; False if this cache cannot."""
        return False

    @abstractmethod
    def _is_eog(self, tok: int) -> bool:
        """Whether `tok` ends the answer (end of turn or of text)."""

    @abstractmethod
    def _token_bytes(self, tok: int) -> bytes:
        """What `tok` decodes to (b"" for control tokens)."""

    @abstractmethod
    def _read_vocabulary(self) -> Vocabulary:
        """Every token's bytes (control tokens empty) and the stop tokens."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What `ps` and the footprint ledger show of the loaded model."""

    @abstractmethod
    def close(self) -> None:
        """Free the model (the worker exits after)."""

    def use_adapter(self, ref: AdapterRef | None) -> None:
        """Apply `ref` (None: the base alone) to the generations that follow."""
        if ref is not None:
            raise AdapterLoadFailed(self.manifest.id, ref.id, "this backend serves no adapters")

    def adapter_info(self) -> dict[str, Any]:
        return {"adapters": [], "adapter": None, "adapter_switches": 0}

    # -- the vocabulary, built once --------------------------------------------------------
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
            self._grammars = GrammarCache(vocab, timeout_s=self._grammar_timeout_s)
        return self._grammars

    @property
    def vocab(self) -> Vocabulary:
        return self.grammars.vocab

    # -- generation ----------------------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        tools = request.tools if request.tool_choice != "none" else None
        return self.template.render(request.messages, tools)

    def generate(self, request: GenerationRequest,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        """One answer, alone on slot 0. `on_text` (streaming) is given the generated text
        as it settles: pieces that join to a prefix of `Generation.text`
        (decoding.settled says when a piece can no longer be cut by a loop repair)."""
        self.use_adapter(request.adapter)
        seq = self.start(request, on_text)
        seq.slot = 0
        for tokens in seq.steps:
            self._eval(tokens, 0)
            seq.passes += 1
            seq.batched += 1
        assert seq.result is not None
        return seq.result

    def start(self, request: GenerationRequest, on_text: Callable[[str], None] | None = None) -> Sequence:
        """A generation ready to step: everything that can refuse the request (its tools,
        the grammar, the context) is checked here, before it joins a batch. The caller
        applies the request's adapter first and gives the sequence a slot."""
        if request.tools:
            check_tools(request.tools)
        compiled = None
        if request.tools and request.constrained:
            compiled = self.grammars.compiled(request.tools, request.tool_choice,
                                              request.parallel_tool_calls)
        prompt_text = self.render(request)
        prompt = self.tokenize(prompt_text.encode("utf-8"), prompt=True)
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        pending = self._pending(request, prompt, compiled)
        seq = Sequence(request=request, prompt=prompt, prompt_text=prompt_text,
                       mask=TokenMask(compiled, self.n_vocab) if compiled is not None and pending is None else None,
                       stream=TextStream(on_text) if on_text else None, pending=pending)
        seq.steps = self._steps(seq)
        return seq

    def _steps(self, seq: Sequence) -> Iterator[list[int]]:
        """The generation of `seq` as a series of forward passes: each `yield` hands
        out the tokens to evaluate on its slot next and resumes once they have been."""
        request = seq.request
        rng = np.random.default_rng(request.seed)
        t0 = time.perf_counter()
        pending = seq.pending
        yield from self._prompt_steps(seq.prompt, seq.slot, pending.turn_end if pending else None)
        if pending is not None:
            seq.decision, seq.mask = self._decide(seq)
        t1 = time.perf_counter()
        run = Run(budget=min(request.max_tokens, self.n_ctx - len(seq.prompt)), prompt_len=len(seq.prompt))
        yield from self._decode(run, seq.mask, request, rng, seq.stream, seq.slot)
        t2 = time.perf_counter()
        seq.result = self._answer(seq, run, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def _answer(self, seq: Sequence, run: Run, prefill_ms: float, decode_ms: float) -> Generation:
        request, mask = seq.request, seq.mask
        text = run.written.decode("utf-8", errors="replace")
        content, tool_calls, validation = text, [], []
        finish = run.finish
        if request.tools and request.tool_choice != "none":
            content, parsed = toolcalls.parse(text, loose=mask is None)
            stats = call_stats(run) if mask is not None else None
            tool_calls, validation = toolcalls.to_openai(parsed, request.tools, stats)
            if tool_calls and finish == "stop":
                finish = "tool_calls"
        return Generation(
            text=text, content=content, tool_calls=tool_calls, finish_reason=finish,
            prompt_tokens=len(seq.prompt), completion_tokens=len(run.out),
            prefill_ms=prefill_ms, decode_ms=decode_ms,
            constrained=mask is not None, grammar_dead_end=run.dead_end, logprobs=run.logprobs,
            validation=validation, repaired=len(run.repairs), prompt=seq.prompt_text,
            grammar=(f"xgrammar tool_choice={request.tool_choice} parallel={request.parallel_tool_calls}"
                     + (f" decided={seq.decision.choice}" if seq.decision else "")) if mask is not None else None,
            batch_size=round(seq.batched / seq.passes, 2) if seq.passes else 1.0, decision=seq.decision)

    # One loop on purpose (about 70 lines): the per-token hot path reads top to bottom, and
    # splitting it would add a call per token and hide the order of mask, sample, accept.
    def _decode(self, run: Run, mask: TokenMask | None, request: GenerationRequest,
                rng: np.random.Generator, stream: TextStream | None = None,
                slot: int = 0) -> Iterator[list[int]]:
        """Generate into `run`, one token per forward pass (or what the grammar forces,
        in one: `_ahead`), until a stop token, the grammar's end or max_tokens; each
        pass is a `yield` of the tokens to evaluate.

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
            if stream is not None:
                stream.push(run, self._forced(run, mask, reserve))
            if len(run.out) >= run.budget:
                return
            if closing_left >= 0:
                if (forced := mask.matcher.find_jump_forward_string()) and (tokens := self._jump(run, mask, forced)):
                    yield tokens
                    if not run.in_call:
                        closing_left = -1
                    continue
                closing_left -= 1
                if closing_left < 0:
                    return  # could not close it: reported as a truncated, invalid call
            elif mask is not None and self.jump_forward and (tokens := self._ahead(run, mask, reserve)):
                yield tokens  # what the grammar forces, in one pass instead of one each
                continue
            logits = self._logits(slot)
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
                   else sample(logits, request, rng))
            if not np.isfinite(logits[tok]) or (mask is not None and not mask.accept(tok)):
                run.finish, run.dead_end = "stop", True  # the grammar allowed nothing
                return
            if self._is_eog(tok):
                run.finish = "stop"
                return
            run.add(tok, self._piece(tok), float(logits[tok] - logsumexp(logits)))
            if mask is not None:
                if closing_left >= 0 and not run.in_call:
                    closing_left = -1
                if closing_left < 0 and run.in_call:
                    if run.budget - len(run.out) <= reserve:
                        # A long list or a counting sequence: close it now rather than
                        # have max_tokens cut it off invalid.
                        run.repairs.append((len(run.written), "length"))
                        closing_left = reserve
                    elif loop := degenerate_loop(run.out):
                        tok = yield from self._cut_loop(run, mask, slot, *loop)
                        closing_left = LOOP_CLOSE_TOKENS
                elif repeats_a_call(run):
                    # Greedy decoding also loops on whole calls; a repeat carries no
                    # information, so stop instead of burning max_tokens.
                    run.finish = "stop"
                    return
            if stream is not None:
                stream.push(run)  # the sampled token goes out before its forward pass
            yield [tok]

    def _forced(self, run: Run, mask: TokenMask | None, reserve: int) -> bytes:
        """What the grammar forces next, when a stream may send it ahead: at the start of
        the answer or of a call (a head: tag and name), and only if max_tokens leaves room
        for it to be decoded (each token is at least a byte)."""
        if mask is None:
            return b""
        spans = run.calls.spans
        after_call = bool(spans) and spans[-1][1] == len(run.written)
        in_head = run.in_call and len(run.written) - spans[-1][0] < 128
        if run.out and not after_call and not in_head:
            return b""
        forced = mask.matcher.find_jump_forward_string().encode("utf-8")
        return forced if len(run.out) + len(forced) + reserve < run.budget else b""

    def _cut_loop(self, run: Run, mask: TokenMask, slot: int, cut: int, period: int) -> Iterator[list[int]]:
        """Drop a loop's repeats (keeping one copy) from the output, the grammar state
        and the KV cache; returns the token to evaluate next."""
        # Of the copy's phases, cut where the rest closes cleanly:
        # `["a", "a", ...` -> `["a", "a` + `"]`, not `["a", "` + `"]`.
        # Streaming: what has been sent stays (decoding.settled counts on that).
        cut = min(cut, len(run.out) - run.floor)
        cut += min((k for k in range(period) if cut + k < len(run.out) - run.floor),
                   key=lambda k: cut_quality(run.written, run.offsets[-(cut + k)]), default=0)
        mask.matcher.rollback(cut)
        run.truncate(len(run.out) - cut)
        run.repairs.append((len(run.written), "loop"))
        keep = run.prompt_len + len(run.out) - 1
        if not self._truncate(keep, slot):
            # This cache cannot drop a suffix (recurrent state): rebuild what it should hold.
            tokens = self._cached(slot)[:keep]
            self._truncate(0, slot)
            yield tokens
        return run.out[-1]

    def _ahead(self, run: Run, mask: TokenMask, reserve: int) -> list[int]:
        """Jump-forward: the tokens of the text the grammar forces next (the tag and a
        call's name, keys and the punctuation between values), taken without sampling,
        to be evaluated in one forward pass instead of one pass each. The forced text's
        last token is left to the model, under the mask, so where it meets what the
        model writes next is the model's own tokenization. [] when that leaves fewer
        than two tokens, when they would reach into the `reserve` kept for closing a
        call, or when they do not spell the text exactly (a tokenizer that adds a
        leading space; a control token, whose piece the grammar sees as empty).

        Each token is accepted on its own, so a loop repair's rollback (counted in
        tokens) undoes them one by one."""
        forced = mask.matcher.find_jump_forward_string()
        if len(forced) < 3:  # a token is at least a byte: no two tokens and a last one
            return []
        data = forced.encode("utf-8")
        tokens = self.tokenize(data, prompt=False)[:-1]
        if len(tokens) < 2 or len(run.out) + len(tokens) + reserve >= run.budget:
            return []
        pieces = [self._piece(tok) for tok in tokens]
        if not data.startswith(b"".join(pieces)):
            return []
        for n, tok in enumerate(tokens):
            if not mask.matcher.accept_token(tok):
                mask.matcher.rollback(n)
                return []
        for tok, piece in zip(tokens, pieces, strict=True):
            run.add(tok, piece, 0.0)  # forced: probability 1
        return tokens

    def _jump(self, run: Run, mask: TokenMask, forced: str) -> list[int]:
        """Take text the grammar forces in one batch: accepted by the grammar and
        tokenized; the tokens to evaluate at once. [] if it does not fit in max_tokens."""
        data = forced.encode("utf-8")
        tokens = self.tokenize(data, prompt=False)
        if not tokens or len(run.out) + len(tokens) > run.budget or not mask.matcher.accept_string(data):
            return []
        for tok in tokens:
            run.add(tok, self._piece(tok), 0.0)  # forced: probability 1
        return tokens

    def _piece(self, tok: int) -> bytes:
        if self._grammars is not None:
            return self._grammars.vocab.pieces[tok]
        return self._token_bytes(tok)

    def _closing_token(self, logits: np.ndarray, in_string: bool) -> int:
        """The likeliest allowed token of the best tier that moves towards the end of
        the call (see GrammarCache.closers), else the likeliest allowed token: the
        call ends within a few tokens, with whatever the model had written before."""
        for tier in self.grammars.closers(in_string):
            allowed = tier[np.isfinite(logits[tier])]
            if allowed.size:
                return int(allowed[np.argmax(logits[allowed])])
        return int(np.argmax(logits))

    def _prompt_steps(self, prompt: list[int], slot: int, mark: int | None = None) -> Iterator[list[int]]:
        """Evaluate `prompt` on `slot`, reusing the cache for the prefix it shares with
        what the slot holds (batching.py may have given the slot another's prefix).
        `mark`: a position whose logits are kept too (`_kept[slot]`); it is evaluated
        again if the cache holds it (a few tokens: the assistant's header)."""
        keep = common_prefix(self._cached(slot), prompt)
        keep = min(keep, len(prompt) - 1)  # always evaluate >= 1 token to get fresh logits
        if mark is not None:
            keep = min(keep, mark)
        if keep == 0 or not self._truncate(keep, slot):
            keep = 0  # this cache cannot drop a suffix (e.g. recurrent state): start over
            self._truncate(0, slot)
        self._mark(slot, mark)
        yield prompt[keep:]


@dataclass(eq=False)
class Sequence:
    """One request being generated: what it asked, the prompt as tokens, its grammar
    state, and `steps`, the generator that drives it (Decoder._steps). `slot` is the
    cache it decodes on, set before the first step; `passes` counts the forward passes it
    took part in and `batched` the sequences in them, summed (its mean batch size)."""

    request: GenerationRequest
    prompt: list[int]
    prompt_text: str
    mask: TokenMask | None  # under auto: set once the decision is made
    stream: TextStream | None
    pending: PendingDecision | None = None  # tool_choice auto: the decision still to make
    decision: Decision | None = None
    slot: int = -1
    steps: Iterator[list[int]] = field(default_factory=lambda: iter(()))
    result: Generation | None = None
    error: OutpostError | None = None  # why it left a batch without a result
    passes: int = 0
    batched: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def default_threads() -> int:
    """Half the physical cores: several workers decode at once on one machine, and
    llama.cpp's threads spin while waiting, so oversubscribing the cores costs far
    more than it gains (measured: 2 workers x 2 threads on 2 cores served mixed
    requests at about half the rate of 2 x 1)."""
    return max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 2) // 2)
