"""The processes one specialisation run spans: one, or several under a distributed
launcher (`accelerate launch`, or torchrun) when one GPU is not enough.

    accelerate launch --num_processes 4 -m outpost.runtime.cli specialise TASK   # 4 GPUs
    accelerate launch --num_machines 2 --machine_rank R ... -m outpost.runtime.cli specialise TASK

Process 0 does all but the training's share: the export, S4, writing the adapter, S6
and promotion. Every process trains: each optimiser step's batch (the same fixed plan
as a single process) is split between them, and DDP sums their gradients, so the step
is the one a single process would take on the whole batch. The data dir (log, store,
work dir) must be the same path on every machine: a shared filesystem.

What this module must not do: choose what to train or on what (cli.py), or train (train.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from outpost.manifests.errors import OutpostError

# How long a process waits for the others: process 0 runs S4 (held-out answers on every
# candidate base) while the others wait for its choice, which takes minutes to hours.
WAIT = timedelta(hours=6)


class WorldFailed(OutpostError):
    """Process 0 failed before training, so the others have nothing to train (its
    own error says why, on its own output)."""

    code = "world_failed"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """This process's place, from the launcher's environment (WORLD_SIZE, RANK,
        LOCAL_RANK); a process started alone is a world of one and starts nothing."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)
        return cls(rank=state.process_index, size=state.num_processes, local_rank=state.local_process_index)

    def share(self, make: Any) -> Any:
        """`make()` on process 0, its value on every process. An error on process 0 is
        raised there and a `WorldFailed` everywhere else, so no process waits for ever."""
        if self.size == 1:
            return make()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.main:
            try:
                box[0] = ("ok", make())
            except BaseException as exc:  # noqa: BLE001 (told to the others, then raised)
                error, box[0] = exc, ("failed", f"{type(exc).__name__}: {exc}")
        broadcast_object_list(box, from_process=0)
        if error is not None:
            raise error
        status, value = box[0]
        if status != "ok":
            raise WorldFailed(f"process 0 failed before training: {value}")
        return value

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
