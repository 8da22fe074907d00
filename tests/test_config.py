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


def test_limiter_uses_the_brokers_redis_else_the_result_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SEGOPS_LIMITER_REDIS_URL", raising=False)
    monkeypatch.setenv("SEGOPS_BROKER_URL", "redis://b:6379/0")
    monkeypatch.setenv("SEGOPS_RESULT_BACKEND", "redis://r:6379/1")
    assert Settings().limiter_url == "redis://b:6379/0"
    monkeypatch.setenv("SEGOPS_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    settings = Settings()
    assert settings.limiter_url == "redis://r:6379/1" == settings.require_limiter_url()
    assert not settings.broker_is_redis
    monkeypatch.setenv("SEGOPS_LIMITER_REDIS_URL", "rediss://l:6380/2")
    assert Settings().require_limiter_url() == "rediss://l:6380/2"


def test_a_limiter_url_that_is_not_redis_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEGOPS_LIMITER_REDIS_URL", "amqp://guest:secret@h//")
    with pytest.raises(ConfigError, match="SEGOPS_LIMITER_REDIS_URL") as err:
        Settings().require_limiter_url()
    assert "secret" not in str(err.value)
