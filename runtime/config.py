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

from pydantic import BaseModel, ConfigDict, Field, ValidationError
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


class LlamaSettings(_Section):
    n_threads: Annotated[int, Field(gt=0)] | None = None  # None: physical cores
    n_batch: Annotated[int, Field(gt=0)] = 512
    # "auto": offload every layer when llama.cpp was built with a GPU backend, else 0.
    n_gpu_layers: int | Literal["auto"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTPOST_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    endpoint: str = Field(default_factory=default_endpoint)
    default_model: str = "smollm2-135m-instruct"
    # Extra folders of manifest TOML files, on top of the shipped catalog.
    manifest_dirs: list[Path] = []
    # Models to load when the daemon starts, so the first call does not wait.
    preload: list[str] = []
    server: ServerSettings = ServerSettings()
    llama: LlamaSettings = LlamaSettings()

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
