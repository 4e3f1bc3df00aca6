"""Several generations decoded together: continuous batching over a model's slots.

A `Batch` holds up to `model.n_slots` sequences (decoder.Sequence), each on its own
slot of the KV cache. `step` is one forward pass: the next token of every sequence
that is decoding, then as much of the joining sequences' prompts as `n_batch` leaves
room for (a long prompt is prefilled over several passes, so the others keep decoding
meanwhile). A request joins at the next pass and a finished one leaves at once,
freeing its slot; nobody waits for the batch to drain.

What a sequence computes does not depend on its neighbours: its own cache positions,
grammar matcher, sampler and seed, and decoder.py's per-sequence loop unchanged between
passes. (Greedy tokens match a solo run's as long as the batched matrix products give
the same argmax; llama.cpp's CPU kernels for one row and for several are not bit-equal,
so a near-tie can go the other way. tests/test_batching.py counts it.)

Adapters: llama.cpp applies a LoRA adapter to the whole context, not per sequence, so
one batch runs under one adapter; a request for another is not admitted until the
batch drains (`admits`), and the worker keeps it queued.

Slots and prefixes: a joining sequence takes the free slot whose cache shares the
longest prefix with its prompt; if another slot (busy or free) shares a longer one, its
positions are shared into the chosen slot (a unified KV cache holds them once), so a
system prompt and tools that every agent sends are evaluated once.

What this module must not do: know the wire or the daemon (worker_process.py feeds it),
or import a backend's runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from outpost.manifests.errors import InternalError, OutpostError

from .backend import AdapterRef, GenerationRequest
from .decoder import Decoder, Sequence, common_prefix

log = logging.getLogger("outpost.worker")

MIN_SHARED = 16  # fewer shared tokens than this are not worth rearranging a slot for


class Batch:
    def __init__(self, model: Decoder) -> None:
        self.model = model
        self.active: dict[int, Sequence] = {}  # slot -> the sequence decoding on it
        self._pending: dict[int, list[int]] = {}  # slot -> tokens of its step not evaluated yet
        self.passes = 0  # forward passes run
        self.shared = 0  # prompt tokens taken from another slot's cache

    @property
    def free(self) -> int:
        return self.model.n_slots - len(self.active)

    def admits(self, request: GenerationRequest) -> bool:
        """Whether `request` may join now: a free slot, and the adapter the batch runs."""
        return self.free > 0 and (not self.active or request.adapter == self._adapter())

    def _adapter(self) -> AdapterRef | None:
        return next(iter(self.active.values())).request.adapter

    def join(self, request: GenerationRequest, on_text: Callable[[str], None] | None = None) -> Sequence:
        """Start `request` on a free slot; it is evaluated from the next `step`. Its typed
        error (bad tools, the grammar, the context, the adapter) is raised here, and
        nothing joins."""
        if not self.admits(request):
            raise InternalError("a request joined a batch that does not admit it")
        if not self.active:
            self.model.use_adapter(request.adapter)
        seq = self.model.start(request, on_text)
        seq.slot = self._slot_for(seq.prompt)
        self.active[seq.slot] = seq  # in the order they joined (dicts keep it)
        self._resume(seq)  # to its first yield: the prompt tokens the slot lacks
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Take `seq` out (its caller gave up); what its slot cached stays for reuse."""
        if self.active.get(seq.slot) is seq:
            self._leave(seq)
            seq.steps.close()

    def step(self) -> list[Sequence]:
        """One forward pass over the batch. Returns the sequences that left: each with a
        `result`, or an `error` for that request alone."""
        if not self.active:
            return []
        room = self.model.n_batch
        work: list[tuple[int, list[int], bool]] = []
        # Decoding sequences first (a token each), then prompts in the order they came
        # (the sort is stable).
        for seq in sorted(self.active.values(), key=lambda s: len(self._pending[s.slot]) > 1):
            if room <= 0:
                break
            tokens = self._pending[seq.slot]
            take, rest = tokens[:room], tokens[room:]
            work.append((seq.slot, take, not rest))
            self._pending[seq.slot] = rest
            room -= len(take)
        try:
            self.model._eval_many(work)
        except Exception as exc:  # a failed pass fails the sequences in it, not the worker
            error = exc if isinstance(exc, OutpostError) else InternalError(f"forward pass failed: {exc!r}")
            log.error("a forward pass of %d sequences failed: %s", len(work), error)
            return [self._fail(self.active[slot], error) for slot, _, _ in work]
        self.passes += 1
        left = []
        for slot, _, complete in work:
            seq = self.active[slot]
            seq.passes += 1
            seq.batched += len(work)
            if complete and not self._resume(seq):
                left.append(seq)
        return left

    # -- inside -----------------------------------------------------------------------
    def _resume(self, seq: Sequence) -> bool:
        """Run `seq` to its next forward pass; False when it has left the batch."""
        try:
            tokens: list[int] = []
            while not tokens:
                tokens = next(seq.steps)
        except StopIteration:
            self._leave(seq)
            return False
        except Exception as exc:  # its own failure (a bug, the grammar): only this request's
            if not isinstance(exc, OutpostError):
                log.exception("a generation failed")
            self._fail(seq, exc if isinstance(exc, OutpostError) else InternalError(f"generation failed: {exc!r}"))
            return False
        self._pending[seq.slot] = tokens
        return True

    def _fail(self, seq: Sequence, error: OutpostError) -> Sequence:
        seq.error = error
        self._leave(seq)
        return seq

    def _leave(self, seq: Sequence) -> None:
        del self.active[seq.slot]
        self._pending.pop(seq.slot, None)

    def _slot_for(self, prompt: list[int]) -> int:
        """The free slot whose cache serves `prompt` best, given the longest prefix any
        slot holds when sharing it is worth a rearrangement."""
        model = self.model
        shared = {s: common_prefix(model._cached(s), prompt) for s in range(model.n_slots)}
        free = [s for s in range(model.n_slots) if s not in self.active]
        slot = max(free, key=lambda s: (shared[s], -s))
        donor = max(shared, key=lambda s: shared[s])
        n = min(shared[donor], len(prompt) - 1)
        if n - shared[slot] >= MIN_SHARED and model._share(donor, slot, n):
            self.shared += n
        return slot
