"""The demo of `docker compose --profile demo up`, run as compose runs it: the
simulator in a process of its own bound to 0.0.0.0, the demo's entry point beside it, on real
PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from segops_sync.embedded import free_port


def test_the_compose_demo_syncs_through_a_separate_simulator(
    segops_env: dict[str, str], pg_server_url: str
) -> None:
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "segops_sync.cli", "klaviyo-sim", "--host", "0.0.0.0", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    database = f"segops_demo_{uuid.uuid4().hex[:8]}"
    prefix = f"segops-demo-{uuid.uuid4().hex[:8]}:"
    try:
        assert sim.stdout is not None
        assert f"base_url=http://0.0.0.0:{port}" in sim.stdout.readline()
        result = subprocess.run(
            [
                sys.executable, "-m", "segops_sync.stack_demo",
                "--klaviyo-url", f"http://127.0.0.1:{port}",
                "--database", database, "--redis-prefix", prefix, "--members", "60",
            ],
            env={**os.environ, **segops_env},
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert len(re.findall(r"segment has \d+: exact match", result.stdout)) == 2, result.stdout
        assert "status" in result.stdout and "active" in result.stdout
        assert "pk_" not in result.stdout.replace("pk_…", "")  # the key only ever redacted
        # its own database: the session's has no demo connector
        from segops_sync.db.session import session_scope

        with session_scope() as s:
            assert not s.scalar(
                text("SELECT count(*) FROM connectors WHERE segment_id = 'demo-vip-customers'")
            )
    finally:
        sim.terminate()
        sim.wait(10)
        admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
        for var in ("SEGOPS_BROKER_URL", "SEGOPS_RESULT_BACKEND", "SEGOPS_LIMITER_REDIS_URL"):
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis.from_url(segops_env[var])
                for key in client.scan_iter(match=f"{prefix}*", count=1000):
                    client.delete(key)


def test_the_demo_never_replaces_the_stacks_own_database(segops_env: dict[str, str]) -> None:
    from sqlalchemy.engine import make_url

    own = make_url(segops_env["SEGOPS_DATABASE_URL"]).database
    result = subprocess.run(
        [sys.executable, "-m", "segops_sync.stack_demo", "--klaviyo-url", "http://127.0.0.1:9",
         "--database", str(own)],
        env={**os.environ, **segops_env},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "must not be the stack's own" in result.stderr
