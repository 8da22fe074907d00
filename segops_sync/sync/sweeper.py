"""Finding runs that stopped moving: a lost chord, a crash mid-fan-out, a dead planner.

Every batch invocation touches its row, so "no progress" means no batch of the run has run
for ``stuck_after`` seconds. Redispatching is safe because batches are idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from segops_sync.db.models import SyncBatch, SyncRun
from segops_sync.states import OPEN_BATCH, BatchKind, RunPhase, RunStatus


class StuckAction(StrEnum):
    PLAN = "plan"  # the planner died: plan again
    FINISH = "finish"  # every batch is closed but nobody closed the run
    REDISPATCH = "redispatch"  # open batches nobody works on: send them again


@dataclass
class StuckRun:
    run_id: str
    action: StuckAction
    add_batch_ids: list[int] = field(default_factory=list)
    remove_batch_ids: list[int] = field(default_factory=list)


def find_stuck_runs(session: Session, stuck_after: float) -> list[StuckRun]:
    now = datetime.now(UTC)
    return _claim_runs(session, now, now - timedelta(seconds=stuck_after))


def find_open_runs(session: Session) -> list[StuckRun]:
    """Every running run, however recent its progress: Redis lost its data (the fleet found
    its marker gone, sync/fleet/liveness.py), so queued messages and chord state may be gone with
    it. PostgreSQL knows every open run and batch; re-sending them is safe (batches are
    idempotent, and one copy of a batch runs at a time)."""
    now = datetime.now(UTC)
    return _claim_runs(session, now, None)


def _claim_runs(session: Session, now: datetime, cutoff: datetime | None) -> list[StuckRun]:
    last_progress = (
        select(SyncBatch.run_id, func.max(SyncBatch.updated_at).label("at"))
        .group_by(SyncBatch.run_id)
        .subquery()
    )
    query = (
        select(SyncRun.id, SyncRun.phase)
        .outerjoin(last_progress, last_progress.c.run_id == SyncRun.id)
        .where(SyncRun.status == RunStatus.RUNNING)
        .with_for_update(of=SyncRun, skip_locked=True)
    )
    if cutoff is not None:
        query = query.where(func.coalesce(last_progress.c.at, SyncRun.started_at) < cutoff)
    runs = session.execute(query).all()
    stuck: list[StuckRun] = []
    for run_id, phase in runs:
        if phase == RunPhase.PLANNING:
            session.execute(update(SyncRun).where(SyncRun.id == run_id).values(started_at=now))
            stuck.append(StuckRun(run_id, StuckAction.PLAN))
            continue
        open_batches = session.execute(
            select(SyncBatch.id, SyncBatch.kind).where(
                SyncBatch.run_id == run_id, SyncBatch.status.in_(OPEN_BATCH)
            )
        ).all()
        if not open_batches:
            stuck.append(StuckRun(run_id, StuckAction.FINISH))
            continue
        # Touch them so the next sweep waits a full period before trying again.
        session.execute(
            update(SyncBatch)
            .where(SyncBatch.id.in_([b for b, _ in open_batches]))
            .values(updated_at=now)
        )
        item = StuckRun(run_id, StuckAction.REDISPATCH)
        for batch_id, kind in open_batches:
            (item.add_batch_ids if kind == BatchKind.ADD else item.remove_batch_ids).append(
                batch_id
            )
        stuck.append(item)
    return stuck
