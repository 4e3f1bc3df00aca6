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
from pathlib import Path
from typing import Any

import llama_cpp
import psutil
import numpy as np

from outpost.manifests.errors import ContextOverflow, ModelLoadFailed
from outpost.manifests.schema import Manifest

from .backend import Generation, GenerationRequest
from .grammar import GrammarCache, TokenMask, Vocabulary, check_tools
from .templates import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ChatTemplate
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
    def tokenize_prompt(self, request: GenerationRequest) -> list[int]:
        tools = request.tools if request.tool_choice != "none" else None
        prompt = self.template.render(request.messages, tools)
        return self._llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def generate(self, request: GenerationRequest) -> Generation:
        if request.tools:
            check_tools(request.tools)
        compiled = None
        if request.tools:
            compiled = self.grammars.compiled(request.tools, request.tool_choice,
                                              request.parallel_tool_calls)
        prompt = self.tokenize_prompt(request)
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        budget = min(request.max_tokens, self.n_ctx - len(prompt))
        mask = TokenMask(compiled, self.n_vocab) if compiled is not None else None
        rng = np.random.default_rng(request.seed)

        t0 = time.perf_counter()
        self._eval_prompt(prompt)
        t1 = time.perf_counter()
        out: list[int] = []
        logprobs: list[float] = []
        finish = "length"
        dead_end = False
        written = bytearray()  # exact bytes so far, to spot a repeated call cheaply
        for _ in range(budget):
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self._llama.ctx, -1), shape=(self.n_vocab,))
            if mask is not None:
                mask.apply(logits)
            tok = _sample(logits, request, rng)
            if not np.isfinite(logits[tok]):
                dead_end = True  # the grammar allowed nothing
                finish = "stop"
                break
            logprobs.append(float(logits[tok] - _logsumexp(logits)))
            if mask is not None and not mask.accept(tok):
                dead_end = True
                finish = "stop"
                break
            if llama_cpp.llama_vocab_is_eog(self._vocab_ptr, tok):
                finish = "stop"
                break
            out.append(tok)
            if mask is not None:
                written += self.vocab.pieces[tok]
            if mask is not None and _repeats_a_call(written):
                # Small models loop on the same call under greedy decoding; the
                # repeat carries no information, so stop instead of burning max_tokens.
                finish = "stop"
                break
            self._llama.eval([tok])
        t2 = time.perf_counter()

        text = self._llama.detokenize(out).decode("utf-8", errors="replace")
        content, tool_calls, validation = text, [], []
        if request.tools and request.tool_choice != "none":
            content, parsed = toolcalls.parse(text)
            tool_calls, validation = toolcalls.to_openai(parsed, request.tools)
            if tool_calls and finish == "stop":
                finish = "tool_calls"
        return Generation(
            text=text, content=content, tool_calls=tool_calls, finish_reason=finish,
            prompt_tokens=len(prompt), completion_tokens=len(logprobs),
            prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3,
            constrained=mask is not None, grammar_dead_end=dead_end, logprobs=logprobs,
            validation=validation)

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


def _repeats_a_call(written: bytearray) -> bool:
    close = TOOL_CALL_CLOSE.encode()
    if not written.endswith(close):
        return False
    blocks = [b.strip() for b in bytes(written).split(TOOL_CALL_OPEN.encode())[1:]]
    return blocks[-1] in blocks[:-1]


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
