"""Settings of the escalation layer: the policy, the confidence score's weights, the cloud.

Sections of the one Settings model (runtime/config.py composes them); they are
plain frozen data, loaded once in `main()` and passed down.

What this module must not do: load anything; runtime/config.py loads them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

class Policy(StrEnum):
    """Who answers, from the policy that exposes least to the cloud to those exposing all."""

    OFF = "off"  # never ask the cloud
    ON_LOW_CONFIDENCE = "on_low_confidence"  # ask when the local answer scores below the threshold
    SHADOW = "shadow"  # answer locally, and also ask the cloud (both logged: teacher data)
    CLOUD_ONLY = "cloud_only"  # the cloud answers; the local model only when it fails

    @property
    def exposure(self) -> int:
        """How much of the traffic may reach the cloud: a request may lower it, never raise it."""
        return {"off": 0, "on_low_confidence": 1, "shadow": 2, "cloud_only": 2}[self.value]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfidenceSettings(_Section):
    """Weights of the confidence score (escalation/confidence.py has the formula)."""

    mean_weight: Annotated[float, Field(ge=0)] = 0.5
    min_weight: Annotated[float, Field(ge=0)] = 0.5
    min_temperature: Annotated[float, Field(gt=0)] = 2.0
    invalid_factor: Annotated[float, Field(ge=0, le=1)] = 0.0
    dead_end_factor: Annotated[float, Field(ge=0, le=1)] = 0.2
    repaired_factor: Annotated[float, Field(ge=0, le=1)] = 0.3
    truncated_factor: Annotated[float, Field(ge=0, le=1)] = 0.3
    no_call_factor: Annotated[float, Field(ge=0, le=1)] = 0.0

    @model_validator(mode="after")
    def _some_weight(self) -> ConfidenceSettings:
        if self.mean_weight + self.min_weight <= 0:
            raise ValueError("mean_weight + min_weight must be > 0")
        return self


class TaskEscalation(_Section):
    policy: Policy | None = None
    threshold: Annotated[float, Field(ge=0, le=1)] | None = None


class EscalationSettings(_Section):
    """When a local answer goes to the cloud; [escalation.tasks.<task>] overrides."""

    policy: Policy = Policy.OFF
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    tasks: dict[str, TaskEscalation] = {}


class CloudSettings(_Section):
    """An OpenAI-compatible /v1/chat/completions endpoint."""

    base_url: str | None = None  # e.g. "https://api.openai.com/v1"; None: no cloud
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"  # the variable's *name*; the key is never logged
    timeout_s: Annotated[float, Field(gt=0)] = 20.0  # per request, retries included
    max_retries: Annotated[int, Field(ge=0)] = 3
    backoff_s: Annotated[float, Field(gt=0)] = 0.5  # first retry's delay, doubled, jittered
    max_backoff_s: Annotated[float, Field(gt=0)] = 8.0
    breaker_failures: Annotated[int, Field(ge=1)] = 5  # failures in a row that open the breaker
    breaker_cooldown_s: Annotated[float, Field(gt=0)] = 60.0
    daily_max_requests: Annotated[int, Field(ge=0)] | None = 1000
    daily_max_tokens: Annotated[int, Field(ge=0)] | None = 1_000_000
    price_in_per_1k: Annotated[float, Field(ge=0)] = 0.00015  # USD, for cost estimates
    price_out_per_1k: Annotated[float, Field(ge=0)] = 0.0006
    max_tokens: Annotated[int, Field(gt=0)] = 1024
