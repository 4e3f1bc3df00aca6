"""How much to trust a local answer, in [0, 1], from the attempt's own evidence.

    score = soft x gates

soft is what the model's probabilities say. For a tool call, only the tokens the
grammar left a choice for count (a forced token has log-probability 0 after the
mask and says nothing): their mean log-probability m and the single lowest one n,
combined as a weighted geometric mean

    soft = exp(m) ^ w_mean  x  exp(n / min_temperature) ^ w_min      (w_mean + w_min = 1)

The weakest token matters because a wrong argument is usually one doubtful token
(a city, a number) among many easy ones; `min_temperature` softens it so that one
merely unusual token does not sink the score. With several calls, the weakest call
counts. A text answer uses all its tokens.

gates are hard evidence, each a factor from config (0 rules the answer out):

    invalid        a call failed validation against its schema
    dead_end       the grammar reached a state with no allowed token
    repaired       a call was cut short (repetition loop or length) and closed
    truncated      the answer stopped at max_tokens
    no_call        a call was required (tool_choice required or named) and none came

Under tool_choice auto one more factor: the decision's own confidence, the probability
by its rule that calling (or answering) was the right side (models/decision.py). A
turn decided by a thin margin is a doubtful turn however sure its tokens are: with
`on_low_confidence` it goes to the cloud like a doubtful call does.

    score = soft x gates x decision

The parts are returned with the score, logged with the attempt, and sent in the reply.

What this module must not do: decide what a score leads to (flow.py compares it
with the policy's threshold).
"""

from __future__ import annotations

import math
from typing import Any

from outpost.models.backend import Generation

from .settings import ConfidenceSettings


def _soft(mean: float | None, low: float | None, cfg: ConfidenceSettings) -> float:
    if mean is None or low is None:
        return 1.0  # nothing generated freely: nothing to doubt
    w = cfg.mean_weight / (cfg.mean_weight + cfg.min_weight)
    return math.exp(w * mean + (1 - w) * low / cfg.min_temperature)


def score(gen: Generation, tool_choice: str | None,
          cfg: ConfidenceSettings) -> tuple[float, dict[str, Any]]:
    """(confidence, its parts) for one local generation."""
    calls = gen.validation
    if calls:
        softs = []
        for c in calls:
            lp = c.get("logprob") or {}
            free = lp.get("free")
            if free is None:  # stats without the free-token count: all tokens
                mean, low = lp.get("mean"), lp.get("min")
            else:
                mean, low = (lp["sum"] / free, lp["min"]) if free else (0.0, 0.0)
            softs.append(_soft(mean, low, cfg))
        soft = min(softs)
    else:
        lps = gen.logprobs
        soft = _soft(sum(lps) / len(lps) if lps else None, min(lps) if lps else None, cfg)
    required = tool_choice not in (None, "auto", "none")
    flags = {
        "invalid": any(not c.get("valid") for c in calls),
        "dead_end": gen.grammar_dead_end,
        "repaired": bool(gen.repaired),
        "truncated": gen.finish_reason == "length",
        "no_call": required and not gen.tool_calls,
    }
    gates = 1.0
    for name, hit in flags.items():
        if hit:
            gates *= getattr(cfg, f"{name}_factor")
    parts: dict[str, Any] = {"soft": round(soft, 4), **flags}
    if gen.decision is not None:
        gates *= gen.decision.confidence
        parts["decision"] = gen.decision.confidence
    value = max(0.0, min(1.0, soft * gates))
    return round(value, 4), parts
