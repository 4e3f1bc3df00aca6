"""Settings: one pydantic-settings model, loaded once in `main()` and passed down.

Precedence, highest first: command-line flags, `OUTPOST_*` environment variables
(nested with `__`, e.g. `OUTPOST_SERVER__MAX_REQUEST_BYTES`), the TOML file named by
`--config` / `OUTPOST_CONFIG`, then the defaults, which suit a laptop.

Each layer owns its sections (daemon/settings.py, escalation/settings.py,
logs/settings.py); this module composes them and does the loading. `Settings` is a
`DaemonSettings`, so the daemon core takes it without importing the front door.

What this module must not do: be imported by the daemon core, escalation or the
log (they take their own sections, or a `DaemonSettings`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from outpost.manifests.errors import ConfigError

from . import curve as curve_keys
from .curve import ClientKeys
from .daemon.settings import (BudgetSettings, DaemonSettings, LlamaSettings, ModelPolicy,
                              PoolSettings, ServerSettings, default_data_dir, default_endpoint)
from .escalation.settings import (CloudSettings, ConfidenceSettings, EscalationSettings, Policy,
                                  TaskEscalation)
from .logs.settings import CostSettings, ExportSettings, LogSettings

__all__ = ["Settings", "BudgetSettings", "CloudSettings", "ConfidenceSettings", "CostSettings",
           "DaemonSettings", "EscalationSettings", "ExportSettings", "LlamaSettings",
           "LogSettings", "ModelPolicy", "Policy", "PoolSettings", "ServerSettings", "SyncSettings",
           "TaskEscalation", "default_data_dir", "default_endpoint"]


class SyncSettings(BaseModel):
    """Field sync (`outpost sync …`, the `fleet` extra): where this device's fleet hub is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The fleet's hub: file:///path (a folder, NFS, a USB stick), s3://bucket/prefix (any
    # S3-compatible store; credentials from boto3's usual places, anonymous without), or
    # https://host/path (a static mirror: models only).
    hub: str | None = None
    # Where `sync push` sends the log, when not the hub (models from an HTTPS mirror or a
    # CDN, logs to an S3 bucket).
    push_hub: str | None = None
    channel: str = "stable"  # the fleet's rollout channel this device follows
    # This device's name in the hub's log folder (default: the host name).
    device_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # Bytes a second a model transfer may use (None: as fast as the link goes).
    max_rate: Annotated[float, Field(gt=0)] | None = None
    # A transfer that receives nothing this long is cut and resumed.
    stall_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # Every operation with the hub (a read, a write, a listing) ends within this many
    # seconds plus its bytes at `min_rate`, whatever the link or the hub does; one that
    # does not is ended with `sync_failed`, and the next run resumes or retries it.
    deadline_s: Annotated[float, Field(gt=0)] = 300.0
    # Bytes a second each transfer is allowed time for, besides deadline_s (capped by
    # max_rate). Low on purpose: the deadline ends hangs, it does not grade links (a 2G
    # modem, a satellite one).
    min_rate: Annotated[float, Field(gt=0)] = 8 * 1024
    # An S3-compatible store's endpoint (MinIO, SeaweedFS, R2); None: AWS, or AWS_ENDPOINT_URL.
    s3_endpoint: str | None = None
    # A CA bundle for an HTTPS mirror with its own certificate authority.
    ca_bundle: Path | None = None
    # Log rows per pushed batch: a dropped link costs at most one batch.
    push_batch_rows: Annotated[int, Field(ge=1, le=100_000)] = 500
    # Requests younger than this wait for a later push, so the feedback and shadow cloud
    # answers that follow a reply go up with their request.
    push_delay_s: Annotated[float, Field(ge=0)] = 300.0
    # `outpost serve` pulls and pushes this often (jittered; backs off after failures).
    # None: never on its own (run `outpost sync pull|push` from cron or by hand).
    interval_s: Annotated[float, Field(ge=1)] | None = None
    # A scheduled `sync pull` or `sync push` still running after this long is killed
    # (its own process id), reported in `status`, and retried at the next interval.
    run_timeout_s: Annotated[float, Field(gt=0)] = 3600.0


class Settings(BaseSettings, DaemonSettings):
    model_config = SettingsConfigDict(env_prefix="OUTPOST_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    # Read by the CLI only (`outpost logs export`, `outpost logs stats`).
    export: ExportSettings = ExportSettings()
    costs: CostSettings = CostSettings()
    # Read by `outpost sync` (the sync layer imports this module, never the reverse).
    sync: SyncSettings = SyncSettings()

    @property
    def trust_dir(self) -> Path:
        """The device's TUF state: the fleet's root.json and the metadata it verified."""
        return self.data_dir / "sync"

    def client_keys(self) -> ClientKeys | None:
        """The CURVE keys a client of `endpoint` needs: None on ipc and loopback."""
        return curve_keys.client_keys(self.endpoint, self.keys_dir, self.curve.server_key)

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
