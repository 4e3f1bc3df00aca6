"""The llama.cpp backend: a GGUF file, loaded once, generating under an xgrammar mask.

decoder.py drives decoding, token by token, through llama.cpp's public low-level calls
(`eval`, `llama_get_logits_ith`) rather than `Llama.generate`: that keeps the logits
a contiguous numpy array we mask in place, gives the exact post-mask log-probability
of every chosen token, and makes `seed` mean the same thing on every backend.

The KV cache keeps the last prompt; a new prompt that shares its prefix (the same
system block and tools, say) only evaluates the rest, and only its new turns are
tokenized (prompt_tokens.py).

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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from outpost.manifests.schema import Manifest

from .backend import AdapterRef
from .decoder import Decoder, default_threads
from .errors import AdapterLoadFailed, DecodeFailed, ModelLoadFailed
from .grammar import Vocabulary
from .prompt_tokens import MarksFile, PromptTokens, cut_marks
from .templates import ChatTemplate


_GGML_ERROR, _GGML_CONT = 4, 5  # ggml_log_level (ggml.h); llama-cpp-python's own map is older
_last_level = 0


@llama_cpp.llama_log_callback
def _log_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log, errors only (its load banner and its warnings, e.g. a unified
    cache longer than the training context, would fill the worker's stderr)."""
    global _last_level
    _last_level = level if level != _GGML_CONT else _last_level
    if _last_level == _GGML_ERROR:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


_initialised = False


