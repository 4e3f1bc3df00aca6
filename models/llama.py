"""The llama.cpp backend: a GGUF file, loaded once, generating under an xgrammar mask.

decoder.py drives decoding, token by token, through llama.cpp's public low-level calls
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from outpost.manifests.schema import Manifest

from .backend import AdapterRef
from .decoder import Decoder, default_threads
from .errors import AdapterLoadFailed, ModelLoadFailed
from .grammar import Vocabulary
from .templates import ChatTemplate


def gpu_offload_available() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaModel(Decoder):
    """A GGUF model in memory: llama.cpp's forward pass, KV cache, vocabulary and
    LoRA adapters under decoder.py's generation. Not thread-safe."""

    def __init__(self, manifest: Manifest, path: Path, *, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int | str = "auto",
                 vocab_cache: Path | None = None,
                 adapter_path: Callable[[AdapterRef], Path] | None = None,
                 grammar_timeout_s: float | None = None) -> None:
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
        self._init_decoder(vocab_cache, grammar_timeout_s)
        # Where an adapter's checked file is (the worker asks the store); None: no adapters.
        self._adapter_path = adapter_path
        self._adapters: dict[str, tuple[AdapterRef, Any]] = {}  # sha256 -> (ref, native pointer)
        self._applied: tuple[str, float] | None = None  # (sha256, scale) on the context now
        self.adapter_switches = 0
        self.template = ChatTemplate.from_manifest(
            manifest.chat_template, self._llama.metadata.get("tokenizer.chat_template"))

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

    # -- the forward pass and the cache (decoder.py drives them) ----------------------
    def tokenize(self, data: bytes, *, prompt: bool) -> list[int]:
        return self._llama.tokenize(data, add_bos=prompt, special=prompt)

    def _eval(self, tokens: list[int]) -> None:
        self._llama.eval(tokens)

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llama.ctx, -1), shape=(self.n_vocab,))

    def _cached(self) -> list[int]:
        return self._llama.input_ids[: self._llama.n_tokens].tolist()

    def _truncate(self, keep: int) -> bool:
        mem = llama_cpp.llama_get_memory(self._llama.ctx)
        if keep == 0:
            llama_cpp.llama_memory_clear(mem, True)
        elif not llama_cpp.llama_memory_seq_rm(mem, -1, keep, -1):
            return False
        self._llama.n_tokens = keep
        return True

    def _is_eog(self, tok: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab_ptr, tok))

    def _token_bytes(self, tok: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        size = llama_cpp.llama_token_to_piece(self._vocab_ptr, tok, buf, len(buf), 0, False)
        if size < 0:
            buf = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab_ptr, tok, buf, len(buf), 0, False)
        return buf.raw[:size]
