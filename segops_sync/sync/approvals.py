"""A person's approval of a mass removal: the only thing that lifts the mass-removal guard.

``connectors resync --allow-mass-removal [--by NAME]`` (and the API's resync with
``{"allow_mass_removal": true}``) writes a ``mass_removal_approvals`` row, then triggers a sync.
The next run planned for the connector takes the row (:func:`take_approval`, in the planner's
transaction) while it is unexpired, whether or not that run needs it: one approval serves one
run, and an approval left unused cannot wait for the next broken segment. Nothing in a queue
message can approve: a ``segops.sync_connector`` message only asks for a sync, and the run it
starts reads approvals from PostgreSQL like any other.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from segops_sync.db.models import MassRemovalApproval, SyncRun
from segops_sync.db.queries import get_connector
from segops_sync.errors import InputError
from segops_sync.states import RunStatus

log = logging.getLogger(__name__)

# Long enough to run the resync and let a busy connector's running sync finish first; short
# enough that an approval given for one broken segment cannot serve a later one.
APPROVAL_LIFETIME = timedelta(hours=1)
MAX_APPROVER_LENGTH = 100  # the table's check constraint says the same


def approver_name(value: str, *, option: str = "--by") -> str:
    """Who approves, as it is recorded and shown: one printable line, at most 100 characters."""
    if not value.strip():
        raise InputError(f"{option} must not be empty: name who approves the mass removal")
    if len(value) > MAX_APPROVER_LENGTH:
        raise InputError(f"{option} is too long: at most {MAX_APPROVER_LENGTH} characters")
    if any(not ch.isprintable() for ch in value):
        raise InputError(f"{option} holds a control character: give a name on one line")
    return value


def approve_mass_removal(session: Session, connector_id: str, *, by: str) -> MassRemovalApproval:
    """Record a person's approval for the connector's next run. An unused earlier approval
    ends now (a newer one replaces it), so only one is ever waiting."""
    approver = approver_name(by)
    # the connector row lock orders this against a run being started for it
    get_connector(session, connector_id, lock=True)
    now = datetime.now(UTC)
    session.execute(
        update(MassRemovalApproval)
        .where(
            MassRemovalApproval.connector_id == connector_id,
            MassRemovalApproval.run_id.is_(None),
            MassRemovalApproval.expires_at > now,
        )
        .values(expires_at=now)
    )
    held_run_id = session.scalar(
        select(SyncRun.id)
        .where(SyncRun.connector_id == connector_id, SyncRun.status == RunStatus.HELD)
        .order_by(SyncRun.started_at.desc(), SyncRun.id.desc())
        .limit(1)
    )
    approval = MassRemovalApproval(
        connector_id=connector_id,
        held_run_id=held_run_id,
        approved_by=approver,
        approved_at=now,
        expires_at=now + APPROVAL_LIFETIME,
    )
    session.add(approval)
    session.flush()
    log.info(
        "mass removal approved by %s until %s (held run %s)",
        approver,
        approval.expires_at.isoformat(),
        held_run_id or "none",
        extra={"connector_id": connector_id},
    )
    return approval


def waiting_approval(
    session: Session, connector_id: str, *, lock: bool = False
) -> MassRemovalApproval | None:
    """The approval the connector's next planned run would take: its latest unexpired one not
    taken yet. ``lock`` to take it (``take_approval``); without, a plan only reads it."""
    query = (
        select(MassRemovalApproval)
        .where(
            MassRemovalApproval.connector_id == connector_id,
            MassRemovalApproval.run_id.is_(None),
            MassRemovalApproval.expires_at > datetime.now(UTC),
        )
        .order_by(MassRemovalApproval.id.desc())
        .limit(1)
    )
    return session.scalars(query.with_for_update() if lock else query).one_or_none()


def take_approval(session: Session, connector_id: str, run_id: str) -> MassRemovalApproval | None:
    """In the transaction that plans a run: the connector's waiting approval, now this run's."""
    approval = waiting_approval(session, connector_id, lock=True)
    if approval is not None:
        approval.run_id = run_id
    return approval
