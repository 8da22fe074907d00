from __future__ import annotations

import pytest

from segops_sync.config import ConfigError, Settings, load_settings, normalise_database_url


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SEGOPS_BROKER_URL", "SEGOPS_RESULT_BACKEND", "SEGOPS_KLAVIYO_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.result_backend == "redis://127.0.0.1:6379/1"
    assert settings.klaviyo_base_url == "https://a.klaviyo.com"


def test_missing_database_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGOPS_DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="SEGOPS_DATABASE_URL"):
        Settings().require_database_url()


def test_malformed_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGOPS_BROKER_URL", "not a url")
    with pytest.raises(ConfigError, match="SEGOPS_BROKER_URL"):
        load_settings()


def test_plain_postgres_urls_use_psycopg3() -> None:
    assert normalise_database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
