"""An activation's smoke test: what a staged version is asked, and whether its answer
passes (`models.activate` promotes a version only then).

What this module must not do: load models or change what is active (server.py, pool.py).
"""

from __future__ import annotations

from dataclasses import replace

from outpost.manifests.schema import SMOKE_TOOL, Manifest
from outpost.models.backend import Generation, GenerationRequest


def requests(manifest: Manifest) -> list[GenerationRequest]:
    """The smoke test; and, for a version with its own rule for tool_choice auto
    (`[decision]`), the same turn under auto with tools (the smoke test's, else
    SMOKE_TOOL): the rule must read this model's evidence and the side it picks must
    decode without fault (either side passes: the smoke test is not a measurement)."""
    smoke = manifest.smoke_test
    first = GenerationRequest(messages=smoke.messages, tools=smoke.tools or None,
                              tool_choice=smoke.tool_choice if smoke.tools else "auto",
                              max_tokens=smoke.max_tokens)
    if manifest.decision is None or first.tool_choice == "auto" and first.tools:
        return [first]
    return [first, replace(first, tools=smoke.tools or [SMOKE_TOOL], tool_choice="auto")]


def problem(generation: Generation, empty_ok: bool = False) -> str | None:
    """Why a smoke test's answer is not valid, or None when it is (`empty_ok`: an empty
    text answer passes, as the auto turn's may: the turn checks the rule, not the prose)."""
    if generation.grammar_dead_end:
        return "the grammar left no token to choose"
    invalid = [v for v in generation.validation if not v.get("valid")]
    if invalid:
        return f"invalid call {invalid[0].get('name')}: {invalid[0].get('errors')}"
    if not generation.tool_calls and not (generation.content or "").strip() and not empty_ok:
        return "an empty answer"
    return None
