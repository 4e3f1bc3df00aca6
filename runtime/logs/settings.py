"""Settings of the interaction log: locking and retention, export, prices for stats.

Sections of the one Settings model (runtime/config.py composes them).

What this module must not do: load anything; runtime/config.py loads them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ByteSize, ConfigDict, Field

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogSettings(_Section):
    """The interaction log (logs.db): how long to wait for a lock, how much to keep."""

    # A write that finds the database locked by another process waits this long,
    # then the request is answered with `log_failed` (a CLI read gets `log_locked`).
    busy_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # Retention caps. Pruning never removes a request that has not been exported or
    # synced yet (the watermark): with neither, the log only grows, with a warning.
    max_age_days: Annotated[float, Field(gt=0)] | None = 90.0
    max_size: ByteSize | None = ByteSize(1 << 30)
    prune_interval_s: Annotated[float, Field(gt=0)] = 3600.0


class ExportSettings(_Section):
    """`outpost logs export`: which answers become training targets, and redaction."""

    # A local answer without an agent's "good" is exported only at this confidence.
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.8
    # Share of examples written to the validation file (by a hash of the example).
    val_share: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Extra redaction patterns, name -> Python regex: employee_id = "EMP-\\d{6}"
    redact: dict[str, str] = {}


class CostSettings(_Section):
    """Prices, in USD per 1,000 tokens, for `outpost logs stats` cost per task."""

    local_per_1k_tokens: Annotated[float, Field(ge=0)] = 0.0
