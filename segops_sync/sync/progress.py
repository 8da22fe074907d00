"""How far the running run of a connector is: decided members out of planned ones.

A member is decided once Klaviyo confirmed its outcome (added, removed, rejected, or left
pending for the next sync). Two counts on the run's items, by their primary key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from segops_sync.db.models import SyncRun


@dataclass(frozen=True)
class Progress:
    run_id: str
    started_at: datetime
    done: int
    total: int

    def as_json(self) -> dict[str, int]:
        return {"done": self.done, "total": self.total}


def running_progress(session: Session, connector_id: str) -> Progress | None:
    """None when no run of the connector is running."""
    run = session.execute(
        select(SyncRun.id, SyncRun.started_at, SyncRun.planned_adds, SyncRun.planned_removes).where(
            SyncRun.connector_id == connector_id, SyncRun.status == "running"
        )
    ).first()
    if run is None:
        return None
    # The total is the plan's (a batch writes its member rows only when it first runs).
    done = session.scalar(
        text("SELECT count(*) FROM sync_batch_items WHERE run_id = :r AND outcome IS NOT NULL"),
        {"r": run.id},
    )
    total = (run.planned_adds or 0) + (run.planned_removes or 0)
    return Progress(run.id, run.started_at, int(done or 0), max(total, int(done or 0)))