def _backend_init() -> None:
    global _initialised
    if not _initialised:
        llama_cpp.llama_log_set(_log_errors, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


def gpu_offload_available() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaModel(Decoder):
    """A GGUF model in memory: llama.cpp's forward pass, KV cache, vocabulary and
    LoRA adapters under decoder.py's generation. Not thread-safe.

    With `n_slots` > 1 the context holds that many sequences, each with its own
    positions in one unified KV cache of `n_slots` x the model's context (so every
    sequence may use the whole context, and a prefix two sequences share is stored
    once); batching.py decodes them together."""

    def __init__(self, manifest: Manifest, path: Path, *, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int | str = "auto", n_slots: int = 1,
                 vocab_cache: Path | None = None,
                 adapter_path: Callable[[AdapterRef], Path] | None = None,
                 grammar_timeout_s: float | None = None) -> None:
        _backend_init()
        self.manifest = manifest
        # What is really offloaded: a CPU-only build of llama.cpp runs everything on CPU.
        layers = -1 if n_gpu_layers == "auto" else int(n_gpu_layers)
        self.n_gpu_layers = layers if gpu_offload_available() else 0
        self.n_slots = n_slots
        self._model = self._ctx = None
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if self.n_gpu_layers < 0 else self.n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ModelLoadFailed(f"llama.cpp could not load {manifest.id} from {path.name}", model=manifest.id)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = manifest.context_length * n_slots
        cparams.n_batch = cparams.n_ubatch = n_batch = min(n_batch, cparams.n_ctx)
        cparams.n_seq_max, cparams.kv_unified = n_slots, True
        # A single token decodes on `n_threads`; a prompt or a batch of sequences on
        # `n_threads_batch`, every core, as llama-cpp-python's default had it.
        cparams.n_threads = n_threads or default_threads()
        cparams.n_threads_batch = max(cparams.n_threads, os.cpu_count() or 1)
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelLoadFailed(f"llama.cpp could not make a context of {cparams.n_ctx} tokens "
                                  f"for {manifest.id}", model=manifest.id)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._batch_arrays = {name: np.ctypeslib.as_array(getattr(self._batch, name), shape=(n_batch,))
                              for name in ("token", "pos", "n_seq_id", "logits")}
        self._tokens: list[list[int]] = [[] for _ in range(n_slots)]  # what each slot's cache holds
        self._rows: dict[int, int] = {}  # slot -> its logits' row in the last forward pass
        self._outputs: np.ndarray | None = None  # those rows
        self.n_ctx = manifest.context_length
        self._vocab_ptr = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab_ptr)
        self._init_decoder(vocab_cache, grammar_timeout_s)
        # Where an adapter's checked file is (the worker asks the store); None: no adapters.
        self._adapter_path = adapter_path
        self._adapters: dict[str, tuple[AdapterRef, Any]] = {}  # sha256 -> (ref, native pointer)
        self._applied: tuple[str, float] | None = None  # (sha256, scale) on the context now
        self.adapter_switches = 0
        self.template = ChatTemplate.from_manifest(manifest.chat_template, self.meta("tokenizer.chat_template"))
        self._prompt_tokens = PromptTokens(lambda data, first: self._tokenize(data, bos=first, special=True),
                                           self._cut_marks(vocab_cache.parent if vocab_cache else None))

    def meta(self, key: str) -> str | None:
        """A metadata value of the GGUF file, as text (None: absent)."""
        buf = ctypes.create_string_buffer(1024)
        size = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if size >= len(buf):
            buf = ctypes.create_string_buffer(size + 1)
            size = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if size >= 0 else None

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
                "n_layer": llama_cpp.llama_model_n_layer(self._model), "n_slots": self.n_slots}
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
        if self._ctx:
            if self._adapters:
                llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        for _, pointer in getattr(self, "_adapters", {}).values():
            llama_cpp.llama_adapter_lora_free(pointer)
        self._adapters = {}
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # -- task adapters ---------------------------------------------------------------
    def use_adapter(self, ref: AdapterRef | None) -> None:
        """Apply `ref` (None: the base alone) to the generations that follow."""
        key = None if ref is None else (ref.sha256, ref.scale)
        if key == self._applied:
            return
        ctx = self._ctx
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
        self._truncate_all()
        self._applied = key
        self.adapter_switches += 1

    def _load_adapter(self, ref: AdapterRef) -> Any:
        if self._adapter_path is None:
            raise AdapterLoadFailed(self.manifest.id, ref.id, "this worker serves no adapters")
        path = self._adapter_path(ref)  # size and sha256 checked before llama.cpp reads it
        pointer = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not pointer:
            raise AdapterLoadFailed(self.manifest.id, ref.id,
                                    "llama.cpp could not read it (another architecture or shape?)")
        self._adapters[ref.sha256] = (ref, pointer)
        return pointer

    def _cut_marks(self, cache_dir: Path | None) -> list[bytes]:
        """The special tokens a prompt may be cut before (prompt_tokens.py), from
        `cache_dir` when they were found before: none unless the vocabulary tokenizes the
        text between special tokens on its own (SentencePiece, BPE) and adds no EOS."""
        saved = MarksFile(cache_dir, self.manifest.weights.sha256, self.template.source) if cache_dir else None
        marks = saved.load() if saved else None
        if marks is None:
            marks = self._find_marks()
            if saved:
                saved.save(marks)
        return marks

    def _find_marks(self) -> list[bytes]:
        vocab = self._vocab_ptr
        if (llama_cpp.llama_vocab_type(vocab) not in (llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE)
                or llama_cpp.llama_vocab_get_add_eos(vocab)):
            return []
        special = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                   | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)  # what llama.cpp partitions a prompt at
        specials = []
        for tok in range(self.n_vocab):
            attr = llama_cpp.llama_vocab_get_attr(vocab, tok)
            if attr & special:
                specials.append((llama_cpp.llama_vocab_get_text(vocab, tok),
                                 bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP)))
        return cut_marks(specials, self.template.source)

    # -- the forward pass and the cache (decoder.py and batching.py drive them) -------
    def tokenize(self, data: bytes, *, prompt: bool) -> list[int]:
        if prompt:  # by turns, the turns seen before from a cache
            return self._prompt_tokens(data)
        return self._tokenize(data, bos=False, special=False)

    def _tokenize(self, data: bytes, *, bos: bool, special: bool) -> list[int]:
        room = len(data) + 2
        out = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self._vocab_ptr, data, len(data), out, room, bos, special)
        if n < 0:  # never more tokens than bytes plus BOS/EOS, but llama.cpp says if so
            out = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab_ptr, data, len(data), out, -n, bos, special)
        return list(out[:n])

    def _eval(self, tokens: list[int], slot: int = 0) -> None:
        for i in range(0, len(tokens), self.n_batch):
            self._eval_many([(slot, tokens[i:i + self.n_batch], i + self.n_batch >= len(tokens))])

    def _eval_many(self, work: list[tuple[int, list[int], bool]]) -> None:
        """One forward pass over several slots' tokens (n_batch at most in all); a slot
        with `logits` set gets its last token's logits, and a slot with a marked
        position among its tokens (decoder._marked) keeps that position's too."""
        arrays, seq_ids = self._batch_arrays, self._batch.seq_id
        i, rows, marked, outputs = 0, {}, {}, 0
        for slot, tokens, logits in work:
            n, pos = len(tokens), len(self._tokens[slot])
            arrays["token"][i:i + n] = tokens
            arrays["pos"][i:i + n] = np.arange(pos, pos + n)
            arrays["n_seq_id"][i:i + n] = 1
            arrays["logits"][i:i + n] = 0
            for j in range(i, i + n):
                seq_ids[j][0] = slot
            # Outputs are stored in batch order: a mark comes before its slot's last token.
            if (at := self._marked(slot, pos, n)) is not None:
                arrays["logits"][i + at] = 1
                marked[slot] = outputs
                outputs += at != n - 1 or not logits
            if logits:
                arrays["logits"][i + n - 1] = 1
                rows[slot] = outputs
                outputs += 1
            i += n
        self._batch.n_tokens = i
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise DecodeFailed(self.manifest.id, i, rc)
        for slot, tokens, _ in work:
            self._tokens[slot].extend(tokens)
        self._rows = rows
        # Every output's logits, one row each in the order they were asked for: wrapped
        # once per pass, not once per sequence (numpy builds a ctypes type per wrap).
        self._outputs = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx),
                                              shape=(outputs, self.n_vocab)) if outputs else None
        for slot, row in marked.items():
            self._keep(slot, self._outputs[row])

    def _logits(self, slot: int = 0) -> np.ndarray:
        return self._outputs[self._rows[slot]]

    def _cached(self, slot: int = 0) -> list[int]:
        return self._tokens[slot]

    def _truncate(self, keep: int, slot: int = 0) -> bool:
        if keep >= len(self._tokens[slot]):
            return True
        # Removing a whole sequence never fails; a suffix can (a recurrent model).
        if not llama_cpp.llama_memory_seq_rm(self._mem, slot, keep or -1, -1):
            return False
        del self._tokens[slot][keep:]
        return True

    def _truncate_all(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self._tokens = [[] for _ in range(self.n_slots)]

    def _share(self, src: int, dst: int, n: int) -> bool:
        """Make slot `dst` hold slot `src`'s first `n` positions (unified KV: the cells
        are shared, not copied)."""
        llama_cpp.llama_memory_seq_rm(self._mem, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, 0, n)
        self._tokens[dst] = self._tokens[src][:n]
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
