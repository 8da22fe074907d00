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

# A run's rejected items (``it``) are found through the batches (``b``) that counted a
# rejection or did not finish (and so counted nothing): one index probe per such batch.
# Filtering the run's items on their outcome read all of them, 10M for a first sync of 10M (the
# run's close took 9.6 s for it).
MAY_HOLD_REJECTED = "(b.rejected > 0 OR b.status <> 'done')"
REJECTED_OF_BATCH = (
    "JOIN sync_batch_items it ON it.run_id = b.run_id AND it.kind = b.kind AND it.seq = b.seq "
    "AND it.outcome = 'rejected'"
)
RUN_REJECTED_ITEMS = (
    f"FROM sync_batches b {REJECTED_OF_BATCH} WHERE b.run_id = :r AND {MAY_HOLD_REJECTED}"
)


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
    # the member's retry state now (member_rejections): waiting (for a context_identified event
    # that changes its data), due (its data changed: the next run sends it), or None (accepted
    # since, or no longer in the segment)
    retry: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_started_at": self.run_started_at.isoformat(),
            "user_id": self.user_id,
            "email": self.email,
            "external_id": self.external_id,
            "reason": self.reason,
            "retry": self.retry,
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
            "SELECT it.run_id, r.started_at, it.user_id, it.email, it.external_id, it.reason, "
            "mr.retry FROM sync_runs r "
            f"JOIN sync_batches b ON b.run_id = r.id AND {MAY_HOLD_REJECTED} {REJECTED_OF_BATCH} "
            "LEFT JOIN member_rejections mr ON mr.connector_id = r.connector_id "
            "AND mr.user_id = it.user_id "
            "WHERE r.connector_id = :c AND (CAST(:r AS text) IS NULL OR r.id = :r) "
            "ORDER BY r.started_at DESC, it.run_id, it.user_id LIMIT :n"
        ),
        {"c": connector_id, "r": run_id, "n": max(0, min(limit, MAX_REJECTED))},
    ).all()
    return [RejectedMember(*row) for row in rows]


# -- the retry state (member_rejections): a member rejected for its data waits for new data --

# A joiner this connector does not send: Klaviyo rejected it, and no context_identified event
# has changed its data since. ``{user}`` is the joiner's user_id column; ``:c`` the connector.
WAITING_SQL = (
    "EXISTS (SELECT 1 FROM member_rejections mr WHERE mr.connector_id = :c "
    "AND mr.user_id = {user} AND mr.retry = 'waiting')"
)


def has_waiting(session: Session, connector_id: str) -> bool:
    """Whether any joiner of the connector waits for new data: only then do the planner's
    statements carry the extra anti-join (the common case keeps its measured plans)."""
    return bool(
        session.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM member_rejections "
                "WHERE connector_id = :c AND retry = 'waiting')"
            ),
            {"c": connector_id},
        )
    )


def record_rejections(session: Session, run: SyncRun) -> None:
    """When a run closes: each member it saw rejected waits for new data, and each rejected
    member now confirmed on the list, or gone from the segment, waits no more.

    A context_identified event that arrived after the run started may already hold the fix the
    run did not send: such a member is due at once rather than waiting for another event."""
    session.execute(
        text(
            "INSERT INTO member_rejections AS mr (connector_id, user_id, reason, run_id, "
            "rejected_at, retry) "
            "SELECT :c, it.user_id, it.reason, it.run_id, now(), "
            "CASE WHEN (SELECT i.identified_at FROM identities i WHERE i.user_id = it.user_id) "
            f"> :started THEN 'due' ELSE 'waiting' END {RUN_REJECTED_ITEMS} "
            "ON CONFLICT (connector_id, user_id) DO UPDATE SET reason = EXCLUDED.reason, "
            "run_id = EXCLUDED.run_id, rejected_at = EXCLUDED.rejected_at, retry = EXCLUDED.retry"
        ),
        {"c": run.connector_id, "r": run.id, "started": run.started_at},
    )
    session.execute(
        text(
            "DELETE FROM member_rejections mr WHERE mr.connector_id = :c AND ("
            "EXISTS (SELECT 1 FROM connector_members cm WHERE cm.connector_id = :c "
            "AND cm.user_id = mr.user_id AND cm.confirmed) OR NOT EXISTS (SELECT 1 FROM "
            "segment_members sm JOIN connectors k ON k.segment_id = sm.segment_id "
            "WHERE k.id = :c AND sm.user_id = mr.user_id))"
        ),
        {"c": run.connector_id},
    )


def data_changed(session: Session, user_id: str) -> int:
    """A context_identified event changed the member's email or traits: every connector that
    rejected it sends it again at its next run. Returns the rejections made due."""
    result = session.execute(
        text("UPDATE member_rejections SET retry = 'due' WHERE user_id = :u AND retry = 'waiting'"),
        {"u": user_id},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
