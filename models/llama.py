"""The llama.cpp backend: a GGUF file, loaded once, generating under an xgrammar mask.

Decoding is driven here, token by token, through llama.cpp's public low-level calls
(`eval`, `llama_get_logits_ith`) rather than `Llama.generate`: that keeps the logits
a contiguous numpy array we mask in place, gives the exact post-mask log-probability
of every chosen token, and makes `seed` mean the same thing on every backend.

The KV cache keeps the last prompt; a new prompt that shares its prefix (the same
system block and tools, say) only evaluates the rest.

Task adapters (LoRA, llama.cpp's GGUF adapter format) are applied per generation on
the one loaded base: each is read once, on its first request, and switching costs a
call. The KV cache holds keys and values computed under whichever adapter was applied
when they were evaluated, so a switch clears it: the prompt cache is keyed by adapter.

The vocabulary xgrammar needs (every token's bytes) takes longer to read than a small
model takes to load, so it is built on the first constrained request, not at load,
and kept on disk beside the model (keyed by the file's sha256) for the next load.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import psutil
import numpy as np

from outpost.manifests.schema import Manifest

from .backend import AdapterRef, Generation, GenerationRequest
from .errors import AdapterLoadFailed, ContextOverflow, ModelLoadFailed
from .grammar import GrammarCache, TokenMask, Vocabulary
from .schemas import check_tools
from .templates import TOOL_CALL_CLOSE, ChatTemplate
from . import toolcalls
from .decoding import (LOOP_CLOSE_TOKENS, Run, TextStream, call_stats, cut_quality, degenerate_loop,
                       logsumexp, repeats_a_call, sample)


def gpu_offload_available() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaModel:
    """A GGUF model in memory. Not thread-safe: one generation at a time."""

    def __init__(self, manifest: Manifest, path: Path, *, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int | str = "auto",
                 vocab_cache: Path | None = None,
                 adapter_path: Callable[[AdapterRef], Path] | None = None) -> None:
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
        # Where an adapter's checked file is (the worker asks the store); None: no adapters.
        self._adapter_path = adapter_path
        self._adapters: dict[str, tuple[AdapterRef, Any]] = {}  # sha256 -> (ref, native pointer)
        self._applied: tuple[str, float] | None = None  # (sha256, scale) on the context now
        self.adapter_switches = 0
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
        return info | self.adapter_info()

    def adapter_info(self) -> dict[str, Any]:
        applied = self._applied and self._adapters[self._applied[0]][0]
        return {"adapters": [{"id": r.id, "version": r.version, "size": r.size}
                             for r, _ in self._adapters.values()],
                "adapter": f"{applied.id} {applied.version}" if applied else None,
                "adapter_switches": self.adapter_switches}

    def close(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is not None:
            if self._adapters:
                llama_cpp.llama_set_adapters_lora(llama.ctx, None, 0, None)
                for _, pointer in self._adapters.values():
                    llama_cpp.llama_adapter_lora_free(pointer)
                self._adapters.clear()
            llama.close()
            self._llama = None

    # -- task adapters ---------------------------------------------------------------
    def use_adapter(self, ref: AdapterRef | None) -> None:
        """Apply `ref` (None: the base alone) to the generations that follow."""
        key = None if ref is None else (ref.sha256, ref.scale)
        if key == self._applied:
            return
        ctx = self._llama.ctx
        if ref is None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            pointer = self._adapters[ref.sha256][1] if ref.sha256 in self._adapters else self._load_adapter(ref)
            rc = llama_cpp.llama_set_adapters_lora(
                ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(pointer), 1, (ctypes.c_float * 1)(ref.scale))
        if rc != 0:
            raise AdapterLoadFailed(self.manifest.id, ref.id if ref else None, f"llama.cpp refused it ({rc})")
        # Cached keys and values were computed under the adapter applied before: none
        # of them may serve a prompt under this one.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        self._llama.n_tokens = 0
        self._applied = key
        self.adapter_switches += 1

    def _load_adapter(self, ref: AdapterRef) -> Any:
        if self._adapter_path is None:
            raise AdapterLoadFailed(self.manifest.id, ref.id, "this worker serves no adapters")
        path = self._adapter_path(ref)  # size and sha256 checked before llama.cpp reads it
        pointer = llama_cpp.llama_adapter_lora_init(self._llama.model, str(path).encode())
        if not pointer:
            raise AdapterLoadFailed(self.manifest.id, ref.id,
                                    "llama.cpp could not read it (another architecture or shape?)")
        self._adapters[ref.sha256] = (ref, pointer)
        return pointer

    # -- generation ------------------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        tools = request.tools if request.tool_choice != "none" else None
        return self.template.render(request.messages, tools)

    def generate(self, request: GenerationRequest,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        """One answer. `on_text` (streaming) is given the generated text as it settles:
        pieces that join to a prefix of `Generation.text` (decoding.settled says when
        a piece can no longer be cut by a loop repair)."""
        if request.tools:
            check_tools(request.tools)
        self.use_adapter(request.adapter)
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
        run = Run(budget=budget, prompt_len=len(prompt))
        self._decode(run, mask, request, rng, TextStream(on_text) if on_text else None)
        t2 = time.perf_counter()

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
            prompt_tokens=len(prompt), completion_tokens=len(run.out),
            prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3,
            constrained=mask is not None, grammar_dead_end=run.dead_end, logprobs=run.logprobs,
            validation=validation, repaired=len(run.repairs), prompt=prompt_text,
            grammar=(f"xgrammar tool_choice={request.tool_choice} "
                     f"parallel={request.parallel_tool_calls}") if mask is not None else None)

    # One loop on purpose (64 lines): the per-token hot path reads top to bottom, and
    # splitting it would add a call per token and hide the order of mask, sample, accept.
    def _decode(self, run: Run, mask: TokenMask | None, request: GenerationRequest,
                rng: np.random.Generator, stream: TextStream | None = None) -> None:
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
            if stream is not None:
                stream.push(run, self._forced(run, mask, reserve))
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
                   else sample(logits, request, rng))
            if not np.isfinite(logits[tok]) or (mask is not None and not mask.accept(tok)):
                run.finish, run.dead_end = "stop", True  # the grammar allowed nothing
                return
            if llama_cpp.llama_vocab_is_eog(self._vocab_ptr, tok):
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
                        tok = self._cut_loop(run, mask, *loop)
                        closing_left = LOOP_CLOSE_TOKENS
                elif repeats_a_call(run):
                    # Greedy decoding also loops on whole calls; a repeat carries no
                    # information, so stop instead of burning max_tokens.
                    run.finish = "stop"
                    return
            if stream is not None:
                stream.push(run)  # the sampled token goes out before its forward pass
            self._llama.eval([tok])

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

    def _cut_loop(self, run: Run, mask: TokenMask, cut: int, period: int) -> int:
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
        self._forget_tail(run.prompt_len + len(run.out) - 1)
        return run.out[-1]

    def _jump(self, run: Run, mask: TokenMask, forced: str) -> bool:
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


def default_threads() -> int:
    """Half the physical cores: several workers decode at once on one machine, and
    llama.cpp's threads spin while waiting, so oversubscribing the cores costs far
    more than it gains (measured: 2 workers x 2 threads on 2 cores served mixed
    requests at about half the rate of 2 x 1)."""
    return max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 2) // 2)
