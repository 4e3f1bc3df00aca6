"""Settings: one pydantic-settings model, loaded once in `main()` and passed down.

Precedence, highest first: command-line flags, `OUTPOST_*` environment variables
(nested with `__`, e.g. `OUTPOST_SERVER__MAX_REQUEST_BYTES`), the TOML file named by
`--config` / `OUTPOST_CONFIG`, then the defaults below, which suit a laptop.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from outpost.manifests.errors import ConfigError


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "outpost"


def default_endpoint() -> str:
    # The user's runtime dir is private (0700) and cleared at logout: the right home
    # for a socket. Without one, a per-user folder under the temp dir.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "outpost" if runtime else Path(tempfile.gettempdir()) / f"outpost-{os.getuid()}"
    return f"ipc://{base / 'outpost.sock'}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    # A frame larger than this is refused unread (request_too_large).
    max_request_bytes: Annotated[int, Field(gt=0)] = 1 << 20
    # How long a worker may take to start and load its model.
    load_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # How long one generation may take before the worker is declared stuck.
    request_timeout_s: Annotated[float, Field(gt=0)] = 300.0


class BudgetSettings(_Section):
    """How much of the machine Outpost may use: the daemon, the forkserver and every worker."""

    # None: `ram_share` of the memory available when the daemon starts.
    ram: ByteSize | None = None
    ram_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # Per GPU; None: `vram_share` of each GPU's free memory at start.
    vram: ByteSize | None = None
    vram_share: Annotated[float, Field(gt=0, le=1)] = 0.8
    # Kept free under the budget for the daemon's own growth and measurement lag.
    margin: ByteSize = ByteSize(32 << 20)


class PoolSettings(_Section):
    # Requests waiting for one model beyond this get `overloaded` at once.
    max_queue: Annotated[int, Field(ge=1)] = 32
    # A request that waited this long for its model (load + queue) gets `timeout`.
    queue_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # Unload a model idle this long (None: never); per model in [models.<id>].
    idle_ttl_s: Annotated[float, Field(gt=0)] | None = 900.0


class ModelPolicy(_Section):
    pin: bool = False  # never evicted, never unloaded for idleness
    idle_ttl_s: Annotated[float, Field(gt=0)] | None = None  # overrides [pool] idle_ttl_s
    # Escalate this model's answers below this confidence (overrides [escalation]).
    escalation_threshold: Annotated[float, Field(ge=0, le=1)] | None = None


class LlamaSettings(_Section):
    # None: half the physical cores (at least 1), so two models can decode at once
    # without llama.cpp's spinning threads fighting over the cores.
    n_threads: Annotated[int, Field(gt=0)] | None = None
    n_batch: Annotated[int, Field(gt=0)] = 512
    # "auto": offload every layer when llama.cpp was built with a GPU backend, else 0.
    n_gpu_layers: int | Literal["auto"] = "auto"


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


class ConfidenceSettings(_Section):
    """Weights of the confidence score (runtime/confidence.py has the formula)."""

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


Policy = Literal["off", "on_low_confidence", "shadow", "cloud_only"]


class TaskEscalation(_Section):
    policy: Policy | None = None
    threshold: Annotated[float, Field(ge=0, le=1)] | None = None


class EscalationSettings(_Section):
    """When a local answer goes to the cloud; [escalation.tasks.<task>] overrides."""

    policy: Policy = "off"
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTPOST_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    endpoint: str = Field(default_factory=default_endpoint)
    default_model: str = "smollm2-135m-instruct"
    # Extra folders of manifest TOML files, on top of the shipped catalog.
    manifest_dirs: list[Path] = []
    # Models to load when the daemon starts, so the first call does not wait.
    # None: the default model, if it is pulled; []: nothing.
    preload: list[str] | None = None
    server: ServerSettings = ServerSettings()
    budget: BudgetSettings = BudgetSettings()
    pool: PoolSettings = PoolSettings()
    llama: LlamaSettings = LlamaSettings()
    logs: LogSettings = LogSettings()
    export: ExportSettings = ExportSettings()
    costs: CostSettings = CostSettings()
    confidence: ConfidenceSettings = ConfidenceSettings()
    escalation: EscalationSettings = EscalationSettings()
    cloud: CloudSettings = CloudSettings()
    # Per-model policy, by manifest id: [models."smollm2-135m-instruct"] pin = true
    models: dict[str, ModelPolicy] = {}

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs.db"

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Read settings once; `overrides` are command-line values (None = not given)."""
        config_file = config_file or (Path(p) if (p := os.environ.get("OUTPOST_CONFIG")) else None)
        if config_file is not None and not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist", path=str(config_file))
        given = {k: v for k, v in overrides.items() if v is not None}

        class _WithFile(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                           init_settings: PydanticBaseSettingsSource,
                                           env_settings: PydanticBaseSettingsSource,
                                           dotenv_settings: PydanticBaseSettingsSource,
                                           file_secret_settings: PydanticBaseSettingsSource,
                                           ) -> tuple[PydanticBaseSettingsSource, ...]:
                sources = [init_settings, env_settings]
                if config_file is not None:
                    sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
                return tuple(sources)

        try:
            loaded = _WithFile(**given)
        except (ValidationError, ValueError) as exc:
            raise ConfigError(f"invalid configuration: {exc}",
                              path=str(config_file) if config_file else None) from exc
        return Settings.model_validate(loaded.model_dump())
