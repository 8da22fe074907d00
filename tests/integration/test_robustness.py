"""Syncs stay exact through duplicates and bursts of recomputes, hostile messages and bulk jobs
that Klaviyo loses, and the mass-removal guard holds. Real worker, real PostgreSQL and Redis, simulator."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer
from sqlalchemy import select, text

from segops_sync.db.models import SyncBatch, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import Endpoint
from segops_sync.sync.costs import Delta, add_cutover, expected_requests
from segops_sync.sync.inputs.membership import replace_membership
from tests.conftest import BROKERS
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    cli,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    wait_idle,
)

# Every test here runs on Redis and on RabbitMQ as the broker.
pytestmark = pytest.mark.parametrize("broker", BROKERS, indirect=True)


@pytest.fixture
def producer_app(stack_env: dict[str, str]) -> Iterator[Celery]:
    """A producer like the recompute service's: its own Celery app, our broker."""
    app = Celery("producer", broker=stack_env["SEGOPS_BROKER_URL"])
    app.conf.broker_transport_options = {"global_keyprefix": stack_env["SEGOPS_REDIS_KEY_PREFIX"]}
    yield app
    app.close()


def _publish(app: Celery, name: str, **kwargs: object) -> None:
    app.send_task(name, kwargs=kwargs, queue="segops")


def _set_members(segment: str, members: list[str], tmp_path: Path) -> None:
    path = tmp_path / f"{uuid.uuid4().hex}.txt"
    path.write_text("".join(f"{m}\n" for m in members))
    with session_scope() as s:
        replace_membership(s, segment, str(path))


def _writes(k: Klaviyo) -> int:
    return len([r for r in k.requests() if r.method in ("POST", "DELETE")])


def _runs(connector_id: str) -> list[SyncRun]:
    with session_scope() as s:
        runs = list(
            s.scalars(
                select(SyncRun)
                .where(SyncRun.connector_id == connector_id)
                .order_by(SyncRun.started_at)
            )
        )
        for run in runs:
            s.expunge(run)
        return runs


