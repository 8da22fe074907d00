"""The PostgreSQL side of recovering from dead workers (see ``sync/fleet/liveness.py``).

A batch re-sent after its worker died runs outside the run's chord, so the chord's body may
never fire: the batch that finishes a run's last open batch closes the run itself (a barrier on
the batch rows; closing is idempotent, so the chord's body closing it too costs nothing).
"""

from __future__ import annotations

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, aliased

from segops_sync.db.models import SyncBatch, SyncRun
from segops_sync.states import OPEN_BATCH, BatchKind, BatchStatus, RunStatus


def run_ready_to_close(session: Session, batch_id: int) -> str | None:
    """The batch's run, if it is still running and none of its batches is open."""
    other = aliased(SyncBatch)
    return session.scalar(
        select(SyncRun.id)
        .join(SyncBatch, SyncBatch.run_id == SyncRun.id)
        .where(
            SyncBatch.id == batch_id,
            SyncRun.status == RunStatus.RUNNING,
            ~exists().where(other.run_id == SyncRun.id, other.status.in_(OPEN_BATCH)),
        )
    )


def fail_crashing_batch(session: Session, batch_id: int, crashes: int) -> bool:
    """Give up a batch whose deliveries kept killing their worker process (a poison pill)."""
    row = session.execute(
        select(SyncBatch.kind, SyncBatch.seq, SyncRun.connector_id)
        .join(SyncRun, SyncRun.id == SyncBatch.run_id)
        .where(SyncBatch.id == batch_id)
    ).one_or_none()
    if row is None:
        return False
    kind, seq, connector_id = row
    what = "adding members" if kind == BatchKind.ADD else "removing members"
    error = (
        f"a batch of this sync ({what}, batch {seq}) killed its worker process {crashes} times "
        "in a row (out of memory, or a crash) and was given up so that other syncs keep going; "
        "check the worker's logs and memory limit, then run "
        f"`segops-sync connectors resync {connector_id}`"
    )
    result = session.execute(
        update(SyncBatch)
        .where(SyncBatch.id == batch_id, SyncBatch.status.in_(OPEN_BATCH))
        .values(status=BatchStatus.FAILED, error=error, permanent=False)
        .returning(SyncBatch.id)
    )
    return result.first() is not None
