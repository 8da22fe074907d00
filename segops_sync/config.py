"""Typed settings, read from the ``SEGOPS_*`` environment variables (see docs/contract.md#configuration)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A required setting is missing or malformed; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGOPS_", extra="ignore")

    database_url: str | None = None
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    klaviyo_base_url: str = "https://a.klaviyo.com"
    secret_key: str | None = None
    api_token: str | None = None

    # Operational knobs beyond the contract; defaults suit production.
    # Redis used by the fleet-wide limiter, locks and worker heartbeats; defaults to the
    # broker's Redis, or the result backend's when the broker is not Redis (RabbitMQ).
    limiter_redis_url: str | None = None
    # Prefix for every Redis key we and Celery write: lets environments share one Redis.
    redis_key_prefix: str = ""
    # Share of Klaviyo's per-minute (steady) limits we use; the rest is the account's other
    # integrations'. The 1 s burst is used whole, over a window stretched by the guard, which
    # absorbs arrival jitter up to that share of a second (sync/limiter.py, "Margins").
    limiter_headroom: float = Field(default=0.9, gt=0, le=1)
    limiter_burst_guard: float = Field(default=0.05, ge=0, le=1)
    # Compresses Klaviyo's rate windows; only for the simulator in tests and benchmarks.
    klaviyo_time_scale: float = Field(default=1.0, gt=0)
    # Seconds between polls of an account's unfinished bulk import jobs (one request answers for
    # 100 jobs): 1 s is 60 of the list endpoint's 150/min, the watcher's stated 40 % share
    # (and one early poll at the newest job's expected end, never above 60 %: sync/watcher.py).
    job_poll_interval: float = Field(default=1.0, gt=0)
    # Runs with at most this many adds send them synchronously (profile-import + list write)
    # instead of in a bulk job; unset = from Klaviyo's limits (sync/costs.py), 0 = never.
    direct_add_limit: int | None = Field(default=None, ge=0)
    # How long removals wait for Klaviyo to index a profile before the run gives up on them
    # (they stay in the ledger, so the next sync retries them).
    indexing_wait: float = Field(default=900.0, ge=0)
    # Base of the exponential backoff for transient failures (seconds).
    retry_base_delay: float = Field(default=1.0, gt=0)
    # A member not found in Klaviyo this long after we added it is taken as deleted there.
    profile_gone_after: float = Field(default=86400.0, ge=0)
    # Redis re-delivers an unacknowledged task after this long; keep it above any countdown.
    visibility_timeout: int = Field(default=3600, ge=5)
    # How often the beat sweeper looks for stuck runs, and how long a run may go without progress.
    sweep_interval: float = Field(default=60.0, gt=0)
    stuck_after: float = Field(default=900.0, gt=0)
    # Transient failures (5xx, transport) a batch tolerates before the run fails.
    transient_retry_budget: int = Field(default=8, ge=0)
    # A worker node's heartbeat in Redis lives this long (refreshed every third of it); its work
    # is re-sent by the other workers once it expired. How often each node looks for such work.
    heartbeat_ttl: float = Field(default=10.0, ge=3)
    liveness_scan_interval: float = Field(default=5.0, gt=0)
    # Deliveries of one batch that killed their worker process (OOM, segfault) before the batch
    # is failed: a poison pill must not loop forever.
    worker_lost_budget: int = Field(default=5, ge=1)
    # Share of the list a single sync may remove before it is held for approval.
    mass_removal_threshold: float = Field(default=0.5, gt=0, le=1)
    # How often the beat reads every active connector's list back and repairs what is missing
    # (seconds). Reading 1M members is 10,000 pages at the L tier (750/min, 90% headroom): about
    # 15 minutes, so every 6 hours spends about 4% of that endpoint's budget. See README.
    verify_interval: float = Field(default=21600.0, gt=0)
    # Celery's per-worker ceiling on Klaviyo batch tasks (the fleet-wide limit is the limiter).
    klaviyo_task_rate_limit: str = "20/s"

    # Observability (INTERFACE.md, second round).
    # Each worker node serves Prometheus metrics on this port at /metrics; unset: off.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Address the metrics server binds; scrape it on an internal network only.
    metrics_host: str = "0.0.0.0"
    log_format: Literal["text", "json"] = "text"
    alert_webhook_url: str | None = None
    # SecretStr: repr() and Flower's config dump show a mask, never the secret.
    alert_webhook_secret: SecretStr | None = None
    # Seconds between progress lines of `connectors resync --wait` off a terminal.
    progress_interval: float = Field(default=5.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("must be a SQLAlchemy URL such as postgresql+psycopg://user@host/db")
        return value

    @field_validator("broker_url", "result_backend", "klaviyo_base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a URL")
        return value.rstrip("/") if value.startswith("http") else value

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value or None

    def require_alert_settings(self) -> None:
        """The secret is required with the URL: an unsigned alert could not be trusted."""
        if self.alert_webhook_url and not (
            self.alert_webhook_secret and self.alert_webhook_secret.get_secret_value()
        ):
            raise ConfigError(
                "SEGOPS_ALERT_WEBHOOK_SECRET is not set (it is required with "
                "SEGOPS_ALERT_WEBHOOK_URL: it signs each alert)"
            )

    @property
    def alerts_enabled(self) -> bool:
        return bool(self.alert_webhook_url and self.alert_webhook_secret)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "SEGOPS_DATABASE_URL is not set (e.g. postgresql+psycopg://user@127.0.0.1:5432/segops)"
            )
        return normalise_database_url(self.database_url)

    def require_secret_key(self) -> str:
        if not self.secret_key:
            raise ConfigError("SEGOPS_SECRET_KEY is not set (it encrypts stored Klaviyo API keys)")
        return self.secret_key

    def require_api_token(self) -> str:
        if not self.api_token:
            raise ConfigError("SEGOPS_API_TOKEN is not set (the HTTP API requires a bearer token)")
        return self.api_token

    @property
    def limiter_url(self) -> str:
        """The Redis the limiter, the locks and the heartbeats use."""
        if self.limiter_redis_url:
            return self.limiter_redis_url
        if is_redis_url(self.broker_url):
            return self.broker_url
        return self.result_backend

    @property
    def broker_is_redis(self) -> bool:
        return is_redis_url(self.broker_url)

    def require_limiter_url(self) -> str:
        url = self.limiter_url
        if not is_redis_url(url):
            need = "(the rate limiter, locks and worker heartbeats live in Redis)"
            if self.limiter_redis_url:
                scheme = url.split("://", 1)[0]
                raise ConfigError(
                    f"SEGOPS_LIMITER_REDIS_URL must be a redis:// or rediss:// URL {need}, "
                    f"not {scheme}://"
                )
            raise ConfigError(
                "SEGOPS_LIMITER_REDIS_URL is not set and neither SEGOPS_BROKER_URL nor "
                f"SEGOPS_RESULT_BACKEND is Redis: set it to a redis:// or rediss:// URL {need}"
            )
        return url


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def normalise_database_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs too, and use psycopg 3 for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "SEGOPS_" + str(err["loc"][0]).upper() if err.get("loc") else "a SEGOPS_ setting"
        raise ConfigError(f"{name} is malformed: {err['msg']}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
