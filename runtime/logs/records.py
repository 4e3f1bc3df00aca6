"""The typed rows of the log: what the daemon hands the writer, field for column.

A record's fields are its table's columns (less those the writer fills in: the row
id, `created_at`, the link to its request and the tool-set hash), so a misspelt
field is a `TypeError` where the record is built, in the code and in its tests,
instead of an SQL error at write time that the daemon would turn into a silent
`log_failed` while the training data is lost. `tests/test_records.py` checks that
the fields and the migrated schema agree.

Values are Python data; the writer stores lists and dicts as JSON text.

What this module must not do: talk to SQLite (store.py does), or know who produced
a record (the daemon and the escalation flow build them).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar


class AttemptKind(StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"


class PoolEventKind(StrEnum):
    LOAD = "load"  # a model was loaded (for a request, or a preload)
    EVICT = "evict"  # unloaded to make room for another
    UNLOAD = "unload"  # unloaded after its idle TTL
    CRASH = "crash"  # its worker died; it will be reloaded on demand
    REPLACE = "replace"  # a new version became active; the old one drained and went
    TRIAL = "trial"  # a version's smoke test before activation (reason: passed or why not)
    ADAPTER = "adapter"  # a task adapter was charged to its base's worker, to be loaded
    QUARANTINE = "quarantine"  # failed to load too often in a row; not retried for a while


def _column(value: Any) -> Any:
    """A field's value as SQLite stores it: lists and dicts as JSON text."""
    kind = type(value)
    if value is None or kind is str or kind is int or kind is float:  # most columns
        return value
    if kind is dict or kind is list:
        return json.dumps(value, ensure_ascii=False)
    if kind is bool:
        return int(value)
    if isinstance(value, StrEnum):
        return value.value
    return value


@functools.cache
def _column_names(cls: type) -> tuple[str, ...]:
    # Once per record type: `fields()` rebuilds its tuple on every call, and a record
    # is written on every request's path.
    return tuple(f.name for f in fields(cls) if f.name not in cls.NOT_COLUMNS)


class _Row:
    NOT_COLUMNS: ClassVar[frozenset[str]] = frozenset()  # fields stored elsewhere

    def columns(self) -> dict[str, Any]:
        """column -> value, every column field, ready for an INSERT."""
        return {name: _column(getattr(self, name)) for name in _column_names(type(self))}


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptRecord(_Row):
    """One try at answering a request: the local model's, or the cloud's."""

    kind: AttemptKind
    model: str
    model_version: str
    output: str | None = None  # everything the model wrote
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI shape
    finish_reason: str | None = None
    constrained: bool | None = None
    grammar_dead_end: bool | None = None
    validation: list[dict[str, Any]] | None = None  # one report per call
    repaired: int | None = None
    prompt: str | None = None  # exactly as the model saw it
    grammar: str | None = None
    mean_logprob: float | None = None
    min_logprob: float | None = None
    confidence: float | None = None
    confidence_parts: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    batch_size: float | None = None  # sequences per forward pass it decoded in, on average
    cost_usd: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    # tool_choice auto: "call" or "answer" (the cloud's: whether it called), and for a
    # local attempt the rule's log-odds, its threshold, the confidence, whose rule.
    decision: str | None = None
    decision_score: float | None = None
    decision_threshold: float | None = None
    decision_confidence: float | None = None
    decision_rule: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestRecord(_Row):
    """What an agent asked, and the outcome it saw."""

    method: str
    model_requested: str | None
    model: str
    model_version: str
    task: str | None
    policy: str | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # stored once per set, in `tools`, by hash
    tool_choice: str | None
    params: dict[str, Any]
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    answered_by: str | None = None  # a local model id, or the cloud's model
    confidence: float | None = None
    degraded: str | None = None  # why the cloud's answer was wanted and not had
    error_code: str | None = None
    error_message: str | None = None
    timings: dict[str, float] | None = None  # ms: queue, load, prefill, decode, cloud, total
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    NOT_COLUMNS: ClassVar[frozenset[str]] = frozenset({"tools"})  # a table of their own, by hash


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolEvent(_Row):
    """A load, eviction, idle unload or crash, with its reason."""

    kind: PoolEventKind
    model: str
    version: str
    reason: str
    ram_bytes: int | None = None
    load_ms: float | None = None  # a load: until the worker was ready
    stop_ms: float | None = None  # an unload: until the worker was gone


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalRecord(_Row):
    """A model (or a task adapter on its base) scored on a task's held-out examples:
    a candidate at selection (S4), or one side of a promotion gate (S6)."""

    task: str
    purpose: str  # "select" | "gate"
    role: str  # "candidate" | "incumbent"
    model: str  # the id that answered: the adapter's, or the base's
    version: str
    base: str | None  # "<id> <version>" for an adapter
    examples: int
    accuracy: float
    validity: float
    p50_ms: float
    decode_tok_s: float
    data_sha256: str  # the held-out examples
    decision: str | None = None  # gate: "promoted" | "kept"; select: "chosen" | None
    p_value: float | None = None
    detail: dict[str, Any] | None = None  # the reason, wins and losses, memory, ...


@dataclass(frozen=True, kw_only=True)
class Footprint:
    """The measured memory of one model version: its next load's estimate."""

    model: str
    version: str
    ram_bytes: int
    vram_bytes: int = 0
    load_ms: float = 0.0
    n_layer: int | None = None
    n_slots: int = 1  # the sequences it was loaded for (each has a context's KV cache)
