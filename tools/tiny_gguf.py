"""Write a tiny random-weight GGUF model (llama architecture, byte-level vocabulary).

It loads in milliseconds and produces nonsense, which is exactly what plumbing tests
want: under a grammar even nonsense weights must yield a well-formed tool call. The
vocabulary is the 256 GPT-2 byte symbols plus three control tokens, and one merge, so every byte
string is expressible and llama.cpp's byte-level BPE path is exercised.

    python -m outpost.tools.tiny_gguf OUT.gguf [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

N_EMBD, N_HEAD, N_FF, N_LAYER, N_CTX = 64, 4, 128, 2, 4096
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable character map, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0, output_std: float = 0.02) -> Path:
    """`output_std`: of the output projection's weights. At 0.02 no logit can move far
    from the others (the final norm fixes the hidden state's length), so a model for a
    training test, which must be able to learn, takes a larger one."""
    import gguf  # a dev dependency: only tests and tools write models

    rng = np.random.default_rng(seed)
    # llama.cpp insists on at least one merge: add the two-space token and its merge.
    space = _byte_symbols()[ord(" ")]
    tokens = CONTROL + _byte_symbols() + [space * 2]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("outpost-tiny-random")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(CONTROL) + [gguf.TokenType.NORMAL] * 257)
    w.add_token_merges([f"{space} {space}"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", n_vocab, N_EMBD)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", (rng.standard_normal((n_vocab, N_EMBD)) * output_std).astype(np.float32))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{name}.weight", N_EMBD, N_EMBD)
        t(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        t(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        t(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_manifest_toml(path: Path, context_length: int = 2048, model_id: str = "tiny-random",
                       memory_estimate: str = "16MiB") -> str:
    data = path.read_bytes()
    return f'''
id = "{model_id}"
version = "1"
description = "random weights, for plumbing tests"
tasks = ["plumbing"]
backend = "gguf"
chat_template = "chatml"
context_length = {context_length}
memory_estimate = "{memory_estimate}"

# Random weights cannot be trusted to finish a JSON call: the smoke test asks for text.
[smoke_test]
tools = []
max_tokens = 8

[[files]]
name = "tiny.gguf"
size = {len(data)}
sha256 = "{hashlib.sha256(data).hexdigest()}"

[[files.sources]]
kind = "path"
path = "{path}"
'''


def tiny_data_dir(root: Path, model_id: str = "tiny-random", seed: int = 0) -> Path:
    """A data dir under `root` with the tiny model written and pulled, its manifest in
    `<data>/manifests` (pass it as `manifest_dirs`): for tools that run a real daemon."""
    from outpost.manifests.catalog import Catalog  # noqa: PLC0415 (the CLI needs neither)
    from outpost.manifests.store import ModelStore  # noqa: PLC0415

    data = root / "data"
    (data / "manifests").mkdir(parents=True, exist_ok=True)
    text = tiny_manifest_toml(write_tiny_gguf(data / f"{model_id}.gguf", seed=seed), model_id=model_id)
    (data / "manifests" / f"{model_id}.toml").write_text(text)
    store = ModelStore(data / "models")
    store.pull(Catalog.load(store, [data / "manifests"], model_id).get(model_id), text)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_tiny_gguf(args.out, args.seed))


if __name__ == "__main__":
    main()
