"""Typed settings, read from the ``SEGOPS_*`` environment variables (see docs/contract.md#configuration)."""

from __future__ import annotations

import os
import ssl
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Share of Klaviyo's per-minute (steady) limits the limiter uses; the one spelling of the default
# (the setting below, sync/costs.py's floors and the limiter's own default read it).
DEFAULT_HEADROOM = 0.9


class ConfigError(Exception):
    """A required setting is missing or malformed; the message names the variable."""


# A secret still holding a template's example value (deploy/k8s/secret.yaml's REPLACE-ME, a
# tutorial's changeme, an unfilled <token>) stops the process at start: it would otherwise run
# with a credential anyone who read the template knows. Compared case-insensitively.
PLACEHOLDER_MARKS = ("replace-me", "replace_me", "replaceme", "changeme", "change-me", "change_me")
PLACEHOLDER_HINT = "a placeholder (REPLACE-ME, changeme, <...> or empty)"
# The bearer token is the API's only lock: long enough that guessing it is hopeless even
# without the sign-in throttle (`openssl rand -hex 24` gives 48 characters).
MIN_API_TOKEN_LENGTH = 32
# Settings holding a URL whose password must be a real one.
PASSWORD_URLS = ("database_url", "broker_url", "result_backend", "limiter_redis_url")


def is_placeholder(value: str) -> bool:
    text = value.strip().lower()
    return (
        not text
        or any(mark in text for mark in PLACEHOLDER_MARKS)
        or (text.startswith("<") and text.endswith(">"))
    )