def test_duplicate_deliveries_cost_nothing(
    worker: WorkerProcess, klaviyo: Klaviyo, producer_app: Celery, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    members = [f"dup{i}@example.com" for i in range(40)]
    _set_members(segment, members, tmp_path)
    for _ in range(3):  # the same message, delivered three times
        _publish(producer_app, "segops.recompute_finished", segment_id=segment, recompute_id="rc-1")
    wait_idle(connector_id)
    time.sleep(1.5)  # let any straggler copy arrive
    wait_idle(connector_id)
    assert set(klaviyo.members()) == set(members)
    assert len(_runs(connector_id)) == 1, "a duplicate message started a second run"
    # exactly what one run of 40 adds writes (the synchronous path: 40 upserts, one list write)
    one_run = expected_requests(Delta(adds=len(members))).by_endpoint
    assert _writes(klaviyo) == sum(n for e, n in one_run.items() if e.method in ("POST", "DELETE"))


def test_a_burst_of_recomputes_coalesces(
    worker: WorkerProcess, klaviyo: Klaviyo, producer_app: Celery, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    base = [f"burst{i}@example.com" for i in range(30)]
    memberships = [
        base[: 20 + i] + [f"late{i}-{j}@example.com" for j in range(i)] for i in range(5)
    ]
    # The burst must fall inside the first run: 0.1 s a request makes that run's 20 upserts
    # (one after another) last 2 s or more, against at most 1 s of publishing, however fast
    # the host. Without the latency a first run of 0.5 s could end mid-burst and leave a
    # third run for the late messages.
    klaviyo.sim.set_faults(latency=0.1)
    try:
        started = time.monotonic()
        for n, members in enumerate(memberships):
            _set_members(segment, members, tmp_path)
            _publish(
                producer_app,
                "segops.recompute_finished",
                segment_id=segment,
                recompute_id=f"rc-{n}",
            )
        assert time.monotonic() - started < 1.0, "five recomputes within a second"
        wait_idle(connector_id)
    finally:
        klaviyo.sim.set_faults()
    runs = _runs(connector_id)
    # never two at once: each run started after the previous one finished
    for before, after in itertools.pairwise(runs):
        assert before.finished_at is not None and before.finished_at <= after.started_at
    assert len(runs) <= 2, f"{len(runs)} runs for one burst: the extra triggers did not coalesce"
    assert set(klaviyo.members()) == set(memberships[-1])
    assert all(r.status == "succeeded" for r in runs)


def test_malformed_messages_are_dropped_and_the_worker_stays_up(
    worker: WorkerProcess,
    klaviyo: Klaviyo,
    producer_app: Celery,
    stack_env: dict[str, str],
    tmp_path: Path,
) -> None:
    marker = uuid.uuid4().hex[:8]
    bad: list[dict[str, object]] = [
        {},  # missing fields
        {"segment_id": f"seg-{marker}"},  # recompute_id missing
        {"segment_id": 42, "recompute_id": "r"},  # mistyped
        {"segment_id": ["a"], "recompute_id": {"x": 1}},
        {"segment_id": f"unknown-{marker}", "recompute_id": "r"},  # unknown segment
        {"segment_id": "x" * (10 * 1024 * 1024), "recompute_id": "r"},  # a 10 MB payload
    ]
    for kwargs in bad:
        producer_app.send_task("segops.recompute_finished", kwargs=kwargs, queue="segops")
    producer_app.send_task(
        "segops.sync_connector", args=[f"no-such-connector-{marker}"], queue="segops"
    )
    producer_app.send_task("segops.sync_connector", args=[1, 2, 3], queue="segops")
    producer_app.send_task(
        "segops.context_identified", kwargs={"user_id": "u", "traits": "nope"}, queue="segops"
    )
    producer_app.send_task(
        "segops.context_identified",
        kwargs={"user_id": "u", "traits": {"email": "bad"}},
        queue="segops",
    )
    # bytes that are not UTF-8, and a body that is no Celery message at all
    with Connection(
        stack_env["SEGOPS_BROKER_URL"],
        transport_options={"global_keyprefix": stack_env["SEGOPS_REDIS_KEY_PREFIX"]},
    ) as conn:
        producer = Producer(conn)
        exchange = Exchange("segops", type="direct")
        producer.publish(
            b"\xff\xfe\xfa not utf-8 \xc3\x28",
            exchange=exchange,
            routing_key="segops",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "segops.recompute_finished", "id": str(uuid.uuid4())},
        )
        producer.publish(
            b"\xff\xfe",
            exchange=exchange,
            routing_key="segops",
            content_type="application/x-unknown",
            content_encoding="binary",
        )
        producer.publish(
            json.dumps({"hello": "world"}),
            exchange=exchange,
            routing_key="segops",
            content_type="application/json",
        )

    # a valid message after them still syncs
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, ["after-garbage@example.com"], tmp_path)
    wait_idle(connector_id)
    assert set(klaviyo.members()) == {"after-garbage@example.com"}
    assert worker.proc is not None and worker.proc.poll() is None, "the worker died"

    log = worker.log()
    assert "dropped malformed segops.recompute_finished" in log
    assert f"unknown segment 'unknown-{marker}'" in log
    assert f"no-such-connector-{marker}" in log
    # dropped, not retried in a loop: each reason is logged once
    assert log.count(f"unknown segment 'unknown-{marker}'") == 1
    assert log.count(f"no-such-connector-{marker}") == 1
    assert "x" * 1000 not in log, "the 10 MB payload was echoed into the log"


