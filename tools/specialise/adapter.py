"""A trained adapter becomes a model version: its GGUF file and its manifest, staged in
the store like any pulled version (activated by `models activate`, or by the gate).

The manifest copies what serving needs from the base (chat template, context length,
sampling, smoke test, escalation threshold) and adds `[adapter]`: the base's id,
version and weights sha256 (an adapter applies to exactly that file), the scale, and
how it was trained (`Training`: data fingerprint, hyper-parameters, held-out scores);
and `[decision]`, its own rule for tool_choice auto, when one was fitted.

What this module must not do: decide whether the adapter is promoted (gate.py).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from outpost.manifests.schema import ADAPTER_OVERHEAD, MANIFEST_ID, DecisionRule, Manifest, Training
from outpost.manifests.store import ModelStore
from outpost.tools.lora_gguf import BaseShape, write_lora_gguf


def slug(task: str) -> str:
    """A task name in the characters a manifest id (and a folder) allows."""
    return re.sub(r"[^a-z0-9.-]+", "-", task.lower()).strip("-.") or "task"


def adapter_id(task: str, base: Manifest) -> str:
    """`<task>.<base id>`, in the characters a manifest id allows."""
    out = f"{slug(task)}.{base.id}"[:64].rstrip("-.")
    if not re.fullmatch(MANIFEST_ID, out):
        raise ValueError(f"cannot make a model id of task {task!r}")
    return out


def next_version(store: ModelStore, model_id: str) -> str:
    """`a1`, `a2`, ...: one more than any version of it in the store."""
    folder = store.versions / model_id
    seen = [int(m.group(1)) for p in (folder.glob("*.toml") if folder.is_dir() else [])
            if (m := re.fullmatch(r"a(\d+)", p.stem))]
    return f"a{max(seen, default=0) + 1}"


def write(path: Path, state: dict[str, np.ndarray], base_gguf: Path, alpha: float, name: str) -> Path:
    return write_lora_gguf(path, state, BaseShape.read(base_gguf), alpha, name)


def manifest_text(base: Manifest, model_id: str, version: str, tasks: list[str], gguf: Path,
                  training: Training, description: str = "", decision: DecisionRule | None = None) -> str:
    data = gguf.read_bytes()
    doc: dict[str, Any] = {
        "id": model_id, "version": version,
        "description": description or f"LoRA adapter for {', '.join(tasks)} on {base.id} {base.version}",
        "tasks": tasks, "backend": "gguf", "chat_template": base.chat_template,
        "context_length": base.context_length, "memory_estimate": len(data) + ADAPTER_OVERHEAD,
        "sampling": base.sampling.model_dump(),
        "smoke_test": base.smoke_test.model_dump(),
        "files": [{"name": f"{model_id}-{version}.gguf", "size": len(data),
                   "sha256": hashlib.sha256(data).hexdigest(),
                   "sources": [{"kind": "path", "path": str(gguf)}]}],
        "adapter": {"base": base.id, "base_version": base.version, "base_sha256": base.weights.sha256,
                    "scale": 1.0, "training": training.model_dump()},
    }
    if base.escalation_threshold is not None:
        doc["escalation_threshold"] = base.escalation_threshold
    if decision is not None:  # its own: the base's rule reads the base's evidence, not the adapter's
        doc["decision"] = decision.model_dump(exclude_none=True)
    text = tomli_w.dumps(doc)
    Manifest.from_toml(text, f"adapter {model_id} {version}")  # what we write must read back
    return text


def stage(store: ModelStore, text: str) -> Manifest:
    """Copy the adapter into the store as a staged version of its id."""
    manifest = Manifest.from_toml(text, "adapter")
    store.stage(manifest, text)
    return manifest
