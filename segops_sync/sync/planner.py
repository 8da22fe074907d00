"""Starting a run and planning it: the delta in SQL, cut into batches stored as rows.

The delta never passes through Python: ``added = segment - ledger`` and
``removed = ledger - segment`` are anti-joins that write ``sync_batch_items`` directly, numbered
in key order and cut into batches the size of one Klaviyo call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Result, func, select, text
from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.models import Connector, LedgerEntry, SyncBatch, SyncRun
from segops_sync.db.queries import get_connector
from segops_sync.states import (
    OPEN_BATCH,
    BatchKind,
    ConnectorStatus,
    PlanStatus,
    RunPhase,
    RunStatus,
    StartReason,
    Trigger,
)
from segops_sync.sync.costs import DIRECT_BATCH_SIZE, goes_direct
from segops_sync.sync.identity import SQL_EMAIL, SQL_EXTERNAL_ID
from segops_sync.sync.traits import SELECTED_TRAITS_SQL, TRAITS_HASH_SQL

# One bulk import job takes up to 10,000 profiles; the client splits further by the 5 MB cap.
# (A run with few adds sends them synchronously instead, DIRECT_BATCH_SIZE to a batch.)
ADD_BATCH_SIZE = 10_000
# One relationship DELETE takes up to 1,000 profile ids.
REMOVE_BATCH_SIZE = 1_000

_ADDED_SQL = f"""
    SELECT sm.user_id, {SQL_EMAIL} AS email, {SQL_EXTERNAL_ID} AS external_id
    FROM segment_members sm LEFT JOIN identities i ON i.user_id = sm.user_id
    WHERE sm.segment_id = :seg
      AND NOT EXISTS (SELECT 1 FROM connector_members cm
                      WHERE cm.connector_id = :c AND cm.user_id = sm.user_id)
"""
_REMOVED_SQL = """
    SELECT cm.user_id, cm.email, cm.external_id, cm.profile_id
    FROM connector_members cm
    WHERE cm.connector_id = :c
      AND NOT EXISTS (SELECT 1 FROM segment_members sm
                      WHERE sm.segment_id = :seg AND sm.user_id = cm.user_id)
"""

# Members on the list whose named traits changed since Klaviyo confirmed them (the ledger's
# traits_hash): sent again through the add path, costing only those members.
_CHANGED_SQL = f"""
    SELECT cm.user_id FROM connector_members cm
    JOIN segment_members s ON s.segment_id = :seg AND s.user_id = cm.user_id
    LEFT JOIN identities i ON i.user_id = cm.user_id
    WHERE cm.connector_id = :c AND cm.traits_hash IS DISTINCT FROM {TRAITS_HASH_SQL}
"""


def _joiners_sql(traits: list[str]) -> str:
    """The adds of a run: the delta's joiners, plus (when the connector names traits) the
    members whose traits changed. Without named traits every hash is NULL: no comparison."""
    joiners = "SELECT user_id, false AS refresh FROM run_delta WHERE joins"
    if not traits:
        return joiners
    return f"{joiners} UNION ALL SELECT c.user_id, true FROM ({_CHANGED_SQL}) c"


# Both directions of the delta in one pass: a hash full join of the segment against the ledger
# reads each table once (index-only when vacuumed); two anti-joins read each twice.
_DELTA_SQL = """
    SELECT COALESCE(s.user_id, cm.user_id) AS user_id, s.user_id IS NOT NULL AS joins,
           cm.email, cm.external_id, cm.profile_id
    FROM (SELECT user_id FROM segment_members WHERE segment_id = :seg) s
    FULL JOIN (SELECT user_id, email, external_id, profile_id FROM connector_members
               WHERE connector_id = :c) cm ON cm.user_id = s.user_id
    WHERE s.user_id IS NULL OR cm.user_id IS NULL
