"""S5: train a LoRA adapter on a task's examples, on the base the device serves.

The text trained on is the text served: each example is rendered with Outpost's own
chat template and tools block (models/templates.py) and tokenized by llama.cpp from
the base's GGUF, the answer written as the grammar makes the model write it and
closed by the template's end of turn. The loss counts the answer's tokens only.

The weights trained on are the weights served: transformers reads the base's GGUF,
dequantized to fp32 (a quantized model cannot be trained); that copy is saved once
under the store's cache, keyed by the GGUF's sha256, because reading the GGUF takes
tens of seconds and the saved copy under one.

A run is a fixed plan of optimiser steps (batches of examples by a token budget,
shuffled by the seed): a checkpoint after every `checkpoint_every` steps holds the
adapter, the optimiser and the step, and a run started again with the same settings
and data resumes from it. Threads are bounded (`threads`, default half the cores) so
a daemon on the same machine keeps answering.

What this module must not do: choose the examples (data.py, the export) or write the
store (the caller does, with the GGUF adapter this returns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from outpost.manifests.errors import BadRequest
from outpost.manifests.schema import Manifest
from outpost.models.templates import ChatTemplate, answer_text

from ..hf_folder import hf_folder
from .data import Example
from .world import World

log = logging.getLogger("outpost.specialise")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # the label of a token the loss does not count


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ALL_PROJECTIONS
    epochs: float = 3.0
    learning_rate: float = 1e-3  # the rate docs/specialise.md measured on BFCL
    batch_tokens: int = 2048  # padded tokens per optimiser step
    max_seq_len: int = 1024  # longer examples are left out, never cut
    warmup_steps: int = 5
    seed: int = 0
    threads: int | None = None  # None: half the cores
    checkpoint_every: int = 10  # optimiser steps

    def key(self, data_sha256: str, base_sha256: str) -> str:
        """What a checkpoint must match to be resumed (threads do not change the result)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("threads", "checkpoint_every")}
        blob = json.dumps({**fields, "data": data_sha256, "base": base_sha256}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Trained:
    state: dict[str, np.ndarray]  # peft's LoRA tensors, float32
    steps: int
    examples: int  # trained on
    left_out_at: tuple[int, ...]  # indices (in the examples given) of those longer than max_seq_len
    threads: int
    wall_s: float
    device: str
    losses: list[float] = field(default_factory=list)  # per step (this run's steps only)
    resumed_from: int = 0

    @property
    def left_out(self) -> int:
        return len(self.left_out_at)


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]


class Renderer:
    """Examples -> token ids, exactly as the llama.cpp backend would see them."""

    def __init__(self, manifest: Manifest, gguf_path: Path) -> None:
        import llama_cpp

        self._llama = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
        self.template = ChatTemplate.from_manifest(
            manifest.chat_template, self._llama.metadata.get("tokenizer.chat_template"))
        self._end = self._tokens(self.template.turn_end(), special=True)

    def _tokens(self, text: str, special: bool, bos: bool = False) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def prompt(self, ex: Example) -> list[int]:
        return self._tokens(self.template.render(ex.messages, ex.tools), special=True, bos=True)

    def encode(self, ex: Example) -> Encoded:
        prompt = self.prompt(ex)
        answer = self._tokens(answer_text(ex.answer), special=False) + self._end
        return Encoded(ids=prompt + answer, labels=[IGNORE] * len(prompt) + answer)

    def close(self) -> None:
        self._llama.close()


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def plan(lengths: list[int], settings: TrainSettings) -> list[list[int]]:
    """Every optimiser step's batch (example indices), for the whole run: a fixed plan
    is what makes a resumed run the same run. Each epoch is shuffled by the seed, then
    sorted by length within windows so a batch pads little."""
    rng = random.Random(settings.seed)
    steps: list[list[int]] = []
    epochs = math.ceil(settings.epochs)
    for epoch in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if epoch == epochs - 1 and settings.epochs != epochs:  # a fractional last epoch
            order = order[: max(1, round(len(order) * (settings.epochs - epoch)))]
        window = 64
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
            batch: list[int] = []
            for i in chunk:
                if batch and (len(batch) + 1) * max(lengths[j] for j in [*batch, i]) > settings.batch_tokens:
                    steps.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                steps.append(batch)
    rng.shuffle(steps)  # windows sorted by length must not order the run short-to-long
    return steps


