"""Write a LoRA adapter in llama.cpp's GGUF adapter format.

The format, as llama.cpp's loader reads it (src/llama-adapter.cpp): metadata
`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and
`general.architecture` equal to the base's; one pair of tensors per adapted weight,
named after the base's GGUF tensor, `<name>.lora_a` with peft's shape `(r, in)` and
`<name>.lora_b` with `(out, r)`. llama.cpp scales the product by `alpha / r` itself.

Hugging Face's llama-family checkpoints order the rows of the Q and K projections for
one rotary layout and GGUF files for another: the converter that made the base GGUF
permuted those rows, so the adapter's `lora_b` of `q_proj` / `k_proj` must be
permuted the same way or the adapter would rotate the wrong dimensions. Gemma-3 and
the other architectures listed in `NO_PERMUTE` were converted without it.

What this module must not do: train (specialise/train.py) or decide what is adapted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from outpost.manifests.errors import ModelFileError

# Architectures whose HF -> GGUF conversion permutes Q/K rows (llama.cpp's
# convert_hf_to_gguf.py: LlamaModel and the models derived from it).
PERMUTE_QK = {"llama", "mistral", "granite", "granitemoe"}


@dataclass(frozen=True)
class BaseShape:
    """What the writer needs to know of the base GGUF."""

    architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int

    @classmethod
    def read(cls, path: Path) -> BaseShape:
        import gguf  # the `train` extra: writing adapters is offline work

        try:
            reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError) as exc:
            raise ModelFileError(f"{path}: not a GGUF file: {exc}", file=str(path)) from exc

        def scalar(key: str) -> int | str:
            field = reader.fields.get(key)
            if field is None:
                raise ModelFileError(f"{path}: no {key} in the GGUF metadata", file=str(path))
            return field.contents()

        arch = str(scalar("general.architecture"))
        n_head = int(scalar(f"{arch}.attention.head_count"))
        kv = reader.fields.get(f"{arch}.attention.head_count_kv")
        return cls(architecture=arch, n_layer=int(scalar(f"{arch}.block_count")), n_head=n_head,
                   n_head_kv=int(kv.contents()) if kv is not None else n_head)


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's Q/K row order: per head, the two rotary halves interleaved."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def gguf_pairs(state: dict[str, np.ndarray], base: BaseShape) -> dict[str, np.ndarray]:
    """peft's LoRA state dict (`...layers.0.self_attn.q_proj.lora_A.weight`) as GGUF
    adapter tensors (`blk.0.attn_q.weight.lora_a`), permuted where the base was."""
    import gguf

    names = gguf.get_tensor_name_map(_arch_by_name(base.architecture), base.n_layer)
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        stem, part = _split(key)
        target = names.get_name(stem + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ValueError(f"no GGUF tensor for {stem!r} in a {base.architecture} model")
        value = np.asarray(value, dtype=np.float32)  # permuted in fp32, stored in fp16 below
        if part == "lora_b" and base.architecture in PERMUTE_QK:
            if stem.endswith("q_proj"):
                value = _permute(value, base.n_head)
            elif stem.endswith("k_proj"):
                value = _permute(value, base.n_head_kv)
        # fp16 halves what a device downloads and holds; llama.cpp computes the LoRA
        # product in the base's compute type either way.
        out[f"{target}.{part}"] = np.ascontiguousarray(value, dtype=np.float16)
    return out


def _arch_by_name(name: str):
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ValueError(f"the gguf package knows no architecture {name!r}")


def _split(key: str) -> tuple[str, str]:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ->
    (`model.layers.0.self_attn.q_proj`, `lora_a`)."""
    key = key.removeprefix("base_model.model.")
    for marker, part in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b")):
        if key.endswith(marker):
            return key[: -len(marker)], part
    raise ValueError(f"not a LoRA tensor: {key!r}")


def write_lora_gguf(path: Path, state: dict[str, np.ndarray], base: BaseShape, alpha: float,
                    name: str = "outpost-adapter") -> Path:
    """Write the adapter to `path` (via a temporary file beside it: never half a file)."""
    import gguf

    tensors = gguf_pairs(state, base)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), base.architecture)
    writer.add_name(name)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for tensor_name in sorted(tensors):
        writer.add_tensor(tensor_name, tensors[tensor_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
