"""S4 and S6: how well a model (with an adapter, or without) answers held-out examples.

Each example is asked exactly as the daemon would ask it, in the same llama.cpp
backend (`LlamaModel`, in this process): the same template and grammar, greedy
decoding, and with tools offered `tool_choice: auto` (what agents send), so each
candidate first decides between calling and answering with its own rule (the
manifest's `[decision]`, models/decision.py) and is scored on that decision too.

An answer is right when:
- the target is a call: its calls equal the target's by name and arguments
  (arguments compared as parsed JSON, numbers by value: 1 == 1.0; calls as a
  multiset: the order of parallel calls does not matter). Answering in text is wrong.
- the target is text and tools were offered: it made no call (the decision; two
  right answers in prose rarely match word for word, so the wording is not scored).
- the target is text and no tools were offered: its text, whitespace collapsed.
An answer is valid when every call passed the schema validator and an expected call
was made; its decision is right when it called exactly where the target calls.

What this module must not do: decide promotion (gate.py) or write anything.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from outpost.models.backend import AdapterRef, Generation, GenerationRequest
from outpost.models.decision import Rule

from .data import Call, Example

if TYPE_CHECKING:  # llama_cpp and xgrammar (with torch) load only when a command runs
    from outpost.models.llama import LlamaModel


@dataclass(frozen=True)
class Scored:
    correct: bool
    valid: bool
    decided: bool  # called exactly where the target calls
    latency_ms: float  # prefill + decode
    completion_tokens: int
    decode_ms: float


@dataclass
class Evaluation:
    model: str
    version: str
    adapter: str | None  # "id version", or None for the base alone
    scored: list[Scored] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return len(self.scored)

    @property
    def accuracy(self) -> float:
        return sum(s.correct for s in self.scored) / len(self.scored) if self.scored else 0.0

    @property
    def validity(self) -> float:
        return sum(s.valid for s in self.scored) / len(self.scored) if self.scored else 0.0

    @property
    def decision_accuracy(self) -> float:
        return sum(s.decided for s in self.scored) / len(self.scored) if self.scored else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(s.latency_ms for s in self.scored) if self.scored else 0.0

    @property
    def decode_tok_s(self) -> float:
        ms = sum(s.decode_ms for s in self.scored)
        return sum(s.completion_tokens for s in self.scored) / (ms / 1e3) if ms else 0.0

    def pairs(self) -> list[tuple[bool, bool, bool]]:
        """(right, valid, decided right) per example, for the gate."""
        return [(s.correct, s.valid, s.decided) for s in self.scored]

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "adapter": self.adapter,
                "examples": self.examples, "accuracy": round(self.accuracy, 4),
                "validity": round(self.validity, 4), "decision_accuracy": round(self.decision_accuracy, 4),
                "p50_ms": round(self.p50_ms, 1),
                "decode_tok_s": round(self.decode_tok_s, 1)}


def _norm(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _key(name: str, arguments: Any) -> str:
    return json.dumps([name, _norm(arguments)], sort_keys=True)


def same_calls(got: list[dict[str, Any]], want: list[Call]) -> bool:
    """The generated OpenAI tool calls equal the target's, by name and parsed arguments."""
    mine = []
    for call in got:
        fn = call.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            return False
        mine.append(_key(fn.get("name", ""), args))
    return sorted(mine) == sorted(_key(c.name, c.arguments) for c in want)


def score(generation: Generation, example: Example) -> Scored:
    want = example.calls
    called = bool(generation.tool_calls)
    valid = all(v.get("valid") for v in generation.validation) and (called or not want)
    if want:
        correct = same_calls(generation.tool_calls, want)
    elif example.tools:
        correct = not called
    else:
        text = " ".join((example.answer.get("content") or "").split())
        correct = not called and " ".join((generation.content or "").split()) == text
    return Scored(correct=correct, valid=valid, decided=called == bool(want),
                  latency_ms=generation.prefill_ms + generation.decode_ms,
                  completion_tokens=generation.completion_tokens, decode_ms=generation.decode_ms)


def request_for(example: Example, adapter: AdapterRef | None, max_tokens: int,
                rule: Rule | None = None) -> GenerationRequest:
    return GenerationRequest(messages=example.messages, tools=example.tools, tool_choice=example.tool_choice,
                             parallel_tool_calls=example.parallel_tool_calls, max_tokens=max_tokens,
                             temperature=0.0, adapter=adapter, decision=rule)


def evaluate(model: LlamaModel, examples: list[Example], adapter: AdapterRef | None = None,
             max_tokens: int = 256, progress: Callable[[], Any] | None = None,
             rule: Rule | None = None) -> Evaluation:
    """`rule`: how the candidate decides under auto (its manifest's; None: uncalibrated)."""
    out = Evaluation(model=model.manifest.id, version=model.manifest.version,
                     adapter=f"{adapter.id} {adapter.version}" if adapter else None)
    for example in examples:
        out.scored.append(score(model.generate(request_for(example, adapter, max_tokens, rule)), example))
        if progress is not None:
            progress()
    return out
