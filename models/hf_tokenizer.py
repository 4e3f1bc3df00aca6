"""A Hugging Face tokenizer folder (`tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`, `chat_template.jinja`), read with the `tokenizers` library:
what a backend without a tokenizer of its own (ONNX) needs to generate and to build
the grammar's vocabulary.

Every token's bytes are worked out from the vocabulary's own spelling, the way the
tokenizer's decoder would: byte-level BPE (GPT-2's "Ġ" alphabet, SmolLM2) maps each
character back to its byte; SentencePiece with byte fallback (Gemma) turns "▁" into a
space and "<0x0A>" into the byte. Special tokens (control ones: `<|im_start|>`) come
back empty, so xgrammar never allows them inside a constrained call; other added tokens
(Gemma's runs of newlines, say) are their text, as llama.cpp renders them.

What this module must not do: import a model runtime; it reads files.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .errors import ModelLoadFailed

# Tokens llama.cpp also treats as ending a turn when a vocabulary has them (it reads
# them from the token's text, as here): an answer must stop on the same tokens on
# both backends.
END_OF_TURN = frozenset({"<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>",
                         "<|eom_id|>", "<eos>", "</s>", "<|end_of_text|>"})
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable alphabet for bytes, reversed (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HfTokenizer:
    def __init__(self, folder: Path, model: str | None = None) -> None:
        try:
            self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            config = _read_json(folder / "tokenizer_config.json")
            generation = _read_json(folder / "generation_config.json")
            spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except Exception as exc:  # OSError, ValueError, or `tokenizers`' own Exception
            raise ModelLoadFailed(f"cannot read the tokenizer in {folder.name}: {exc}", model=model) from exc
        # A prompt is never cut or padded to a length the file names: too long is an error
        # (ContextOverflow), decided by the decoder against the model's context.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.size = self._tok.get_vocab_size(with_added_tokens=True)
        # Added tokens as tokenizer.json lists them, and as transformers' config does.
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        added |= {int(k): v for k, v in (config.get("added_tokens_decoder") or {}).items()
                  if str(k).isdigit() and isinstance(v, dict) and int(k) not in added}
        self._special = {i for i, t in added.items() if t.get("special", True)}
        self._added_text = {i: str(t.get("content", "")) for i, t in added.items() if i not in self._special}
        self._byte_level = _uses(spec.get("decoder"), "ByteLevel") or _uses(spec.get("pre_tokenizer"), "ByteLevel")
        template = config.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.stop_ids = sorted(self._stops(config, generation))

    def encode(self, data: bytes, *, prompt: bool) -> list[int]:
        """A prompt gets the tokenizer's own special tokens (BOS where it adds one) and
        control tokens written in it parsed (`<|im_start|>`); generated text is plain
        text, `<|im_start|>` in it being characters, as llama.cpp tokenizes it. Other
        added tokens are split out either way, as llama.cpp does its user-defined ones."""
        self._tok.encode_special_tokens = not prompt
        return self._tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=prompt).ids

    def piece(self, tok: int) -> bytes:
        if tok in self._special or tok >= self.size:
            return b""
        if tok in self._added_text:  # stored as written, not in the vocabulary's alphabet
            text = self._added_text[tok]
            return (text if self._byte_level else text.replace("\u2581", " ")).encode("utf-8")
        text = self._tok.id_to_token(tok)
        if text is None:
            return b""
        if self._byte_level:
            table = _byte_decoder()
            return bytes(table[c] for c in text if c in table)
        if m := _BYTE_TOKEN.match(text):
            return bytes([int(m.group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")

    def _stops(self, config: dict[str, Any], generation: dict[str, Any]) -> set[int]:
        stops: set[int] = set()
        eos = generation.get("eos_token_id")
        stops.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        named = config.get("eos_token")
        if isinstance(named, dict):
            named = named.get("content")
        for text in {*END_OF_TURN, *([named] if isinstance(named, str) else [])}:
            tok = self._tok.token_to_id(text)
            if tok is not None:
                stops.add(tok)
        return stops


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _uses(component: dict[str, Any] | None, kind: str) -> bool:
    """Whether a tokenizer.json component is `kind`, or a sequence holding one."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == kind:
        return True
    parts = component.get("decoders") or component.get("pretokenizers") or []
    return any(_uses(p, kind) for p in parts)
