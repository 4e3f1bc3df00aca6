"""The decoder's side of `tool_choice: auto`: what the decision (decision.py) reads off
the prompt's own forward pass, and when. A mixin of Decoder, so each backend's forward
pass serves it unchanged; split out because the generation loop need not know how.

Two kinds of evidence, both from the pass that evaluates the prompt anyway:
- the logits at the prompt's last position, under the call grammar's first mask (the
  mass of a call's opening tokens);
- the logits just after the agent's end-of-turn mark (`turn_end`), for a rule that reads
  them. That position is inside the prompt, so a backend keeps its row as the pass goes
  by: `_marked` tells the backend where in a pass's tokens it falls, `_keep` stores it.

What this module must not do: pick a token, or import a backend's runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from outpost.manifests.errors import BadRequest, InternalError

from .backend import GenerationRequest
from .decision import Decision, Evidence, Rule
from .grammar import TokenMask

if TYPE_CHECKING:
    from .decoder import Sequence


@dataclass(eq=False)
class PendingDecision:
    """Under tool_choice auto, what the decision needs: the rule, the grammar of each side
    (the call grammar's first mask is also the evidence of what opens a call), and the
    prompt position whose logits the rule reads (None: it reads none)."""

    rule: Rule
    call: TokenMask
    answer: TokenMask
    turn_end: int | None


class Deciding:
    """Decoder's decision half. It uses the decoder's `manifest`, `n_vocab`, `template`,
    `grammars`, `tokenize`, `use_adapter`, `start`, `_prompt_steps`, `_eval` and `_logits`."""

    def _init_deciding(self) -> None:
        self._turn_tail: int | None = None  # prompt tokens after the agent's turn's last one
        self._marks: dict[int, int] = {}  # slot -> the cache position whose logits to keep
        self._kept: dict[int, np.ndarray] = {}  # slot -> those logits, once evaluated

    def _pending(self, request: GenerationRequest, prompt: list[int], compiled) -> PendingDecision | None:
        """What deciding `request` will need, or None when nothing is to be decided (a
        choice other than auto, or no grammar)."""
        if compiled is None or request.tool_choice != "auto":
            return None
        rule = request.decision or Rule()
        if (misfit := rule.misfit(self.n_vocab)) is not None:
            raise InternalError(misfit)
        return PendingDecision(rule=rule, call=TokenMask(compiled, self.n_vocab),
                               answer=TokenMask(self.grammars.answer(), self.n_vocab),
                               turn_end=self._turn_end(prompt) if rule.reads_turn_end else None)

    # -- the marked position, kept as the prompt's pass goes by ------------------------------
    def _mark(self, slot: int, mark: int | None) -> None:
        """A new prompt on `slot`: forget what an earlier (perhaps cancelled) one kept or
        wanted, and want `mark`'s row this time (None: no row)."""
        self._kept.pop(slot, None)
        self._marks.pop(slot, None)
        if mark is not None:
            self._marks[slot] = mark

    def _marked(self, slot: int, start: int, n: int) -> int | None:
        """The index, among `n` tokens evaluated from cache position `start` on the slot,
        of the position whose logits are wanted, if it is one of them."""
        at = self._marks.get(slot)
        return at - start if at is not None and start <= at < start + n else None

    def _keep(self, slot: int, row: np.ndarray) -> None:
        self._kept[slot] = np.array(row, dtype=np.float32)
        del self._marks[slot]

    # -- where the agent's turn ends ------------------------------------------------------
    def _turn_end(self, prompt: list[int]) -> int:
        """The position in `prompt` just after the agent's turn's end-of-turn mark: the
        `\\n` of ChatML's `<|im_end|>\\n<|im_start|>assistant\\n`, the last position
        that reads the agent's turn before the assistant's header begins."""
        if self._turn_tail is None:
            self._turn_tail = self._tail_tokens()
        return len(prompt) - self._turn_tail

    def _tail_tokens(self) -> int:
        """How many prompt tokens follow the end-of-turn mark of the last turn: counted
        once, on a one-turn chat, in the model's own tokens."""
        mark = self.template.turn_end()
        text = self.template.render([{"role": "user", "content": "q"}], None)
        if not mark or mark not in text:
            raise InternalError(f"{self.manifest.id}: its chat template marks no end of turn, which "
                                f"a decision rule that reads the turn's end needs")
        cut = text.rindex(mark) + len(mark)
        full = self.tokenize(text.encode("utf-8"), prompt=True)
        head = self.tokenize(text[:cut].encode("utf-8"), prompt=True)
        if full[:len(head)] != head or len(full) == len(head):
            raise InternalError(f"{self.manifest.id}: its prompt does not tokenize the same cut at "
                                f"its end-of-turn mark {mark!r}, or nothing follows the mark")
        return len(full) - len(head)

    # -- reading and deciding -------------------------------------------------------------
    def evidence(self, request: GenerationRequest, rule: Rule) -> Evidence:
        """What `request`'s prompt says about calling, as `rule` reads it, without
        generating: the prompt evaluated alone on slot 0 (`outpost models calibrate`
        reads every labelled turn through this, so a fit sees what serving sees)."""
        if not request.tools or not request.constrained:
            raise BadRequest("the decision's evidence needs tools and the grammar (constrained)")
        self.use_adapter(request.adapter)
        seq = self.start(replace(request, tool_choice="auto", decision=rule))
        assert seq.pending is not None
        seq.slot = 0
        for tokens in self._prompt_steps(seq.prompt, 0, seq.pending.turn_end):
            self._eval(tokens, 0)
        return self._read_evidence(seq)

    def _read_evidence(self, seq: Sequence) -> Evidence:
        pending = seq.pending
        assert pending is not None
        turn_end = self._kept.pop(seq.slot, None) if pending.turn_end is not None else None
        return Evidence.read(self._logits(seq.slot), pending.call.allowed(), turn_end)

    def _decide(self, seq: Sequence) -> tuple[Decision, TokenMask]:
        """Call or answer, from the prompt's evidence, before any token is chosen; the
        mask of the side chosen decodes the answer."""
        pending = seq.pending
        assert pending is not None
        t0 = time.perf_counter()
        decision = pending.rule.decide(self._read_evidence(seq))
        decision = replace(decision, ms=round((time.perf_counter() - t0) * 1e3, 3))
        return decision, pending.call if decision.choice == "call" else pending.answer
