"""A GGUF model as a transformers folder: the weights dequantized to fp32 (a quantized
model can be neither trained nor re-exported) and the tokenizer, saved once under the
store's cache and keyed by the GGUF's sha256. Training (specialise/train.py) and ONNX
conversion (convert_onnx.py) start from it: reading a GGUF takes tens of seconds, the
saved folder under one.

What this module must not do: write the store's blobs or manifests.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("outpost.hf")


def hf_folder(gguf_path: Path, sha256: str, cache: Path) -> Path:
    """The folder (config.json, safetensors, tokenizer files), made if missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = cache / f"hf-fp32-{sha256}"
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    log.info("dequantizing %s to fp32 (once; kept in %s)", gguf_path.name, folder)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.part")  # a training run may convert too
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (folder / "tokenizer.json").exists():
        shutil.rmtree(folder, ignore_errors=True)  # one made before tokenizers were kept
    try:
        tmp.replace(folder)
    except OSError:  # another process made it meanwhile: theirs serves
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
