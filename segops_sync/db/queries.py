"""Reading connectors and their runs: the lookups every room shares."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from segops_sync.db.models import Connector, SyncRun
from segops_sync.errors import UnknownConnector


def get_connector(session: Session, connector_id: str, *, lock: bool = False) -> Connector:
    stmt = select(Connector).where(Connector.id == connector_id)
    if lock:
        stmt = stmt.with_for_update()
    connector = session.scalars(stmt).one_or_none()
    if connector is None:
        raise UnknownConnector(connector_id)
    return connector


def list_connectors(session: Session) -> list[Connector]:
    return list(session.scalars(select(Connector).order_by(Connector.created_at, Connector.id)))


def list_runs(session: Session, connector_id: str, limit: int | None = 100) -> list[SyncRun]:
    """A connector's runs, newest first: the newest ``limit`` (None: every one)."""
    get_connector(session, connector_id)
    stmt = (
        select(SyncRun)
        .where(SyncRun.connector_id == connector_id)
        .order_by(SyncRun.started_at.desc(), SyncRun.id.desc())
        .limit(limit)
        .options(selectinload(SyncRun.approval))  # run_json shows it: one query, not one a run
    )
    return list(session.scalars(stmt))
