"""An outcome shaped twice: as the agent's reply and as the log's request record.

Both are functions of the same data (the parsed request, the model it was routed to,
the escalation outcome, the timings), so what the agent saw and what the log says it
saw cannot drift apart. The reply is OpenAI's chat.completion, plus an `outpost`
object (docs/protocol.md lists its fields).

What this module must not do: decide anything; every choice is in the outcome.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from outpost.manifests.schema import Manifest
from outpost.models.backend import GenerationRequest
from outpost.runtime.escalation.flow import Outcome
from outpost.runtime.logs.records import RequestRecord

from .protocol import ChatParams

TIMINGS = ("queue", "load", "prefill", "decode")


def timings(waited: dict[str, float], outcome: Outcome, t0: float) -> dict[str, float]:
    """ms spent in each stage: waiting for the model (queue, load), in it, in the cloud."""
    out = dict.fromkeys(TIMINGS, 0.0) | waited
    if outcome.generation is not None:
        out.update(prefill=outcome.generation.prefill_ms, decode=outcome.generation.decode_ms)
    if outcome.cloud is not None:
        out["cloud"] = outcome.cloud.latency_ms
    out["total"] = (time.perf_counter() - t0) * 1e3
    return {k: round(v, 2) for k, v in out.items()}


def request_record(chat: ChatParams, request: GenerationRequest, manifest: Manifest, task: str | None,
                   outcome: Outcome, timings_ms: dict[str, float]) -> RequestRecord:
    """The request's row: what was asked, and the answer that went out (or the error)."""
    answer: dict[str, Any] = {}
    if outcome.cloud is not None:
        cloud = outcome.cloud
        answer = dict(content=cloud.content, tool_calls=cloud.tool_calls or None,
                      finish_reason=cloud.finish_reason, prompt_tokens=cloud.prompt_tokens,
                      completion_tokens=cloud.completion_tokens, answered_by=cloud.model)
    elif outcome.generation is not None:
        gen = outcome.generation
        answer = dict(content=gen.content, tool_calls=gen.tool_calls or None,
                      finish_reason=gen.finish_reason, prompt_tokens=gen.prompt_tokens,
                      completion_tokens=gen.completion_tokens, answered_by=manifest.id,
                      degraded=outcome.degraded_reason)
    elif outcome.local_error is not None:
        answer = dict(error_code=outcome.local_error.code, error_message=outcome.local_error.message)
    return RequestRecord(
        method="chat", model_requested=chat.model or (f"task:{chat.task}" if chat.task else None),
        model=manifest.id, model_version=manifest.version,
        # The task asked for, else the model's first: what stats and export group by.
        task=task, policy=outcome.policy, messages=request.messages, tools=request.tools,
        tool_choice=request.tool_choice,
        params={k: v for k, v in chat.model_dump(exclude={"messages", "tools"}).items() if v is not None},
        confidence=outcome.confidence, timings=timings_ms, **answer)


def chat_reply(outcome: Outcome, manifest: Manifest, log_id: int | None,
               timings_ms: dict[str, float]) -> dict[str, Any]:
    """The agent's reply to an answered request: the cloud's answer, else the local one."""
    gen, cloud = outcome.generation, outcome.cloud
    ours: dict[str, Any] = {
        "model": manifest.id, "model_version": manifest.version, "timings_ms": timings_ms,
        "confidence": outcome.confidence, "confidence_parts": outcome.confidence_parts,
        "policy": outcome.policy, "escalated": outcome.asked_cloud, "shadow": outcome.shadow,
        "degraded": outcome.degraded_reason is not None, "degraded_reason": outcome.degraded_reason,
        # tool_choice auto: the local model's decision to call or answer, and its evidence
        "decision": asdict(gen.decision) if gen is not None and gen.decision is not None else None}
    if cloud is not None:
        answered_by, content, calls, finish = cloud.model, cloud.content, cloud.tool_calls, cloud.finish_reason
        usage = (cloud.prompt_tokens, cloud.completion_tokens)
        ours.update(validation=cloud.validation, cloud={
            "model": cloud.model, "attempts": cloud.attempts, "prompt_tokens": cloud.prompt_tokens,
            "completion_tokens": cloud.completion_tokens, "cost_usd": round(cloud.cost_usd, 8),
            "latency_ms": round(cloud.latency_ms, 2)}, local=None if gen is None else {
            "tool_calls": gen.tool_calls or None, "content": None if gen.tool_calls else gen.text,
            "validation": gen.validation or None})
    else:
        assert gen is not None, "an unanswered outcome is an error, not a reply"
        answered_by, content, calls, finish = manifest.id, gen.content, gen.tool_calls, gen.finish_reason
        usage = (gen.prompt_tokens, gen.completion_tokens)
        lps = gen.logprobs
        ours.update(constrained=gen.constrained, validation=gen.validation,
                    grammar_dead_end=gen.grammar_dead_end, repaired=gen.repaired,
                    logprob={"mean": sum(lps) / len(lps) if lps else None,
                             "min": min(lps) if lps else None})
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{log_id if log_id is not None else 'unlogged'}",
        "object": "chat.completion", "created": int(time.time()), "model": answered_by,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": usage[0] + usage[1]},
        "outpost": {**ours, "answered_by": answered_by, "log_id": log_id, "log_failed": log_id is None},
    }
