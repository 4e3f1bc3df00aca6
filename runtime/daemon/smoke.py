"""An activation's smoke test: what a staged version is asked, and whether its answer
passes (`models.activate` promotes a version only then).

What this module must not do: load models or change what is active (server.py, pool.py).
"""

from __future__ import annotations

from outpost.manifests.schema import Manifest
from outpost.models.backend import Generation, GenerationRequest


def request(manifest: Manifest) -> GenerationRequest:
    smoke = manifest.smoke_test
    return GenerationRequest(messages=smoke.messages, tools=smoke.tools or None,
                             tool_choice=smoke.tool_choice if smoke.tools else "auto",
                             max_tokens=smoke.max_tokens)


def problem(generation: Generation) -> str | None:
    """Why a smoke test's answer is not valid, or None when it is."""
    if generation.grammar_dead_end:
        return "the grammar left no token to choose"
    invalid = [v for v in generation.validation if not v.get("valid")]
    if invalid:
        return f"invalid call {invalid[0].get('name')}: {invalid[0].get('errors')}"
    if not generation.tool_calls and not (generation.content or "").strip():
        return "an empty answer"
    return None
