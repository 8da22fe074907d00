"""The JSON shapes of INTERFACE.md, shared by the CLI's ``--json`` and the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from segops_sync.db.models import Connector, SyncRun


def connector_json(connector: Connector) -> dict[str, Any]:
    return {
        "id": connector.id,
        "type": connector.type,
        "segment_id": connector.segment_id,
        "list_id": connector.list_id,
        "status": connector.status,
        "last_synced_at": iso(connector.last_synced_at),
        "last_error": connector.last_error,
        "api_key": connector.api_key_hint,  # the redacted hint; the key itself is never stored
    }


def run_json(run: SyncRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "connector_id": run.connector_id,
        "trigger": run.trigger,
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "status": run.status,
        "added": run.added,
        "removed": run.removed,
        "rejected": run.rejected,
        "error": run.error,
    }


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
