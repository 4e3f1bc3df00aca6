"""Who answers one request: the local model, the cloud, or the local model marked degraded.

    Turn (what to ask, under which policy)  ->  Escalator.run(turn, local)  ->  Outcome

The flow, by policy:

    off                 local; its error is the agent's error
    on_low_confidence   local, scored; below the threshold, the cloud; if the local
                        model cannot answer at all, the cloud too
    shadow              local (the cloud is asked after the reply: `Outcome.shadow`);
                        if the local model cannot answer at all, the cloud now
    cloud_only          the cloud; the local model only when the cloud fails

A cloud failure is never the agent's error: the local answer goes out and the
outcome says why it is degraded. The local attempt is a callable the caller supplies
(the daemon leases a worker; a test scripts one), so this module knows nothing of
pools, sockets or the log; it returns data that the daemon turns into log records
(attempts.py) and a reply (daemon/replies.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from outpost.manifests.errors import OutpostError
from outpost.models.backend import Generation

from . import confidence
from .cloud import CloudAnswer, CloudClient
from .errors import CloudError
from .settings import ConfidenceSettings, Policy

log = logging.getLogger("outpost.escalation")

LocalAttempt = Callable[[], Awaitable[Generation]]  # raises OutpostError when it cannot answer


@dataclass(frozen=True)
class Turn:
    """One request as the escalation flow sees it: what the cloud would be asked."""

    model: str  # the local model it was routed to
    policy: Policy
    threshold: float
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str  # auto | none | required | a function name: what confidence checks
    cloud_tool_choice: str | dict[str, Any] | None  # as the agent sent it (None: not sent)
    parallel_tool_calls: bool
    max_tokens: int

    @property
    def auto(self) -> bool:
        """Tools offered and the model left to decide whether to call them."""
        return bool(self.tools) and self.tool_choice == "auto"


@dataclass(frozen=True)
class Outcome:
    """What happened: at most one answer went out, and every try is kept for the log."""

    policy: Policy
    generation: Generation | None = None  # the local answer, if the model gave one
    local_error: OutpostError | None = None  # why it gave none, if it was asked
    confidence: float | None = None
    confidence_parts: dict[str, Any] | None = None
    cloud: CloudAnswer | None = None  # the cloud's answer: it is the reply
    cloud_error: CloudError | None = None  # the cloud was asked and failed
    shadow: bool = False  # ask the cloud after replying, for the log only

    @property
    def answered(self) -> bool:
        return self.cloud is not None or self.generation is not None

    @property
    def asked_cloud(self) -> bool:
        return self.cloud is not None or self.cloud_error is not None

    @property
    def degraded_reason(self) -> str | None:
        """Why the cloud's answer was wanted and not had (`cloud_error.reason`)."""
        return self.cloud_error.reason if self.cloud is None and self.cloud_error is not None else None


class Escalator:
    """Runs the flow above for each request; one per daemon (it holds the cloud client)."""

    def __init__(self, cloud: CloudClient, weights: ConfidenceSettings) -> None:
        self.cloud = cloud
        self.weights = weights

    async def run(self, turn: Turn, local: LocalAttempt) -> Outcome:
        policy = turn.policy
        cloud_error: CloudError | None = None
        if policy is Policy.CLOUD_ONLY:
            answer, cloud_error = await self.ask(turn)
            if answer is not None:
                return Outcome(policy, cloud=answer)
        try:
            gen = await local()
        except OutpostError as exc:
            # The local model could not answer at all: a policy that may ask the cloud does.
            if cloud_error is None and policy in (Policy.ON_LOW_CONFIDENCE, Policy.SHADOW) \
                    and self.cloud.configured:
                answer, cloud_error = await self.ask(turn)
                if answer is not None:
                    return Outcome(policy, local_error=exc, cloud=answer)
            return Outcome(policy, local_error=exc, cloud_error=cloud_error)
        score, parts = confidence.score(gen, turn.tool_choice, self.weights)
        scored = Outcome(policy, generation=gen, confidence=score, confidence_parts=parts,
                         cloud_error=cloud_error, shadow=policy is Policy.SHADOW)
        if policy is Policy.ON_LOW_CONFIDENCE and score < turn.threshold:
            answer, cloud_error = await self.ask(turn)
            if answer is None:
                log.info("escalation of a %s answer (confidence %.2f) failed: %s", turn.model, score,
                         cloud_error.message if cloud_error else "")
            return Outcome(policy, generation=gen, confidence=score, confidence_parts=parts,
                           cloud=answer, cloud_error=cloud_error)
        return scored

    async def ask(self, turn: Turn) -> tuple[CloudAnswer | None, CloudError | None]:
        """(answer, None) or (None, why not): a cloud failure is never the agent's error."""
        try:
            answer = await self.cloud.ask(turn.messages, turn.tools, turn.cloud_tool_choice,
                                          turn.parallel_tool_calls if turn.tools else None,
                                          turn.max_tokens)
        except CloudError as exc:
            return None, exc
        return answer, None
