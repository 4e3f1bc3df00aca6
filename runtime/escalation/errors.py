"""Why the cloud gave no usable answer. None of these reaches an agent: the reply
carries the local answer, `degraded`, and the error's `reason`. The whole tree is
documented in `outpost/runtime/errors.py`.

What this module must not do: import anything above `outpost.manifests.errors`.
"""

from __future__ import annotations

from typing import Any

from outpost.manifests.errors import OutpostError


class CloudError(OutpostError):
    """The cloud gave no usable answer. Never sent to an agent: the reply carries the
    local answer with `degraded` and this error's `reason`."""

    code = "cloud_failed"
    reason = "failed"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message, reason=self.reason, **data)


class CloudUnconfigured(CloudError):
    code, reason = "cloud_not_configured", "not_configured"


class CloudUnreachable(CloudError):
    code, reason = "cloud_unreachable", "unreachable"


class CloudTimeout(CloudError):
    code, reason = "cloud_timeout", "timeout"


class CloudRejected(CloudError):
    """A 4xx that another try would not fix."""

    code, reason = "cloud_rejected", "rejected"


class CloudOverBudget(CloudError):
    code, reason = "cloud_over_daily_cap", "over_daily_cap"


class CloudCircuitOpen(CloudError):
    code, reason = "cloud_circuit_open", "circuit_open"


class CloudInvalid(CloudError):
    """Malformed, truncated, empty, or a tool call that fails its schema."""

    code, reason = "cloud_invalid_answer", "invalid_answer"


class CloudInvalidCall(CloudInvalid):
    """A well-formed completion whose tool call fails its schema: the endpoint is up
    and the model got this one request wrong, so the circuit breaker does not count it
    (the agent sees the same code and reason as any invalid answer)."""
