"""Outpost's replies in the shapes OpenAI's HTTP API uses: which request path is which
method, the HTTP status of each error code, error bodies, the model list, SSE frames.

Shared by every door that speaks OpenAI's HTTP (the SDK's transport over ZeroMQ,
sdk.py), so an agent sees the same statuses and bodies whichever it uses. The SDK
turns a status into its own exception type (404 NotFoundError, 400 BadRequestError,
429 RateLimitError, 5xx InternalServerError, ...); the error's `code` and `type` are
Outpost's code, and `outpost` carries its `data` fields.

What this module must not do: talk to a socket; it maps shapes.
"""

from __future__ import annotations

import json
import re
from typing import Any

# What each Outpost error code is in HTTP terms. A code not listed is a server fault (500).
STATUS: dict[str, int] = {
    "bad_request": 400, "invalid_schema": 400, "unsupported_schema": 400, "context_overflow": 400,
    "request_too_large": 413, "unknown_method": 404,
    "unknown_model": 404, "not_found": 404, "model_not_pulled": 404,
    "overloaded": 429,
    # The daemon gave up waiting (for a load, for memory, behind other requests): a
    # gateway timeout, which the SDK retries like any 5xx.
    "timeout": 504,
    "budget_exceeded": 503, "log_locked": 503, "log_disk_full": 507, "log_unavailable": 503,
    "worker_crashed": 502, "decode_failed": 502, "model_load_failed": 502, "adapter_load_failed": 502,
    "model_invalid": 502, "model_quarantined": 503,
    "checksum_mismatch": 502, "adapter_base_mismatch": 409, "activation_failed": 409,
    "internal": 500,
}
# Retrying cannot help these; the SDK honours `x-should-retry: false`.
NO_RETRY = {"checksum_mismatch", "model_invalid", "model_quarantined", "adapter_base_mismatch", "budget_exceeded", "log_disk_full"}

_MODEL_PATH = re.compile(r"(?:.*/)?models/(?P<id>[^/]+)")


def route(method: str, path: str) -> tuple[str, str | None] | None:
    """An HTTP request -> (what it is, a model id for `model`), or None if not served:
    `chat` (POST .../chat/completions), `models` (GET .../models), `model` (GET
    .../models/ID). The prefix (`/v1` or any other) is the agent's base URL's."""
    path = path.rstrip("/")
    if method == "POST" and path.endswith("/chat/completions"):
        return "chat", None
    if method == "GET" and path.endswith("/models"):
        return "models", None
    if method == "GET" and (match := _MODEL_PATH.fullmatch(path)):
        return "model", match["id"]
    return None


def status_for(code: str) -> int:
    return STATUS.get(code, 500)


def error_body(error: dict[str, Any]) -> dict[str, Any]:
    """An Outpost wire error as OpenAI's error body; `outpost` keeps every data field."""
    data = error.get("data") or {}
    return {"error": {"message": error.get("message", ""), "type": error.get("code", "internal"),
                      "code": error.get("code", "internal"), "param": data.get("field"),
                      "outpost": data}}


def error_headers(code: str) -> dict[str, str]:
    return {"x-should-retry": "false"} if code in NO_RETRY else {}


def model_object(row: dict[str, Any]) -> dict[str, Any]:
    """One row of `models.list` as an OpenAI model (the row's fields kept beside)."""
    return {"id": row["id"], "object": "model", "created": 0, "owned_by": "outpost", "outpost": row}


def model_page(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in models]}


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


SSE_DONE = b"data: [DONE]\n\n"


def sse_json(data: bytes) -> bytes:
    """`sse()` for a chunk that is JSON already (as the daemon wrote it)."""
    return b"data: " + data + b"\n\n"
