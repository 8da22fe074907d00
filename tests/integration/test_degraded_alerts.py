"""``sync.degraded`` on the real stack: a run far slower than its expected time, or one that had
Klaviyo reject more than the share of its members, is delivered as
a signed ``sync.degraded`` alert, once, and the next clean run as ``sync.recovered``.

A worker of its own: the slow floor (``SEGOPS_ALERT_SLOW_MIN_SECONDS``, an internal knob) is
lowered so a tiny run made slow by the simulator's latency crosses it, which would disturb the
alert sequences of test_observability.py's shared worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from segops_sync.db.session import session_scope
from segops_sync.embedded import free_port
from segops_sync.klaviyo_sim import Simulator
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    new_segment,
    recompute,
    simulated_fleet,
    wait_idle,
)
from tests.integration.test_observability import Received, Receiver

# Every Klaviyo answer takes LATENCY s; a direct add is at least two requests in sequence (the
# upserts, then the list write), so the slow run lasts over 2 x LATENCY, well above the floor,
# and a clean run (no latency) far below it.
LATENCY = 4.0
SLOW_FLOOR = 6.0


@dataclass
class Stack:
    sim: Simulator
    base_url: str
    receiver: Receiver
    secret: str


@pytest.fixture(scope="module")
def stack(
    segops_env: dict[str, str], pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    receiver = Receiver(free_port())
    receiver.start()
    secret = secrets.token_hex(16)
    overrides = {
        "SEGOPS_ALERT_WEBHOOK_URL": receiver.url,
        "SEGOPS_ALERT_WEBHOOK_SECRET": secret,
        "SEGOPS_ALERT_SLOW_MIN_SECONDS": str(SLOW_FLOOR),
    }
    workdir = tmp_path_factory.mktemp("degraded-worker")
    try:
        with simulated_fleet(
            sim, segops_env, pg_server_url, workdir, "degraded", overrides=overrides
        ) as base_url:
            yield Stack(sim, base_url, receiver, secret)
    finally:
        receiver.stop()


def _verified(stack: Stack, got: Received) -> dict[str, Any]:
    headers = {k.lower(): v for k, v in got.headers.items()}
    plain = hmac.new(stack.secret.encode(), got.body, hashlib.sha256).hexdigest()
    assert headers["x-segops-signature"] == f"sha256={plain}"
    timestamp = headers["x-segops-timestamp"]
    signed = timestamp.encode() + b"." + got.body
    fresh = hmac.new(stack.secret.encode(), signed, hashlib.sha256).hexdigest()
    assert headers["x-segops-signature-256"] == f"t={timestamp},v1={fresh}"
    doc: dict[str, Any] = json.loads(got.body)
    return doc


def _alerts(stack: Stack, connector_id: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        docs = [_verified(stack, g) for g in stack.receiver.got]
        mine = [d for d in docs if d["connector_id"] == connector_id]
        if len(mine) >= n or time.monotonic() > deadline:
            return mine
        time.sleep(0.3)


def test_a_slow_run_sends_degraded_then_a_clean_run_sends_recovered(
    stack: Stack, tmp_path: Path
) -> None:
    k = Klaviyo.new(stack.sim, stack.base_url)
    segment = new_segment()
    tag = uuid.uuid4().hex[:6]
    connector_id = create_connector(k, segment)

    stack.sim.set_faults(latency=LATENCY)
    try:
        recompute(segment, [f"slow{i}.{tag}@example.com" for i in range(3)], tmp_path)
        wait_idle(connector_id)
    finally:
        stack.sim.set_faults()
    [degraded] = _alerts(stack, connector_id, 1)
    assert (degraded["event"], degraded["status"]) == ("sync.degraded", "succeeded")
    figures = degraded["degraded"]
    assert figures["reason"] == "slow"
    assert figures["seconds"] > figures["min_seconds"] == SLOW_FLOOR
    assert figures["seconds"] > figures["factor"] * figures["expected_seconds"]
    assert tag not in degraded["error"]  # figures only, never a member

    recompute(segment, [f"slow{i}.{tag}@example.com" for i in range(4)], tmp_path)
    wait_idle(connector_id, runs_at_least=2)
    alerts = _alerts(stack, connector_id, 2)
    assert [a["event"] for a in alerts] == ["sync.degraded", "sync.recovered"]
    assert alerts[1]["error"] is None and "degraded" not in alerts[1]

    # stored once per (run, event), like every alert
    with session_scope() as s:
        rows = s.execute(
            text(
                "SELECT event, count(*) FROM alert_deliveries WHERE connector_id = :c "
                "GROUP BY event ORDER BY event"
            ),
            {"c": connector_id},
        ).all()
    assert [tuple(r) for r in rows] == [("sync.degraded", 1), ("sync.recovered", 1)]


def test_a_run_rejecting_too_large_a_share_sends_degraded_then_recovered(
    stack: Stack, tmp_path: Path
) -> None:
    k = Klaviyo.new(stack.sim, stack.base_url)
    segment = new_segment()
    tag = uuid.uuid4().hex[:6]
    connector_id = create_connector(k, segment)
    good = [f"ok{i}.{tag}@example.com" for i in range(9)]
    bad = f"bad,{tag}@example.com"  # our pattern lets it through; Klaviyo refuses it
    recompute(segment, [*good, bad], tmp_path)
    wait_idle(connector_id)
    [degraded] = _alerts(stack, connector_id, 1)
    assert (degraded["event"], degraded["status"]) == ("sync.degraded", "succeeded")
    assert degraded["degraded"] == {
        "reason": "rejected_share",
        "rejected": 1,
        "handled": 10,
        "share": 0.1,
        "threshold": 0.05,
    }
    assert tag not in degraded["error"]  # counts only, never a member

    # the rejected member waits for new data; a clean run follows and recovers
    recompute(segment, [*good, bad, f"ok9.{tag}@example.com"], tmp_path)
    wait_idle(connector_id, runs_at_least=2)
    alerts = _alerts(stack, connector_id, 2)
    assert [a["event"] for a in alerts] == ["sync.degraded", "sync.recovered"]
    assert k.members().keys() == {*good, f"ok9.{tag}@example.com"}