"""
# Enough for the hash of a few million ids in one batch instead of spilling to disk in eight.
_DELTA_WORK_MEM = "SET LOCAL work_mem = '128MB'"


@dataclass(frozen=True)
class StartOutcome:
    run_id: str | None
    reason: StartReason


def start_run(
    session: Session,
    connector_id: str,
    *,
    trigger: Trigger,
    recompute_id: str | None = None,
    allow_mass_removal: bool = False,
) -> StartOutcome:
    """Open a run for a connector, unless one is going: then the trigger is coalesced.

    The connector row lock serialises concurrent triggers; the partial unique index on
    running runs is the backstop.
    """
    connector = get_connector(session, connector_id, lock=True)
    if connector.status == ConnectorStatus.INACTIVE:
        return StartOutcome(None, StartReason.INACTIVE)
    if recompute_id is not None:
        seen = session.scalar(
            select(SyncRun.id).where(
                SyncRun.connector_id == connector_id, SyncRun.recompute_id == recompute_id
            )
        )
        if seen is not None:
            return StartOutcome(seen, StartReason.DUPLICATE)
    running = session.scalar(
        select(SyncRun.id).where(
            SyncRun.connector_id == connector_id, SyncRun.status == RunStatus.RUNNING
        )
    )
    if running is not None:
        connector.resync_requested = True
        connector.resync_trigger = Trigger.MASS_REMOVAL if allow_mass_removal else trigger
        return StartOutcome(running, StartReason.COALESCED)
    run = SyncRun(
        id=str(uuid.uuid4()),
        connector_id=connector_id,
        trigger=trigger,
        recompute_id=recompute_id,
        status=RunStatus.RUNNING,
        phase=RunPhase.PLANNING,
        allow_mass_removal=allow_mass_removal,
        # The clock, not the transaction start: a follow-up run opens in the transaction that
        # closes the previous one, and must not seem to start before it ended.
        started_at=datetime.now(UTC),
    )
    connector.resync_requested = False
    connector.resync_trigger = None
    session.add(run)
    session.flush()
    return StartOutcome(run.id, StartReason.STARTED)


@dataclass
class Plan:
    run_id: str
    status: PlanStatus
    add_batch_ids: list[int] = field(default_factory=list)
    remove_batch_ids: list[int] = field(default_factory=list)
    # Set by the call that planned the run (not by a repeated call): for the "run started" line.
    planned_now: bool = False
    connector_id: str | None = None
    trigger: str | None = None
    adds: int = 0
    removes: int = 0

    @property
    def batch_ids(self) -> list[int]:
        return self.add_batch_ids + self.remove_batch_ids


def plan_run(session: Session, run_id: str, settings: Settings) -> Plan:
    """Compute the delta into batch rows. Safe to call again: a planned run keeps its batches."""
    run = session.scalars(select(SyncRun).where(SyncRun.id == run_id).with_for_update()).one()
    if run.status != RunStatus.RUNNING:
        return Plan(run_id, PlanStatus.FINISHED)
    if run.phase != RunPhase.PLANNING:
        return _open_batches(session, run)
    connector = session.get_one(Connector, run.connector_id)
    params: dict[str, Any] = {
        "run": run.id,
        "seg": connector.segment_id,
        "c": connector.id,
        "names": list(connector.traits or []),
    }
    session.execute(text(_DELTA_WORK_MEM))
    session.execute(text(f"CREATE TEMP TABLE run_delta ON COMMIT DROP AS {_DELTA_SQL}"), params)
    adds = _rowcount(
        session.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, "
                "traits, traits_hash, refresh) "
                "SELECT :run, sm.user_id, :kind, "
                "(row_number() OVER (ORDER BY sm.user_id) - 1) / :size, "
                f"{SQL_EMAIL}, {SQL_EXTERNAL_ID}, {SELECTED_TRAITS_SQL}, {TRAITS_HASH_SQL}, "
                f"sm.refresh FROM ({_joiners_sql(connector.traits)}) sm "
                "LEFT JOIN identities i ON i.user_id = sm.user_id"
            ),
            {**params, "size": ADD_BATCH_SIZE, "kind": BatchKind.ADD},
        )
    )
    removes = _rowcount(
        session.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, profile_id) "
                "SELECT :run, d.user_id, :kind, (row_number() OVER (ORDER BY d.user_id) - 1) / :size, "
                "d.email, d.external_id, d.profile_id FROM run_delta d WHERE NOT d.joins"
            ),
            {**params, "size": REMOVE_BATCH_SIZE, "kind": BatchKind.REMOVE},
        )
    )
    if goes_direct(adds, settings):
        # A small delta's adds take the synchronous path (sync/direct.py, arithmetic in
        # sync/costs.py): batches of DIRECT_BATCH_SIZE, so a few run side by side.
        session.execute(
            text(
                "UPDATE sync_batch_items it SET seq = n.rn / :size FROM ("
                "SELECT user_id, row_number() OVER (ORDER BY user_id) - 1 AS rn "
                "FROM sync_batch_items WHERE run_id = :run AND kind = :kind) n "
                "WHERE it.run_id = :run AND it.kind = :kind AND it.user_id = n.user_id"
            ),
            {"run": run.id, "size": DIRECT_BATCH_SIZE, "kind": BatchKind.ADD},
        )
    run.planned_adds, run.planned_removes = adds, removes

    held = (
        _mass_removal_reason(session, connector, removes, settings)
        if not run.allow_mass_removal
        else None
    )
    if held is not None:
        run.status, run.phase, run.error = RunStatus.HELD, RunPhase.FINISHED, held
        run.finished_at = datetime.now(UTC)
        connector.last_error = held
        return Plan(run_id, PlanStatus.HELD, **_planned(run))

    session.execute(
        text(
            "INSERT INTO sync_batches (run_id, kind, seq, status, attempts, job_ids, added, removed, "
            "rejected, pending, permanent) SELECT DISTINCT run_id, kind, seq, 'pending', 0, CAST('{}' AS text[]), "
            "0, 0, 0, 0, false FROM sync_batch_items WHERE run_id = :run"
        ),
        {"run": run.id},
    )
    run.phase = RunPhase.DISPATCHED
    plan = _open_batches(session, run)
    if not plan.batch_ids:
        plan.status = PlanStatus.EMPTY
    for name, value in _planned(run).items():
        setattr(plan, name, value)
    return plan


def _planned(run: SyncRun) -> dict[str, Any]:
    return {
        "planned_now": True,
        "connector_id": run.connector_id,
        "trigger": run.trigger,
        "adds": run.planned_adds,
        "removes": run.planned_removes,
    }


def _rowcount(result: Result[Any]) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _open_batches(session: Session, run: SyncRun) -> Plan:
    plan = Plan(run.id, PlanStatus.DISPATCH)
    rows = session.execute(
        select(SyncBatch.id, SyncBatch.kind)
        .where(SyncBatch.run_id == run.id, SyncBatch.status.in_(OPEN_BATCH))
        .order_by(SyncBatch.kind, SyncBatch.seq)
    )
    for batch_id, kind in rows:
        (plan.add_batch_ids if kind == BatchKind.ADD else plan.remove_batch_ids).append(batch_id)
    return plan


def _mass_removal_reason(
    session: Session, connector: Connector, removes: int, settings: Settings
) -> str | None:
    """A broken segment query must never empty a customer's list."""
    if removes == 0:
        return None
    on_list = (
        session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.connector_id == connector.id)
        )
        or 0
    )
    share = removes / on_list if on_list else 0.0
    if share <= settings.mass_removal_threshold:
        return None
    return (
        f"sync held: it would remove {removes} of the {on_list} members on Klaviyo list "
        f"{connector.list_id} ({share:.0%}, above the {settings.mass_removal_threshold:.0%} guard); "
        f"check the segment, then run `segops-sync connectors resync {connector.id} --allow-mass-removal`"
    )


