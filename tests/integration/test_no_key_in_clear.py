"""No Klaviyo key appears in clear anywhere we can look: worker logs, Redis
(broker, results, limiter), the tasks Flower shows, or any database column.

The test first syncs three connectors with keys of its own, so it has keys to look for wherever
it runs in the session; it looks for every key the session's other tests handed to the product
too (those that ran before it), and deactivates its own connectors at the end."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import text

from segops_sync.config import get_settings
from segops_sync.connectors import api_key_of
from segops_sync.db.queries import list_connectors
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator
from tests.integration.conftest import WORKER_LOGS, FlowerProcess, WorkerProcess
from tests.integration.helpers import (
    KNOWN_KEYS,
    Klaviyo,
    cli,
    create_connector,
    new_segment,
    recompute,
    redis_texts,
    wait_idle,
)

CANARY = "pk_canary0123456789abcdefghij"


def _all_keys() -> set[str]:
    keys = set(KNOWN_KEYS)
    with session_scope() as s:
        keys.update(api_key_of(c, get_settings()) for c in list_connectors(s))
    return {k for k in keys if len(k) > 8}


def _leaks(texts: Iterable[str], keys: set[str]) -> list[str]:
    found = []
    for chunk in texts:
        for key in keys:
            if key in chunk:
                found.append(key[:6] + "…")
    return found


@pytest.fixture
def synced_keys(
    worker: WorkerProcess, sim_server: tuple[Simulator, str], tmp_path: Path
) -> Iterator[set[str]]:
    """Three connectors, each with its own account and key, synced once through the worker
    (so their keys went through the CLI, the database, the tasks and the limiter); deactivated
    afterwards."""
    sim, base_url = sim_server
    accounts = [Klaviyo.new(sim, base_url) for _ in range(3)]
    connectors: list[str] = []
    try:
        for k in accounts:
            segment = new_segment()
            members = [f"key-check{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(3)]
            connectors.append(create_connector(k, segment))
            recompute(segment, members, tmp_path)
        for cid, k in zip(connectors, accounts, strict=True):
            connector = wait_idle(cid, timeout=120)
            assert connector.status == "active", connector.last_error
            assert len(k.members()) == 3, "the sync reached Klaviyo"
        yield {k.api_key for k in accounts}
    finally:
        for cid in connectors:
            cli("connectors", "deactivate", cid)


def test_no_key_in_clear_anywhere(
    worker: WorkerProcess,
    flower: FlowerProcess,
    stack_env: dict[str, str],
    synced_keys: set[str],
) -> None:
    keys = _all_keys() | synced_keys
    assert synced_keys <= keys and len(keys) >= 3
    prefix = stack_env["SEGOPS_REDIS_KEY_PREFIX"]
    redis_urls = [
        stack_env[v]
        for v in ("SEGOPS_BROKER_URL", "SEGOPS_RESULT_BACKEND", "SEGOPS_LIMITER_REDIS_URL")
    ]

    # the scanner finds a planted key, so a clean answer means something
    planted = redis.Redis.from_url(redis_urls[0])
    planted.set(f"{prefix}canary", json.dumps({"body": base64.b64encode(CANARY.encode()).decode()}))
    try:
        assert _leaks(redis_texts(redis_urls[0], prefix), {CANARY}), (
            "the Redis scan cannot see values"
        )
    finally:
        planted.delete(f"{prefix}canary")

    logs = [p.read_text(errors="replace") for p in WORKER_LOGS if p.exists()]
    logs.append(flower.log_path.read_text(errors="replace"))
    assert any("segops.add_batch" in log for log in logs), "the logs saw no sync"
    assert _leaks(logs, keys) == [], "a key in a log line"

    for url in redis_urls:
        assert _leaks(redis_texts(url, prefix), keys) == [], (
            f"a key in Redis ({url.rsplit('/', 1)[-1]})"
        )

    tasks = httpx.get(f"{flower.url}/api/tasks", timeout=30)
    assert tasks.status_code == 200
    shown = tasks.json()
    assert any(t.get("name") == "segops.add_batch" for t in shown.values()), "Flower saw no batch"
    assert _leaks([tasks.text], keys) == [], "a key in a task Flower shows"
    for task_id in list(shown)[:50]:
        detail = httpx.get(f"{flower.url}/api/task/info/{task_id}", timeout=30).text
        assert _leaks([detail], keys) == [], "a key in Flower's task detail"

    with session_scope() as s:
        tables = s.scalars(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        ).all()
        assert "connectors" in tables
        for table in tables:
            rows = s.scalars(text(f'SELECT t::text FROM "{table}" t')).all()
            assert _leaks(rows, keys) == [], f"a key in clear in table {table}"