def test_mass_removal_is_held_until_allowed(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    members = [f"mass{i}@example.com" for i in range(10)]
    recompute(segment, members, tmp_path)
    wait_idle(connector_id)
    assert set(klaviyo.members()) == set(members)

    # a broken segment query: 8 of 10 would go
    recompute(segment, members[:2], tmp_path)
    connector = wait_idle(connector_id, runs_at_least=2)
    run = latest_run(connector_id)
    assert run.status == "held"
    assert connector.last_error and "8 of the 10" in connector.last_error
    assert "--allow-mass-removal" in connector.last_error
    assert set(klaviyo.members()) == set(members), "a held run touched the list"
    assert (
        cli("connectors", "history", connector_id, "--json", check=True).stdout.count('"held"') == 1
    )

    result = cli("connectors", "resync", connector_id, "--allow-mass-removal", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(klaviyo.members()) == set(members[:2])
    connector = wait_idle(connector_id, runs_at_least=3)
    assert connector.status == "active" and connector.last_error is None


def test_a_message_cannot_approve_a_mass_removal(
    worker: WorkerProcess, klaviyo: Klaviyo, producer_app: Celery, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    members = [f"approve{i}@example.com" for i in range(10)]
    recompute(segment, members, tmp_path)
    wait_idle(connector_id)
    recompute(segment, members[:2], tmp_path)  # a broken segment: 8 of 10 would go
    wait_idle(connector_id, runs_at_least=2)
    assert latest_run(connector_id).status == "held"

    # Whoever reaches the broker asks for the removal: a plain resync, held again.
    _publish(
        producer_app, "segops.sync_connector", connector_id=connector_id, allow_mass_removal=True
    )
    wait_idle(connector_id, runs_at_least=3)
    assert [r.status for r in _runs(connector_id)] == ["succeeded", "held", "held"]
    assert set(klaviyo.members()) == set(members), "a message approved a mass removal"
    assert "allow_mass_removal is ignored" in worker.log()

    # A person approves it: the removal goes, and the run history says who.
    held_id = latest_run(connector_id).id
    result = cli(
        "connectors", "resync", connector_id, "--allow-mass-removal", "--by", "ops-alice", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(klaviyo.members()) == set(members[:2])
    history = json.loads(cli("connectors", "history", connector_id, "--json", check=True).stdout)
    assert [d["status"] for d in history] == ["succeeded", "held", "held", "succeeded"]
    approval = history[0]["approval"]
    assert set(approval) == {"by", "at", "expires_at", "held_run_id"}
    assert (approval["by"], approval["held_run_id"]) == ("ops-alice", held_id)
    assert datetime.fromisoformat(approval["at"]) < datetime.fromisoformat(approval["expires_at"])
    assert [d["approval"] for d in history[1:]] == [None, None, None]
    lines = cli("connectors", "history", connector_id, check=True).stdout.splitlines()
    assert "approved by ops-alice" in lines[0]
    assert not any("approved by" in line for line in lines[1:])

    # The approval served that run only: the next broken segment is held again.
    recompute(segment, members[:2] + [f"approve-new{i}@example.com" for i in range(2)], tmp_path)
    wait_idle(connector_id, runs_at_least=5)
    recompute(segment, [], tmp_path)
    wait_idle(connector_id, runs_at_least=6)
    assert latest_run(connector_id).status == "held"
    assert len(klaviyo.members()) == 4


@pytest.mark.parametrize("fate", ["lose", "expire"])
def test_a_bulk_job_klaviyo_loses_is_redone(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path, fate: str
) -> None:
    sim = klaviyo.sim
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    # more adds than the synchronous path takes: these go in a bulk job
    members = [f"{fate}{i}@example.com" for i in range(add_cutover() + 25)]
    saved_delay = sim.job_delay
    sim.job_delay = 3.0  # time to intervene while the job runs
    try:
        recompute(segment, members, tmp_path)
        deadline = time.monotonic() + 30
        job_ids: list[str] = []
        while not job_ids and time.monotonic() < deadline:
            with session_scope() as s:
                rows = s.scalars(
                    select(SyncBatch.job_ids)
                    .join(SyncRun, SyncRun.id == SyncBatch.run_id)
                    .where(SyncRun.connector_id == connector_id)
                ).all()
            job_ids = [j for ids in rows for j in ids]
            time.sleep(0.05)
        assert job_ids, "no bulk job was submitted"
        if fate == "lose":
            sim.lose_job(job_ids[0])
        else:
            sim.expire_job(job_ids[0])
        sim.job_delay = 0.2
        wait_idle(connector_id)
    finally:
        sim.job_delay = saved_delay
    assert set(klaviyo.members()) == set(members)
    run = latest_run(connector_id)
    assert run.status == "succeeded" and run.added == len(members)
    jobs = sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB)
    assert len([r for r in jobs if r.account == klaviyo.account and r.status == 202]) >= 2, (
        "the job was not redone"
    )
    with session_scope() as s:
        ledger = s.scalar(
            text("SELECT count(*) FROM connector_members WHERE connector_id = :c"),
            {"c": connector_id},
        )
    assert ledger == len(members)
