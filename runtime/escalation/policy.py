"""Which policy a request runs under, and the threshold it is judged by.

Policies, from the one that exposes least to the cloud to the ones that expose all:

    off                 never ask the cloud
    on_low_confidence   ask when the local answer's confidence is below the threshold
    shadow              answer locally, and also ask the cloud (both logged: teacher data)
    cloud_only          the cloud answers; the local model only when the cloud fails

Config sets the policy and threshold ([escalation]); a manifest may set its model's
threshold (`escalation_threshold`), which config can override per model
([models.<id>] escalation_threshold); per task ([escalation.tasks.<task>]) wins
over both. A request may narrow its policy with `escalation` (e.g.
"off" for private data) but never widen it: a request asking for more exposure
than config allows is refused with `bad_request`.

What this module must not do: call the cloud or score an answer (cloud.py,
confidence.py); it only reads settings and the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from outpost.manifests.errors import BadRequest

from outpost.manifests.schema import Manifest

from .settings import EscalationSettings, Policy


class EscalationConfig(Protocol):
    """The part of the settings that decides a request's policy (Settings has it)."""

    @property
    def escalation(self) -> EscalationSettings: ...

    @property
    def models(self) -> Mapping[str, Any]: ...  # id -> ModelPolicy (escalation_threshold)


def resolve(settings: EscalationConfig, manifest: Manifest, task: str | None,
            requested: str | None) -> tuple[Policy, float]:
    """(policy, threshold) for one request."""
    esc = settings.escalation
    policy, threshold = esc.policy, esc.threshold
    if manifest.escalation_threshold is not None:
        threshold = manifest.escalation_threshold
    model_policy = settings.models.get(manifest.id)
    if model_policy is not None and model_policy.escalation_threshold is not None:
        threshold = model_policy.escalation_threshold
    per_task = esc.tasks.get(task or "") or next(
        (esc.tasks[t] for t in manifest.tasks if t in esc.tasks), None)
    if per_task is not None:
        policy = per_task.policy or policy
        threshold = per_task.threshold if per_task.threshold is not None else threshold
    policy = Policy(policy)
    if requested is not None and requested != policy:
        requested = Policy(requested)
        if requested.exposure > policy.exposure:
            raise BadRequest(f"escalation {requested.value!r} would send more to the cloud than the "
                             f"configured policy {policy.value!r} allows", field="escalation",
                             configured=policy.value)
        policy = requested
    return policy, threshold
