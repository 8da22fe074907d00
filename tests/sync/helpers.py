"""Small tools for the sync tests that call the pipeline as plain functions: a simulator account
to sync into (the ``world`` fixtures of tests/sync/conftest.py and test_pipeline_functions.py),
a connector on a segment, and one whole run driven in this process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from sqlalchemy import text

from segops_sync.config import get_settings
from segops_sync.connectors import create_connector
from segops_sync.db.models import SyncBatch, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator
from segops_sync.states import BatchStatus, ConnectorStatus, StartReason, Trigger
from segops_sync.sync.approvals import approve_mass_removal
from segops_sync.sync.batch_step import Finished, Later
from segops_sync.sync.batches import run_batch
from segops_sync.sync.fleet.access import KlaviyoAccess
from segops_sync.sync.planner import Plan, plan_run, start_run
from segops_sync.sync.runs import finish_run

AddPath = Literal["bulk", "direct"]


@dataclass
class World:
    sim: Simulator
    access: KlaviyoAccess
    account: str
    key: str
    list_id: str


def open_world(
    server: tuple[Simulator, str],
    monkeypatch: pytest.MonkeyPatch,
    add_path: AddPath | None = None,
) -> Iterator[World]:
    """A new account, key and list on the simulator, the settings pointed at it; the body of
    the ``world`` fixtures (``yield from``). ``bulk``: every add goes in a bulk job
    (SEGOPS_DIRECT_ADD_LIMIT=0); ``direct``: the product's cut-over, so small deltas take the
    synchronous path; None: SEGOPS_DIRECT_ADD_LIMIT is left as it is."""
    from tests.conftest import _reset_settings

    sim, base_url = server
    monkeypatch.setenv("SEGOPS_KLAVIYO_BASE_URL", base_url)
    monkeypatch.setenv("SEGOPS_JOB_POLL_INTERVAL", "0.05")
    if add_path == "bulk":
        monkeypatch.setenv("SEGOPS_DIRECT_ADD_LIMIT", "0")
    elif add_path == "direct":
        monkeypatch.delenv("SEGOPS_DIRECT_ADD_LIMIT", raising=False)
    elif add_path is not None:
        raise ValueError(f"unknown add path {add_path!r}")
    _reset_settings()
    account = sim.create_account()
    key = sim.create_key(account)
    access = KlaviyoAccess(get_settings())
    # A new account per test is more than the fleet's account lookups allow (13 a minute):
    # the batches find theirs cached, as they would after a first lookup (tested elsewhere).
    access.resolver.resolve(key, lambda: account)
    yield World(sim, access, account, key, sim.create_list(account))
    _reset_settings()


def make_connector(w: World, segment: str, members: list[str]) -> str:
    """An active connector from ``segment`` to the world's list; the segment holds ``members``."""
    with session_scope() as s:
        connector, _ = create_connector(
            s, get_settings(), segment_id=segment, list_id=w.list_id, api_key=w.key, verify=False
        )
        connector.status = ConnectorStatus.ACTIVE
        s.execute(text("DELETE FROM segment_members WHERE segment_id = :s"), {"s": segment})
        if members:
            s.execute(
                text("INSERT INTO segment_members SELECT :s, unnest(CAST(:m AS text[]))"),
                {"s": segment, "m": members},
            )
        return connector.id


def set_members(segment: str, members: list[str]) -> None:
    with session_scope() as s:
        s.execute(text("DELETE FROM segment_members WHERE segment_id = :s"), {"s": segment})
        s.execute(
            text("INSERT INTO segment_members SELECT :s, unnest(CAST(:m AS text[]))"),
            {"s": segment, "m": members},
        )


