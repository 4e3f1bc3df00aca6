"""The onnxruntime backend: a decoder-only ONNX graph with its KV cache as inputs and
outputs (`past_key_values.N.key|value` in, `present.N.key|value` out, as onnxruntime-genai's
model builder and optimum write them), generating under decoder.py like a GGUF model.

Each forward pass binds the last pass's `present` tensors, as onnxruntime allocated
them, as this pass's `past` (IO binding: the cache never round-trips through numpy),
and copies out only the last position's logits, which the grammar masks in place. The
cache is bounded by the manifest's context length, as llama.cpp's is; trimming it (a
new prompt sharing a prefix, a loop cut) slices the tensors.

The execution provider is the best one onnxruntime has, unless config names others:
TensorRT, then CUDA, then the CPU. The model's files sit in one folder under their
manifest names (the store links them there): the graph finds its external data, and
the tokenizer (hf_tokenizer.py) its files, by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from outpost.manifests.schema import Manifest

from .decoder import Decoder, default_threads
from .errors import ModelLoadFailed
from .grammar import Vocabulary
from .hf_tokenizer import HfTokenizer
from .templates import ChatTemplate

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# Providers whose tensors live in GPU memory: the KV cache stays there between passes.
ON_GPU = {"TensorrtExecutionProvider": "cuda", "CUDAExecutionProvider": "cuda"}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """The providers to try, best first: `requested` (config) or PREFERRED, of those
    this onnxruntime build has; the CPU always ends the list."""
    available = set(ort.get_available_providers())
    chosen = [p for p in (requested or PREFERRED) if p in available]
    return chosen if "CPUExecutionProvider" in chosen else [*chosen, "CPUExecutionProvider"]


def _genai_config(folder: Path) -> dict[str, Any]:
    """The `model` block of onnxruntime-genai's genai_config.json, if the folder has one."""
    try:
        return json.loads((folder / "genai_config.json").read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError):
        return {}


