"""Pause and resume as plain functions: batches driven in this process against the real
PostgreSQL and the simulator over HTTP (the broker-driven test is tests/integration/test_pause.py)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from segops_sync.config import get_settings
from segops_sync.db.models import Connector, LedgerEntry, SyncBatch, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.errors import InputError
from segops_sync.states import ConnectorStatus, StartReason, Trigger
from segops_sync.sync import planner
from segops_sync.sync.pause import PAUSE_REASON, pause_connector, resume_connector
from segops_sync.sync.planner import plan_run, start_run
from segops_sync.sync.runs import finish_run
from segops_sync.sync.verify import verifiable_connectors
from tests.sync.helpers import World, drive_batch, start_and_plan, until_its_job_is_out
from tests.sync.helpers import make_connector as _connector
from tests.sync.helpers import on_list as _on_list


def _confirmed(connector_id: str) -> set[str]:
    with session_scope() as s:
        return set(
            s.scalars(
                select(LedgerEntry.user_id).where(
                    LedgerEntry.connector_id == connector_id, LedgerEntry.confirmed
                )
            )
        )


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_a_paused_run_settles_what_was_sent_and_sends_nothing_more(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three bulk batches of 10: the first done, the second's job out at Klaviyo when the
    connector is paused, the third not started. The second settles its job, the third stops
    unsent; the run closes cancelled with exact counts, and the ledger equals the list."""
    connector_id, run_id, (first, second, third), members = _planned(
        world, monkeypatch, "pause", 25
    )
    assert drive_batch(world, first).ok
    world.sim.job_delay = 2.0  # the second batch's job is still running when the pause lands
    try:
        until_its_job_is_out(world, second)
        with session_scope() as s:
            paused = pause_connector(s, connector_id)
        assert (paused.stopping_run_id, paused.already) == (run_id, False)
    finally:
        world.sim.job_delay = 0.05
    assert drive_batch(world, second).ok  # what it sent is settled
    assert not drive_batch(world, third).ok
    with session_scope() as s:
        closed = finish_run(s, run_id)
    assert closed.status == "cancelled" and closed.closed_now and closed.next_run is None
    with session_scope() as s:
        run = s.get_one(SyncRun, run_id)
        connector = s.get_one(Connector, connector_id)
        stopped = s.get_one(SyncBatch, third)
        assert (run.status, run.added, connector.status) == ("cancelled", 20, "paused")
        assert run.error and run.error.startswith(PAUSE_REASON)
        assert (connector.last_error, connector.last_synced_at) == (None, None)
        assert (stopped.status, stopped.error, list(stopped.job_ids)) == (
            "failed",
            PAUSE_REASON,
            [],
        )
    assert _confirmed(connector_id) == _on_list(world) == set(members[:20])

    with session_scope() as s:  # while paused, a trigger starts nothing
        assert start_run(s, connector_id, trigger=Trigger.RECOMPUTE).reason == StartReason.PAUSED
        assert not s.get_one(Connector, connector_id).resync_requested
    with session_scope() as s:
        resume_connector(s, connector_id)
        started = start_run(s, connector_id, trigger=Trigger.RESUME)
    assert started.reason == StartReason.STARTED and started.run_id
    with session_scope() as s:
        plan = plan_run(s, started.run_id, get_settings())
    assert all(drive_batch(world, b).ok for b in plan.batch_ids)
    with session_scope() as s:
        assert finish_run(s, started.run_id).status == "succeeded"
        assert s.get_one(SyncRun, started.run_id).trigger == "resume"
    assert _confirmed(connector_id) == _on_list(world) == set(members)


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_a_run_paused_before_it_was_planned_closes_cancelled_without_batches(
    world: World,
) -> None:
    connector_id = _connector(world, f"early-{uuid.uuid4().hex[:6]}", ["early@example.com"])
    with session_scope() as s:
        run_id = start_run(s, connector_id, trigger=Trigger.RECOMPUTE).run_id
    assert run_id
    with session_scope() as s:
        pause_connector(s, connector_id)
    with session_scope() as s:
        plan = plan_run(s, run_id, get_settings())
        assert (plan.status, plan.batch_ids) == ("empty", [])
        assert finish_run(s, run_id).status == "cancelled"
    assert _on_list(world) == set()