def hf_base(folder: Path) -> Any:
    """The base as a trainable fp32 transformers model, from its folder in the store's cache."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def train(manifest: Manifest, gguf_path: Path, examples: list[Example], settings: TrainSettings,
          cache: Path, workdir: Path, data_sha256: str,
          progress: Callable[[int, int], Any] | None = None, world: World = World()) -> Trained:
    """Train an adapter; checkpoints go to `workdir/checkpoint` and a matching one is
    resumed. `progress(done, total)` returns a tqdm-like bar (update, set_postfix, close).
    In a `world` of several processes every one calls this, each trains on its share of
    every batch, and process 0 alone writes checkpoints and shows progress."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    threads = settings.threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)  # the same LoRA initialisation in every process
    device = f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu"

    renderer = Renderer(manifest, gguf_path)
    try:
        encoded = [renderer.encode(ex) for ex in examples]
    finally:
        renderer.close()
    kept = [e for e in encoded if len(e.ids) <= settings.max_seq_len]
    if not kept:
        raise BadRequest(f"no example fits max_seq_len={settings.max_seq_len} "
                         f"(of {len(encoded)}); raise it", field="max_seq_len")
    steps = plan([len(e.ids) for e in kept], settings)

    # Process 0 makes the cached fp32 copy before the others read it (the data dir, and
    # the cache in it, is one path on every machine: world.py); its failure reaches
    # them (World.share), so none waits for a copy that never comes.
    base = hf_base(world.share(lambda: hf_folder(gguf_path, manifest.weights.sha256, cache)))
    peft_model = get_peft_model(base, LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                                 target_modules=list(settings.targets), lora_dropout=0.0,
                                                 bias="none", task_type="CAUSAL_LM")).to(device)
    model = peft_model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(peft_model, device_ids=[world.local_rank] if device != "cpu" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to a tenth
        if step < settings.warmup_steps:
            return settings.learning_rate * (step + 1) / settings.warmup_steps
        done = (step - settings.warmup_steps) / max(1, len(steps) - settings.warmup_steps)
        return settings.learning_rate * (1.0 - 0.9 * done)

    checkpoint = workdir / "checkpoint"
    key = settings.key(data_sha256, manifest.weights.sha256)
    # Process 0 decides where the run starts, for all: processes at different steps
    # would combine the gradients of different batches.
    start = world.share(lambda: _resumable(checkpoint, key))
    if start:
        set_peft_model_state_dict(peft_model, torch.load(checkpoint / "adapter.pt", map_location=device,
                                                         weights_only=True))
        optimiser.load_state_dict(torch.load(checkpoint / "optimiser.pt", map_location=device, weights_only=True))
        log.info("resuming at step %d of %d from %s", start, len(steps), checkpoint)

    bar = progress(start, len(steps)) if progress and world.main else None
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(start, len(steps)):
        batch = [kept[i] for i in steps[step]]
        # The loss is the mean over the whole batch's answer tokens, in every process:
        # each sums its share's and divides by the batch's count, and DDP, which
        # averages gradients, is given `size` times that, so the step is one process's.
        answer_tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in batch)
        mine = batch[world.rank::world.size] or [Encoded(ids=batch[0].ids[:1], labels=[IGNORE])]
        width = max(len(e.ids) for e in mine)
        ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in mine], device=device)
        labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.ids)) for e in mine], device=device)
        mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in mine], device=device)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=answer_tokens).loss
        (loss * world.size).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(_summed(loss.detach(), world))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < len(steps) and world.main:
            _save_checkpoint(checkpoint, key, step + 1,
                             get_peft_model_state_dict(peft_model, save_embedding_layers=False), optimiser)
    if bar is not None:
        bar.close()
    state = {k: v.detach().float().cpu().numpy()
             for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    return Trained(state=state, steps=len(steps), examples=len(kept),
                   left_out_at=tuple(i for i, e in enumerate(encoded) if len(e.ids) > settings.max_seq_len),
                   threads=threads, wall_s=time.perf_counter() - t0,
                   device=device if world.size == 1 else f"{device} x{world.size}", losses=losses,
                   resumed_from=start)


def _resumable(checkpoint: Path, key: str) -> int:
    """The step a checkpoint of this run's settings and data resumes at; 0 for none."""
    try:
        saved = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(saved, dict) or saved.get("key") != key:
        log.info("a checkpoint of other settings or data is in %s: starting over", checkpoint)
        return 0
    return int(saved.get("step", 0))


def _summed(loss: Any, world: World) -> float:
    """The whole batch's loss: the sum of every process's share."""
    if world.size > 1:
        import torch.distributed as dist

        dist.all_reduce(loss)
    return float(loss)


def _save_checkpoint(folder: Path, key: str, step: int, adapter: dict[str, Any], optimiser: Any) -> None:
    """Write the checkpoint beside the old one, then swap: a kill leaves one whole."""
    import torch

    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(adapter, tmp / "adapter.pt")
    torch.save(optimiser.state_dict(), tmp / "optimiser.pt")
    (tmp / "state.json").write_text(json.dumps({"key": key, "step": step}))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.replace(old)
    tmp.replace(folder)
    shutil.rmtree(old, ignore_errors=True)
