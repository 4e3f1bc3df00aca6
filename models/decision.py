"""Under `tool_choice: auto`, whether a turn calls a tool or answers in text: decided
before any text is generated, from the model's own evidence, by a rule fitted per model
version (the manifest's `[decision]`, `outpost models calibrate`).

    Rule (a version's DecisionRule, as one request carries it)
      -> Evidence (read off the prompt's forward pass: no pass of its own)
      -> Decision (the record: choice, score, threshold, confidence; logged, replied)

The evidence is two readings of logits the prompt's forward pass computes anyway:

- `open_logodds`: the log-odds that the answer's first token opens a call: the
  probability mass, at the first position, of the tokens the call grammar allows there
  (the first bytes of `<tool_call>`) against every other token.
- `turn_end`: the logits at the token just after the agent's turn's end-of-turn mark
  (ChatML's `\n` after `<|im_end|>`), the last position before the assistant's
  header. Logits are a linear map of the model's final hidden
  state, so a fixed stride of them (PROBE_WIDTH tokens), centred on their mean, is a
  cheap linear view of what the model made of the request, the tools in context.

    score = bias + open_weight * open_logodds + probe_weights . turn_end[::stride]
    call  when score >= threshold

`score` is a calibrated log-odds that the turn needs a call (a logistic fit), so the
decision's confidence is the probability that the side chosen is right: sigmoid(score)
for a call, 1 - sigmoid(score) for an answer. A turn decided by a thin margin (or on
the wrong side of even odds, where the operating point favours calls) is a doubtful
turn, and escalation treats it as one (runtime/escalation/confidence.py).

Without a fitted rule (UNCALIBRATED) the score is open_logodds and the threshold 0: a
call when the model itself puts even odds on opening one. A small model's prior makes
that nearly never (SmolLM2-135M: at most a few percent), which is why models ship with
a rule (docs/tool-calls.md has the measurement).

Computing the decision costs a mask fill and two reductions over the vocabulary: a
fraction of one decode step. It is deterministic (no sampling).

What this module must not do: fit a rule (tools/calibrate.py does), or know a backend.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from outpost.manifests.schema import DecisionRule, Manifest

PROBE_WIDTH = 512  # turn-end logits a rule reads: enough to span a small model's hidden state
UNCALIBRATED = "uncalibrated"
Choice = Literal["call", "answer"]


def probe_layout(n_vocab: int) -> tuple[int, int]:
    """(stride, width): PROBE_WIDTH readings spread over the whole vocabulary (every
    token, for a vocabulary smaller than that)."""
    stride = max(1, n_vocab // PROBE_WIDTH)
    return stride, min(PROBE_WIDTH, len(range(0, n_vocab, stride)))


@dataclass(frozen=True)
class Rule:
    """A DecisionRule as one generation applies it: plain data, so it crosses the worker
    boundary inside the request. `name` says whose rule it is in the log."""

    bias: float = 0.0
    open_weight: float = 1.0
    threshold: float = 0.0
    probe_stride: int = 1
    probe_weights: tuple[float, ...] = ()
    name: str = UNCALIBRATED

    @classmethod
    def of(cls, manifest: Manifest) -> Rule:
        """The rule of a model or adapter version: its fitted one, else the uncalibrated."""
        fitted = manifest.decision
        if fitted is None:
            return cls()
        return cls.from_fitted(fitted, f"{manifest.id} {manifest.version}")

    @classmethod
    def from_fitted(cls, fitted: DecisionRule, name: str) -> Rule:
        # float32, as the wire carries them (to_dict): in a worker and in `calibrate` alike.
        weights = tuple(float(x) for x in np.asarray(fitted.probe_weights, dtype="<f4"))
        return cls(bias=fitted.bias, open_weight=fitted.open_weight, threshold=fitted.threshold,
                   probe_stride=fitted.probe_stride, probe_weights=weights, name=name)

    def to_dict(self) -> dict:
        """The wire form: the weights as little-endian float32, base64 (a request to a
        worker carries its rule; 512 floats as JSON numbers cost ~0.5 ms a request)."""
        weights = np.asarray(self.probe_weights, dtype="<f4").tobytes()
        return {**{k: getattr(self, k) for k in ("bias", "open_weight", "threshold", "probe_stride", "name")},
                "probe_weights": base64.b64encode(weights).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict) -> Rule:
        raw = base64.b64decode(data["probe_weights"]) if data.get("probe_weights") else b""
        weights = tuple(float(x) for x in np.frombuffer(raw, dtype="<f4"))
        return cls(**{**data, "probe_weights": weights})

    @property
    def reads_turn_end(self) -> bool:
        return bool(self.probe_weights)

    def misfit(self, n_vocab: int) -> str | None:
        """Why this rule cannot read a model whose logits are `n_vocab` wide (a rule fitted
        on another vocabulary), or None."""
        width = len(self.probe_weights)
        if width and self.probe_stride * (width - 1) >= n_vocab:
            return (f"the rule of {self.name} reads {width} logits at stride {self.probe_stride}; "
                    f"this model has {n_vocab}")
        return None

    def score(self, evidence: Evidence) -> float:
        value = self.bias + self.open_weight * evidence.open_logodds
        if self.probe_weights:
            if evidence.turn_end is None:
                raise ValueError("this rule reads the turn's end, and the evidence lacks it")
            probe = evidence.probe(self.probe_stride, len(self.probe_weights))
            value += float(np.dot(np.asarray(self.probe_weights, dtype=np.float64), probe))
        return value

    def decide(self, evidence: Evidence) -> Decision:
        # Compared as the reply and the log show them (4 places), so a record never reads
        # as a score equal to its threshold that decided "answer".
        score, threshold = round(self.score(evidence), 4), round(self.threshold, 4)
        choice: Choice = "call" if score >= threshold else "answer"
        p_call = _sigmoid(score)
        return Decision(choice=choice, p_open=round(evidence.p_open, 6), score=score, threshold=threshold,
                        confidence=round(p_call if choice == "call" else 1.0 - p_call, 4), rule=self.name)


_RULES: dict[tuple[str, str], Rule] = {}  # (id, version) -> its rule: a version's rule never changes


def rule_for(manifest: Manifest, request: Any) -> Rule | None:
    """The rule a GenerationRequest carries to its worker: that of the version answering
    (`manifest`: the task adapter's, or the model's) when the request has a decision to
    make (tools, tool_choice auto, the grammar on); None otherwise."""
    if not (request.tools and request.tool_choice == "auto" and request.constrained):
        return None
    key = (manifest.id, manifest.version)
    if (rule := _RULES.get(key)) is None:
        if len(_RULES) >= 64:  # a daemon serves a handful of versions; a long one sees more
            _RULES.clear()
        rule = _RULES[key] = Rule.of(manifest)
    return rule


@dataclass(frozen=True)
class Evidence:
    """What one prompt says about calling, before anything is generated."""

    open_logodds: float
    turn_end: np.ndarray | None = None  # the turn's last token's logits (float32), if read

    @classmethod
    def read(cls, first: np.ndarray, opens: np.ndarray, turn_end: np.ndarray | None) -> Evidence:
        """From the first position's logits and the mask of the tokens that open a call
        there (bool, the logits' width)."""
        logits = first.astype(np.float64, copy=False)
        top = float(np.max(logits))
        weights = np.exp(logits - top)
        total = float(weights.sum())
        opening = float(weights[opens].sum())
        rest = total - opening
        # Log-odds, kept finite: a grammar that opens with every token, or with none.
        tiny = total * 1e-30
        return cls(open_logodds=math.log(max(opening, tiny)) - math.log(max(rest, tiny)),
                   turn_end=None if turn_end is None else np.array(turn_end, dtype=np.float32))

    @property
    def p_open(self) -> float:
        return _sigmoid(self.open_logodds)

    def probe(self, stride: int, width: int) -> np.ndarray:
        """The readings a rule's probe weights apply to: centred, float64."""
        assert self.turn_end is not None
        picked = self.turn_end[::stride][:width].astype(np.float64)
        if picked.shape[0] != width:
            raise ValueError(f"the rule reads {width} logits at stride {stride}; this model has "
                             f"{self.turn_end.shape[0]}")
        return picked - picked.mean()


@dataclass(frozen=True)
class Decision:
    """One turn's decision, as the reply and the log carry it."""

    choice: Choice
    p_open: float  # the model's own probability of opening a call at the first token
    score: float  # the rule's log-odds that the turn needs a call
    threshold: float
    confidence: float  # the probability that `choice` is right, by the rule
    rule: str  # "uncalibrated", or the "id version" whose rule decided
    ms: float = 0.0  # what deciding took

    @classmethod
    def from_dict(cls, data: dict) -> Decision:
        return cls(**data)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
