"""Rejected members one by one: who Klaviyo refused, and its reason, so a person can fix the data."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from segops_sync.db.models import SyncRun

# The most a listing returns: the newest rejections first.
MAX_REJECTED = 10_000


class UnknownRun(LookupError):
    def __init__(self, connector_id: str, run_id: str) -> None:
        super().__init__(f"connector {connector_id!r} has no sync run {run_id!r}")


@dataclass(frozen=True)
class RejectedMember:
    run_id: str
    run_started_at: datetime
    user_id: str
    email: str | None
    external_id: str | None
    reason: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_started_at": self.run_started_at.isoformat(),
            "user_id": self.user_id,
            "email": self.email,
            "external_id": self.external_id,
            "reason": self.reason,
        }


def rejected_members(
    session: Session, connector_id: str, *, run_id: str | None = None, limit: int = MAX_REJECTED
) -> list[RejectedMember]:
    """The members Klaviyo rejected, newest run first (one run with ``run_id``), at most
    ``limit`` (MAX_REJECTED at most)."""
    if run_id is not None:
        owner = session.scalar(select(SyncRun.connector_id).where(SyncRun.id == run_id))
        if owner != connector_id:
            raise UnknownRun(connector_id, run_id)
    rows = session.execute(
        text(
            "SELECT it.run_id, r.started_at, it.user_id, it.email, it.external_id, it.reason "
            "FROM sync_batch_items it JOIN sync_runs r ON r.id = it.run_id "
            "WHERE r.connector_id = :c AND it.outcome = 'rejected' "
            "AND (CAST(:r AS text) IS NULL OR it.run_id = :r) "
            "ORDER BY r.started_at DESC, it.run_id, it.user_id LIMIT :n"
        ),
        {"c": connector_id, "r": run_id, "n": max(0, min(limit, MAX_REJECTED))},
    ).all()
    return [RejectedMember(*row) for row in rows]