@dataclass(frozen=True)
class Preview:
    adds: int
    removes: int
    sample_adds: list[dict[str, str | None]]
    sample_removes: list[dict[str, str | None]]
    # members on the list whose named traits changed: sent again, not added
    updates: int = 0


def preview(session: Session, connector_id: str, sample: int = 20) -> Preview:
    """The pending delta, computed exactly as a run would, without touching Klaviyo."""
    connector = get_connector(session, connector_id)
    params = {"seg": connector.segment_id, "c": connector.id}
    adds, removes = delta_sizes(session, connector)
    updates = (
        session.scalar(
            text(f"SELECT count(*) FROM ({_CHANGED_SQL}) d"),
            {**params, "names": list(connector.traits)},
        )
        or 0
        if connector.traits
        else 0
    )
    sample_adds = [
        dict(r._mapping)
        for r in session.execute(
            text(f"{_ADDED_SQL} ORDER BY sm.user_id LIMIT :n"), {**params, "n": sample}
        )
    ]
    sample_removes = [
        dict(r._mapping)
        for r in session.execute(
            text(f"{_REMOVED_SQL} ORDER BY cm.user_id LIMIT :n"), {**params, "n": sample}
        )
    ]
    return Preview(adds, removes, sample_adds, sample_removes, updates)


def delta_sizes(session: Session, connector: Connector) -> tuple[int, int]:
    """(adds, removes) by the planner's own one-pass delta, without writing anything."""
    session.execute(text(_DELTA_WORK_MEM))
    row = session.execute(
        text(
            "SELECT count(*) FILTER (WHERE joins), count(*) FILTER (WHERE NOT joins) "
            f"FROM ({_DELTA_SQL}) d"
        ),
        {"seg": connector.segment_id, "c": connector.id},
    ).one()
    return int(row[0]), int(row[1])