class OnnxModel(Decoder):
    """An ONNX model in memory. Not thread-safe: one generation at a time."""

    def __init__(self, manifest: Manifest, folder: Path, *, n_threads: int | None = None,
                 providers: list[str] | None = None, vocab_cache: Path | None = None,
                 grammar_timeout_s: float | None = None) -> None:
        self.manifest = manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings are about graph fusions
        chosen = choose_providers(providers)
        if any(p in ON_GPU for p in chosen) and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu from PyPI finds CUDA and cuDNN in the nvidia-* wheels (or
            # torch's) only when asked to; without them it falls back to the CPU, warning.
            ort.preload_dlls()
        try:
            self._session = ort.InferenceSession(str(folder / manifest.weights.name), options,
                                                 providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException
            raise ModelLoadFailed(f"onnxruntime could not load {manifest.id}: {exc}",
                                  model=manifest.id) from exc
        self.provider = self._session.get_providers()[0]
        self._device = ON_GPU.get(self.provider, "cpu")
        self._tokenizer = HfTokenizer(folder, manifest.id)
        self._layout(manifest, folder)
        self.n_ctx = manifest.context_length
        self.template = ChatTemplate.from_manifest(manifest.chat_template, self._tokenizer.chat_template)
        self._stops = frozenset(self._tokenizer.stop_ids)
        self._ids: list[int] = []  # the tokens the cache holds
        self._kv: list[ort.OrtValue] = self._empty_cache()
        self._last: np.ndarray | None = None
        self._init_decoder(vocab_cache, grammar_timeout_s)

    def _layout(self, manifest: Manifest, folder: Path) -> None:
        """Names, shapes and types of the graph's inputs: what every pass binds."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        self._past = [n for n in inputs if n.startswith("past_key_values.")]
        self._present = [n.replace("past_key_values.", "present.", 1) for n in self._past]
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        missing += [n for n in ("logits", *self._present) if n not in outputs]
        if missing or not self._past:
            raise ModelLoadFailed(f"{manifest.id}: not a decoder graph with its KV cache as inputs and outputs "
                                  f"(missing {', '.join(missing) or 'past_key_values.*'})", model=manifest.id)
        # An input this loop would not feed (token_type_ids, inputs_embeds, cache_position...)
        # is refused here, not as onnxruntime's error at the first request.
        unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "position_ids", *self._past})
        if unknown:
            raise ModelLoadFailed(f"{manifest.id}: the graph wants inputs this backend does not feed: "
                                  f"{', '.join(unknown)}", model=manifest.id)
        first = inputs[self._past[0]]
        self._kv_dtype = _DTYPES.get(first.type)
        heads, width = first.shape[1], first.shape[3]
        if not isinstance(heads, int) or not isinstance(width, int):
            # A symbolic dimension ('kv_cache_dim'): the builder's config says it.
            decoder = _genai_config(folder).get("decoder", {})
            heads = heads if isinstance(heads, int) else decoder.get("num_key_value_heads")
            width = width if isinstance(width, int) else decoder.get("head_size")
        if self._kv_dtype is None or not isinstance(heads, int) or not isinstance(width, int):
            raise ModelLoadFailed(f"{manifest.id}: KV cache of type {first.type} and shape {first.shape} "
                                  "is not one this backend feeds", model=manifest.id)
        self._kv_shape = (1, heads, 0, width)
        self._positions = "position_ids" in inputs
        vocab = outputs["logits"].shape[-1]
        self.n_vocab = vocab if isinstance(vocab, int) else self._tokenizer.size

    def _empty_cache(self) -> list[ort.OrtValue]:
        empty = np.zeros(self._kv_shape, dtype=self._kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty, self._device) for _ in self._past]

    def info(self) -> dict[str, Any]:
        info = {"n_ctx": self.n_ctx, "n_vocab": self.n_vocab, "n_gpu_layers": 0,
                "n_layer": len(self._past) // 2, "backend": "onnx", "provider": self.provider}
        if self._grammars is not None:
            info["grammar_cache"] = self._grammars.stats()
        return info | self.adapter_info()

    def close(self) -> None:
        self._kv = []
        self._session = None  # type: ignore[assignment]

    # -- the forward pass and the cache (decoder.py drives them) ----------------------
    def tokenize(self, data: bytes, *, prompt: bool) -> list[int]:
        return self._tokenizer.encode(data, prompt=prompt)

    def _eval(self, tokens: list[int], slot: int = 0) -> None:
        at = self._marked(slot, len(self._ids), len(tokens))
        if at is None:
            self._pass(tokens)
            return
        # The builder's graphs return the last position's logits only, so a marked
        # position (the decision reads the turn's end, decoder.py) ends a pass of its own:
        # the few tokens after it (the assistant's header) take a second, short one.
        self._pass(tokens[: at + 1])
        self._keep(slot, self._last)
        if at + 1 < len(tokens):
            self._pass(tokens[at + 1 :])

    def _pass(self, tokens: list[int]) -> None:
        start, total = len(self._ids), len(self._ids) + len(tokens)
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([tokens], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if self._positions:
            binding.bind_cpu_input("position_ids", np.arange(start, total, dtype=np.int64)[None, :])
        for name, value in zip(self._past, self._kv, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # to the host: the grammar masks it there
        for name in self._present:
            binding.bind_output(name, self._device)  # on a GPU, the cache never leaves it
        self._session.run_with_iobinding(binding)
        out = binding.get_outputs()
        # The last position's row, copied: contiguous, writable, float32 (the mask writes it).
        self._last = np.array(out[0].numpy()[0, -1], dtype=np.float32)
        self._kv = list(out[1:])
        self._ids.extend(tokens)

    def _logits(self, slot: int = 0) -> np.ndarray:
        assert self._last is not None, "a pass runs before the logits are read"
        return self._last

    def _cached(self, slot: int = 0) -> list[int]:
        return self._ids

    def _truncate(self, keep: int, slot: int = 0) -> bool:
        if keep >= len(self._ids):
            return True
        if keep == 0:
            self._kv = self._empty_cache()
        else:
            # Through the host, also on a GPU: a trim happens once per request at most.
            self._kv = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :keep]), self._device)
                        for v in self._kv]
        del self._ids[keep:]
        self._last = None
        return True

    def _is_eog(self, tok: int) -> bool:
        return tok in self._stops

    def _token_bytes(self, tok: int) -> bytes:
        return self._tokenizer.piece(tok)

    def _read_vocabulary(self) -> Vocabulary:
        # One piece per logit: ids past the tokenizer (padded embeddings) are empty, and
        # stop ids past the logits cannot be sampled anyway.
        return Vocabulary(pieces=[self._tokenizer.piece(t) for t in range(self.n_vocab)],
                          stop_ids=[t for t in self._tokenizer.stop_ids if t < self.n_vocab], size=self.n_vocab)

