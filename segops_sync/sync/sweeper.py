"""Finding runs that stopped moving: a lost chord, a crash mid-fan-out, a dead planner.

Every batch invocation touches its row, so "no progress" means no batch of the run has run
for ``stuck_after`` seconds. Redispatching is safe because batches are idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from segops_sync.db.models import SyncBatch, SyncRun


@dataclass
class StuckRun:
    run_id: str
    action: str  # plan | finish | redispatch
    add_batch_ids: list[int] = field(default_factory=list)
    remove_batch_ids: list[int] = field(default_factory=list)


def find_stuck_runs(session: Session, stuck_after: float) -> list[StuckRun]:
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=stuck_after)
    last_progress = (
        select(SyncBatch.run_id, func.max(SyncBatch.updated_at).label("at"))
        .group_by(SyncBatch.run_id)
        .subquery()
    )
    runs = session.execute(
        select(SyncRun.id, SyncRun.phase)
        .outerjoin(last_progress, last_progress.c.run_id == SyncRun.id)
        .where(
            SyncRun.status == "running",
            func.coalesce(last_progress.c.at, SyncRun.started_at) < cutoff,
        )
        .with_for_update(of=SyncRun, skip_locked=True)
    ).all()
    stuck: list[StuckRun] = []
    for run_id, phase in runs:
        if phase == "planning":
            session.execute(update(SyncRun).where(SyncRun.id == run_id).values(started_at=now))
            stuck.append(StuckRun(run_id, "plan"))
            continue
        open_batches = session.execute(
            select(SyncBatch.id, SyncBatch.kind).where(
                SyncBatch.run_id == run_id, SyncBatch.status.in_(("pending", "submitted"))
            )
        ).all()
        if not open_batches:
            stuck.append(StuckRun(run_id, "finish"))
            continue
        # Touch them so the next sweep waits a full period before trying again.
        session.execute(
            update(SyncBatch)
            .where(SyncBatch.id.in_([b for b, _ in open_batches]))
            .values(updated_at=now)
        )
        item = StuckRun(run_id, "redispatch")
        for batch_id, kind in open_batches:
            (item.add_batch_ids if kind == "add" else item.remove_batch_ids).append(batch_id)
        stuck.append(item)
    return stuck