def url_password(url: str) -> str | None:
    """The password of a URL (``scheme://user:password@host``), decoded; None without one."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def check_flower_basic_auth() -> None:
    """FLOWER_BASIC_AUTH (``user:password[,user2:password2]``), when set, names real users."""
    value = os.environ.get("FLOWER_BASIC_AUTH")
    if value is None:
        return
    for entry in value.split(","):
        user, _, password = entry.partition(":")
        if is_placeholder(user) or is_placeholder(password):
            raise ConfigError(
                f"FLOWER_BASIC_AUTH holds {PLACEHOLDER_HINT} user or password: set user:password"
            )


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
    # absorbs arrival jitter up to that share of a second (sync/fleet/limiter.py, "Margins").
    limiter_headroom: float = Field(default=DEFAULT_HEADROOM, gt=0, le=1)
    limiter_burst_guard: float = Field(default=0.05, ge=0, le=1)
    # Compresses Klaviyo's rate windows; only for the simulator in tests and benchmarks.
    klaviyo_time_scale: float = Field(default=1.0, gt=0)
    # Seconds between polls of an account's unfinished bulk import jobs (one request answers for
    # 100 jobs): 1 s is 60 of the list endpoint's 150/min, the watcher's stated 40 % share
    # (and one early poll at the newest job's expected end, never above 60 %: sync/fleet/watcher.py).
    job_poll_interval: float = Field(default=1.0, gt=0)
    # A bulk import job still queued or processing this long after Klaviyo created it is taken
    # as lost: its members are sent again in a new job (the batch never waits forever).
    job_give_up: float = Field(default=7200.0, gt=0)
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
    # is re-sent by the other workers once it expired. How often each node looks for such work,
    # and checks its Redis markers: a Redis that lost its data (restart without persistence,
    # failover to an empty replica) is noticed within this interval and every open run re-sent
    # at once (sync/fleet/liveness.py), so the loss costs seconds, well under two minutes.
    heartbeat_ttl: float = Field(default=10.0, ge=3)
    liveness_scan_interval: float = Field(default=5.0, gt=0)
    # Deliveries of one batch that killed their worker process (OOM, segfault) before the batch
    # is failed: a poison pill must not loop forever.
    worker_lost_budget: int = Field(default=5, ge=1)
    # Share of the list a single sync may remove before it is held for approval.
    mass_removal_threshold: float = Field(default=0.5, gt=0, le=1)
    # How often the beat reads every active connector's list back and repairs what is missing
    # (seconds). Reading 1M members is 10,000 pages at the L tier (750/min, 90% headroom): about
    # 15 minutes, so every 6 hours spends about 4% of that endpoint's budget. See docs/design.md.
    verify_interval: float = Field(default=21600.0, gt=0)
    # Celery's per-worker ceiling on Klaviyo batch tasks (the fleet-wide limit is the limiter).
    klaviyo_task_rate_limit: str = "20/s"

    # Observability (docs/contract.md: Configuration, Metrics, Alert webhooks).
    # Each worker node serves Prometheus metrics on this port at /metrics; unset: off.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Address the metrics server binds; scrape it on an internal network only.
    metrics_host: str = "0.0.0.0"
    log_format: Literal["text", "json"] = "text"
    alert_webhook_url: str | None = None
    # SecretStr: repr() and Flower's config dump show a mask, never the secret.
    alert_webhook_secret: SecretStr | None = None
    # sync.degraded (sync/alerts.py): a succeeded run that rejected more than this share of the
    # members it sent to join the list, or took more than slow_factor x its expected time.
    alert_rejected_share: float = Field(default=0.05, gt=0, le=1)
    alert_slow_factor: float = Field(default=3.0, gt=1)
    # Internal knob (not contract): a run is never "slow" under this many seconds, so a tiny
    # run whose expected time is ~0 does not alert for a second of network latency.
    alert_slow_min_seconds: float = Field(default=60.0, ge=0)
    # Seconds between progress lines of `connectors resync --wait` off a terminal.
    progress_interval: float = Field(default=5.0, gt=0)
    # Days a finished run's member details (its batch items, rejected members included, and the
    # member lists of its batches) are kept: long enough to look into a month of runs and
    # rejections, then deleted by the beat (sync/retention.py; docs/operations.md "Data we keep").
    retention_days: int = Field(default=30, ge=1)

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
        self._check_secret_key(self.secret_key)
        return self.secret_key

    def require_api_token(self) -> str:
        if not self.api_token:
            raise ConfigError("SEGOPS_API_TOKEN is not set (the HTTP API requires a bearer token)")
        self._check_api_token(self.api_token)
        return self.api_token

    def check_secrets(self) -> None:
        """Every secret that is set is a real one (workers, beat, Flower and the API call this
        at start). Raises ConfigError naming the first variable that is not, never its value.
        Which secrets a process needs at all is its own require_* calls' business."""
        if self.secret_key:
            self._check_secret_key(self.secret_key)
        if self.api_token:
            self._check_api_token(self.api_token)
        webhook = self.alert_webhook_secret.get_secret_value() if self.alert_webhook_secret else ""
        if webhook and is_placeholder(webhook):
            raise ConfigError(f"SEGOPS_ALERT_WEBHOOK_SECRET is {PLACEHOLDER_HINT}: set a real one")
        for name in PASSWORD_URLS:
            url = getattr(self, name)
            password = url_password(url) if url else None
            if password is not None and is_placeholder(password):
                raise ConfigError(
                    f"SEGOPS_{name.upper()} holds {PLACEHOLDER_HINT} password: set the real one"
                )

    @staticmethod
    def _check_secret_key(ring: str) -> None:
        # A key ring: each of its keys must be real (an empty part between commas is ignored).
        if is_placeholder(ring) or any(is_placeholder(k) for k in ring.split(",") if k.strip()):
            raise ConfigError(f"SEGOPS_SECRET_KEY is {PLACEHOLDER_HINT}: set a real secret")

    @staticmethod
    def _check_api_token(token: str) -> None:
        if is_placeholder(token):
            raise ConfigError(f"SEGOPS_API_TOKEN is {PLACEHOLDER_HINT}: set a real token")
        if len(token) < MIN_API_TOKEN_LENGTH:
            raise ConfigError(
                f"SEGOPS_API_TOKEN is too short: use at least {MIN_API_TOKEN_LENGTH} characters "
                "(e.g. `openssl rand -hex 24`)"
            )

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


# TLS parameters of a rediss:// URL, named as redis-py names them (docs/operations.md, "Redis:
# password and TLS"): rediss://:PASSWORD@host:6379/0?ssl_ca_certs=/etc/segops/redis-ca.pem
REDIS_TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_tls_options(url: str, variable: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` / ``redis_backend_use_ssl`` for a rediss:// URL; None otherwise.

    Given a rediss:// URL without TLS parameters, kombu connects to the broker without checking
    the server's certificate, and Celery's result backend refuses to start (it wants
    ``ssl_cert_reqs``). With these options both check it, as redis-py (the limiter) does by
    itself, so one URL form serves all three: ``ssl_cert_reqs`` defaults to ``required``,
    against ``ssl_ca_certs`` or else the system's CAs. Parameters in the URL win."""
    if not url.startswith("rediss://"):
        return None
    query = parse_qs(urlsplit(url).query)
    options: dict[str, Any] = {k: v[-1] for k in REDIS_TLS_PARAMS if (v := query.get(k))}
    cert_reqs = options.get("ssl_cert_reqs", "required")
    if cert_reqs not in _CERT_REQS:
        raise ConfigError(
            f"{variable}: ssl_cert_reqs must be required, optional or none, not {cert_reqs!r}"
        )
    options["ssl_cert_reqs"] = _CERT_REQS[cert_reqs]
    return options


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
