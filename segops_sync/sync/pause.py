"""Pausing and resuming a connector (``connectors pause`` / ``resume``, ``POST …/pause``).

Pausing sets the connector ``paused`` and marks its running run, if any, to stop: the run's
``abort_reason`` becomes :data:`PAUSE_REASON`. Every batch looks at it where it would send
something new to Klaviyo (its step's start, and before its next bulk job, list write or
DELETE), and stops there without sending; what it already sent is still settled, so the ledger
holds exactly what Klaviyo confirmed. Once no batch is open, the run closes ``cancelled``
(sync/runs.py). While paused, no trigger starts a run (``StartReason.PAUSED``); resuming sets
the connector ``active`` again and one run with trigger ``resume`` catches up.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from segops_sync.db.models import Connector, SyncRun
from segops_sync.db.queries import get_connector
from segops_sync.errors import InputError
from segops_sync.states import ConnectorStatus, RunStatus

# The run's abort_reason while it stops for a pause; the text of its stopped batches' error.
PAUSE_REASON = "the connector was paused: the sync stopped at a batch boundary"


def stops_for_pause(abort_reason: str | None) -> bool:
    return abort_reason == PAUSE_REASON


@dataclass(frozen=True)
class Paused:
    connector: Connector
    stopping_run_id: str | None  # the running run that now stops at its next batch boundary
    already: bool = False  # it was paused before: nothing changed


def pause_connector(session: Session, connector_id: str) -> Paused:
    """Pause an active connector (or one in error); pausing a paused one changes nothing.
    An inactive connector is never synced: there is nothing to pause (InputError)."""
    # The running run's row before the connector's, in the order finish_run locks them (run,
    # then connector): the other order could deadlock with a run closing at this moment.
    session.scalars(
        select(SyncRun.id)
        .where(SyncRun.connector_id == connector_id, SyncRun.status == RunStatus.RUNNING)
        .with_for_update()
    ).all()
    connector = get_connector(session, connector_id, lock=True)
    if connector.status == ConnectorStatus.PAUSED:
        return Paused(connector, None, already=True)
    if connector.status == ConnectorStatus.INACTIVE:
        raise InputError(f"connector {connector_id} is inactive: there is no sync to pause")
    connector.status = ConnectorStatus.PAUSED
    # Triggers queued behind the running run are served by the resume's catch-up run.
    connector.resync_requested = False
    connector.resync_trigger = None
    # A permanent failure already stopping the run keeps its reason: that run ends failed.
    # (One told to stop by an earlier pause, then resumed before it closed, stops all the same.)
    stopping = session.scalar(
        update(SyncRun)
        .where(
            SyncRun.connector_id == connector_id,
            SyncRun.status == RunStatus.RUNNING,
            or_(SyncRun.abort_reason.is_(None), SyncRun.abort_reason == PAUSE_REASON),
        )
        .values(abort_reason=PAUSE_REASON)
        .returning(SyncRun.id)
    )
    return Paused(connector, stopping)


def resume_connector(session: Session, connector_id: str) -> Connector:
    """Set a paused connector ``active`` again; the caller starts its catch-up run
    (``Trigger.RESUME``) after commit. Any other status is refused (InputError)."""
    connector = get_connector(session, connector_id, lock=True)
    if connector.status != ConnectorStatus.PAUSED:
        raise InputError(
            f"connector {connector_id} is not paused (it is {connector.status}): nothing to resume"
        )
    connector.status = ConnectorStatus.ACTIVE
    return connector


def run_paused(session: Session, run_id: str) -> bool:
    """Whether the run was told to stop for a pause (a batch asks before it sends more)."""
    return stops_for_pause(session.scalar(select(SyncRun.abort_reason).where(SyncRun.id == run_id)))


def refuse_if_paused(connector: Connector) -> None:
    """A manual resync of a paused connector would start nothing: say so instead."""
    if connector.status == ConnectorStatus.PAUSED:
        raise InputError(
            f"connector {connector.id} is paused: resume it first "
            f"(`segops-sync connectors resume {connector.id}` syncs once to catch up)"
        )
