"""Settings precedence: flags over environment over the TOML file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from outpost.runtime.errors import ConfigError
from outpost.runtime.config import Settings


def test_defaults_suit_a_laptop(monkeypatch):
    for var in ("OUTPOST_CONFIG", "OUTPOST_DATA_DIR", "OUTPOST_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    s = Settings.load(None)
    assert s.endpoint.startswith("ipc://") and s.default_model == "smollm2-135m-instruct"
    assert s.log_path == s.data_dir / "logs.db"


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "outpost.toml"
    cfg.write_text('data_dir = "/from/file"\ndefault_model = "gemma-3-270m"\n'
                   '[server]\nmax_request_bytes = 1000\n')
    monkeypatch.setenv("OUTPOST_CONFIG", str(cfg))
    monkeypatch.setenv("OUTPOST_DATA_DIR", "/from/env")
    monkeypatch.setenv("OUTPOST_SERVER__LOAD_TIMEOUT_S", "7")
    s = Settings.load(None)
    assert s.data_dir == Path("/from/env") and s.default_model == "gemma-3-270m"
    assert s.server.max_request_bytes == 1000 and s.server.load_timeout_s == 7
    assert Settings.load(None, data_dir=Path("/from/flag")).data_dir == Path("/from/flag")


def test_bad_config_is_a_config_error(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nmax_request_bytes = -1\n")
    with pytest.raises(ConfigError):
        Settings.load(cfg)
    with pytest.raises(ConfigError):
        Settings.load(tmp_path / "missing.toml")
    cfg.write_text("typo_setting = 1\n")
    with pytest.raises(ConfigError):
        Settings.load(cfg)