def _planned(
    world: World, monkeypatch: pytest.MonkeyPatch, name: str, size: int
) -> tuple[str, str, list[int], list[str]]:
    """A connector whose segment holds ``size`` members, and its first run planned in add
    batches of 10 (a listed delta: any batch size works): connector, run, batches, members."""
    monkeypatch.setattr(planner, "ADD_BATCH_SIZE", 10)
    members = [f"{name}{i:03d}-{uuid.uuid4().hex[:4]}@example.com" for i in range(size)]
    connector_id = _connector(world, f"{name}-{uuid.uuid4().hex[:6]}", members)
    run_id, plan = start_and_plan(connector_id, Trigger.RECOMPUTE)
    batch_ids = plan.add_batch_ids
    assert len(batch_ids) == -(-size // 10)
    return connector_id, run_id, batch_ids, members


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_a_pause_after_the_last_batch_leaves_a_complete_sync_succeeded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    connector_id, run_id, batch_ids, _ = _planned(world, monkeypatch, "late", 15)
    assert all(drive_batch(world, b).ok for b in batch_ids)
    with session_scope() as s:  # before the chord's callback closes the run
        assert pause_connector(s, connector_id).stopping_run_id == run_id
    with session_scope() as s:
        assert finish_run(s, run_id).status == "succeeded"
    with session_scope() as s:
        connector = s.get_one(Connector, connector_id)
        assert (s.get_one(SyncRun, run_id).added, connector.status) == (15, "paused")
        assert connector.last_synced_at is not None


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_a_pause_after_a_plan_with_nothing_to_do_leaves_it_succeeded(world: World) -> None:
    """The plan found nothing to send, so it has no batch; the run's close is its own task, and
    a pause between the two stopped nothing."""
    connector_id = _connector(world, f"idle-{uuid.uuid4().hex[:6]}", [])
    with session_scope() as s:
        run_id = start_run(s, connector_id, trigger=Trigger.RECOMPUTE).run_id
    assert run_id
    with session_scope() as s:
        assert plan_run(s, run_id, get_settings()).batch_ids == []
    with session_scope() as s:
        pause_connector(s, connector_id)
    with session_scope() as s:
        assert finish_run(s, run_id).status == "succeeded"


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_a_batch_that_fails_for_good_after_the_pause_fails_the_run(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch's job is out at Klaviyo when the pause lands; settling it, Klaviyo
    refuses the key (revoked meanwhile). That is a failure a person must see, not a pause."""
    connector_id, run_id, (first, second), _ = _planned(world, monkeypatch, "broken", 15)
    world.sim.job_delay = 2.0
    try:
        until_its_job_is_out(world, first)
        with session_scope() as s:
            assert pause_connector(s, connector_id).stopping_run_id == run_id
        world.sim.revoke_key(world.key)
    finally:
        world.sim.job_delay = 0.05
    assert not drive_batch(world, first).ok  # Klaviyo refuses the key: failed for good
    assert not drive_batch(world, second).ok  # stopped by the pause
    with session_scope() as s:
        assert finish_run(s, run_id).status == "failed"
    with session_scope() as s:
        run = s.get_one(SyncRun, run_id)
        connector = s.get_one(Connector, connector_id)
        assert run.error and "API key" in run.error and PAUSE_REASON not in run.error
        assert (connector.status, connector.last_error) == ("paused", run.error)


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_bad_pause_and_resume_change_nothing(world: World) -> None:
    connector_id = _connector(world, f"bad-{uuid.uuid4().hex[:6]}", [])
    with session_scope() as s:
        with pytest.raises(InputError, match="not paused"):
            resume_connector(s, connector_id)
        s.get_one(Connector, connector_id).status = ConnectorStatus.INACTIVE
    with session_scope() as s, pytest.raises(InputError, match="inactive"):
        pause_connector(s, connector_id)
    with session_scope() as s:
        assert s.get_one(Connector, connector_id).status == "inactive"
        s.get_one(Connector, connector_id).status = ConnectorStatus.ACTIVE
    with session_scope() as s:
        assert connector_id in verifiable_connectors(s)
        assert pause_connector(s, connector_id).stopping_run_id is None
    with session_scope() as s:
        assert pause_connector(s, connector_id).already  # again: nothing changes
        assert connector_id not in verifiable_connectors(s)  # the beat's read-back skips it
