"""An outcome's tries as log records: the local attempt, the cloud's, or their failures.

Every try at answering is kept, answered or failed, local or cloud: a failed local
attempt beside a cloud answer is exactly the example a task adapter learns from.

What this module must not do: write them; the daemon hands them to the log store.
"""

from __future__ import annotations

import json

from outpost.manifests.errors import OutpostError
from outpost.models.backend import Generation
from outpost.runtime.logs.records import AttemptKind, AttemptRecord

from .cloud import CloudAnswer
from .errors import CloudError
from .flow import Outcome


def local_attempt(model: str, version: str, gen: Generation, confidence: float | None,
                  parts: dict | None) -> AttemptRecord:
    logprobs = gen.logprobs
    decision = gen.decision
    return AttemptRecord(
        kind=AttemptKind.LOCAL, model=model, model_version=version, output=gen.text,
        tool_calls=gen.tool_calls or None, finish_reason=gen.finish_reason,
        constrained=gen.constrained, grammar_dead_end=gen.grammar_dead_end,
        validation=gen.validation or None, prompt=gen.prompt, grammar=gen.grammar,
        repaired=gen.repaired, mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
        min_logprob=min(logprobs) if logprobs else None, confidence=confidence,
        confidence_parts=parts, prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens, prefill_ms=gen.prefill_ms, decode_ms=gen.decode_ms,
        batch_size=gen.batch_size,
        **({} if decision is None else dict(
            decision=decision.choice, decision_score=decision.score, decision_threshold=decision.threshold,
            decision_confidence=decision.confidence, decision_rule=decision.rule)))


def failed_local_attempt(model: str, version: str, error: OutpostError) -> AttemptRecord:
    return AttemptRecord(kind=AttemptKind.LOCAL, model=model, model_version=version,
                         error_code=error.code, error_message=error.message)


def cloud_attempt(answer: CloudAnswer | None, error: CloudError | None, model: str,
                  auto: bool = False) -> AttemptRecord:
    """One cloud attempt, answered or failed (`model`: the configured one, for a failure).
    `auto`: the turn left the cloud to decide (tools offered, tool_choice auto): its
    decision, whether it called, is recorded beside the local one's."""
    if answer is None:
        return AttemptRecord(kind=AttemptKind.CLOUD, model=model, model_version="",
                             error_code=error.code if error else None,
                             error_message=error.message if error else None,
                             validation=error.data.get("validation") if error else None)
    return AttemptRecord(
        kind=AttemptKind.CLOUD, model=answer.model, model_version="",
        output=answer.content if answer.content is not None else json.dumps(answer.tool_calls),
        tool_calls=answer.tool_calls or None, finish_reason=answer.finish_reason,
        validation=answer.validation or None, prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens, decode_ms=round(answer.latency_ms, 2),
        cost_usd=round(answer.cost_usd, 8), constrained=False,
        decision=("call" if answer.tool_calls else "answer") if auto else None)


def attempts(outcome: Outcome, model: str, version: str, cloud_model: str,
             auto: bool = False) -> list[AttemptRecord]:
    """Every try of one outcome, in the order they were made (`auto`: see cloud_attempt).

    A local failure that nobody escalated is the request's own error row, with no
    attempt: there is nothing for training in it.
    """
    out: list[AttemptRecord] = []
    if outcome.generation is not None:
        out.append(local_attempt(model, version, outcome.generation, outcome.confidence,
                                 outcome.confidence_parts))
    elif outcome.local_error is not None and outcome.asked_cloud:
        out.append(failed_local_attempt(model, version, outcome.local_error))
    if outcome.asked_cloud:
        out.append(cloud_attempt(outcome.cloud, outcome.cloud_error,
                                 outcome.cloud.model if outcome.cloud else cloud_model, auto))
    return out