def run_sync(w: World, connector_id: str, *, approved_by: str | None = None) -> SyncRun:
    """One whole run, each batch driven to the end in this process, as a worker would
    (``approved_by``: a person approved a mass removal first)."""
    if approved_by is not None:
        with session_scope() as s:
            approve_mass_removal(s, connector_id, by=approved_by)
    run_id, plan = start_and_plan(connector_id)
    for batch_id in plan.batch_ids:
        deadline = time.monotonic() + 60
        while not isinstance(step := run_batch(batch_id, w.access, get_settings()), Finished):
            assert time.monotonic() < deadline, f"batch {batch_id} never finished: {step.reason}"
            time.sleep(min(step.countdown, 0.5))
    with session_scope() as s:
        finish_run(s, run_id)
        s.flush()  # before expunge, or the closing is never written
        run = s.get_one(SyncRun, run_id)
        s.expunge(run)
    return run


def on_list(w: World) -> set[str]:
    return {p.external_id or p.email or "" for p in w.sim.list_members(w.list_id)}


def running_run_that_sent(
    connector_id: str,
    user: str,
    *,
    seq: int = 0,
    batches: tuple[str, ...] = (),
    phase: str = "planning",
) -> str:
    """A running run whose add batch ``seq`` sent the member without recording Klaviyo's answer
    yet (a big sync's batch while its job runs); ``batches``: the statuses of its batch rows
    from ``seq`` on (none: no batch rows). Its id; ``drop_runs`` deletes it."""
    run_id = str(uuid.uuid4())
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status, phase) "
                "VALUES (:r, :c, 'resync', 'running', :p)"
            ),
            {"r": run_id, "c": connector_id, "p": phase},
        )
        for offset, status in enumerate(batches):
            s.execute(
                text(
                    "INSERT INTO sync_batches (run_id, kind, seq, status) "
                    "VALUES (:r, 'add', :q, :s)"
                ),
                {"r": run_id, "q": seq + offset, "s": status},
            )
        s.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, external_id) "
                "VALUES (:r, :u, 'add', :q, :u)"
            ),
            {"r": run_id, "u": user, "q": seq},
        )
    return run_id


def drop_runs(*run_ids: str) -> None:
    """Runs a test wrote by hand, with their batches and items."""
    with session_scope() as s:
        for table, column in (
            ("sync_batch_items", "run_id"),
            ("sync_batches", "run_id"),
            ("sync_runs", "id"),
        ):
            s.execute(text(f"DELETE FROM {table} WHERE {column} = ANY(:r)"), {"r": list(run_ids)})


def message_forget_records(*, finished: bool = False) -> list[tuple[Any, ...]]:
    """(id, finished, lists_removed, error) of each forget a ``segops.forget_user`` message
    made, oldest first; ``finished``: the closed ones only."""
    closed = " AND finished_at IS NOT NULL" if finished else ""
    with session_scope() as s:
        return [
            tuple(row)
            for row in s.execute(
                text(
                    "SELECT id, finished_at IS NOT NULL, lists_removed, error FROM forget_records "
                    f"WHERE source = 'message'{closed} ORDER BY id"
                )
            )
        ]


def start_and_plan(connector_id: str, trigger: Trigger = Trigger.RESYNC) -> tuple[str, Plan]:
    """A run of the connector started (it must start) and planned: its id and its plan."""
    with session_scope() as s:
        outcome = start_run(s, connector_id, trigger=trigger)
    assert outcome.reason == StartReason.STARTED and outcome.run_id
    with session_scope() as s:
        return outcome.run_id, plan_run(s, outcome.run_id, get_settings())


def drive_batch(w: World, batch_id: int) -> Finished:
    """The batch's steps in this process, each when its countdown says, until it finished."""
    deadline = time.monotonic() + 30
    while not isinstance(step := run_batch(batch_id, w.access, get_settings()), Finished):
        assert time.monotonic() < deadline, step.reason
        time.sleep(min(step.countdown, 0.2))
    return step


def until_its_job_is_out(w: World, batch_id: int) -> None:
    """Step the batch until its bulk job is out at Klaviyo (a step the limiter defers goes
    again); the caller has made jobs slow enough to still run afterwards."""
    deadline = time.monotonic() + 30
    while True:
        step = run_batch(batch_id, w.access, get_settings())
        assert isinstance(step, Later) and time.monotonic() < deadline
        with session_scope() as s:
            if s.get_one(SyncBatch, batch_id).status == BatchStatus.SUBMITTED:
                return
        time.sleep(min(step.countdown, 0.2))
