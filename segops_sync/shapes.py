"""The JSON shapes of docs/contract.md, shared by the CLI's ``--json`` and the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from segops_sync.db.models import Connector, MassRemovalApproval, SyncRun


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
        "traits": list(connector.traits or []),
        # as Klaviyo last reported it (null: not checked yet); double_opt_in means API
        # membership subscribes nobody
        "opt_in_process": connector.opt_in_process,
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
        # beyond the contract's fields (issue 14)
        "updated": run.updated,  # members whose changed traits were sent again
        "traits_dropped": run.traits_dropped,  # trait values Klaviyo would refuse, left out
        "suppressed": run.suppressed,  # on the list, email suppressed (counted by a read-back)
        "rejected_members": rejected_members_url(run),
        "verify": (
            {
                "in_list": run.verify_in_list,
                "expected": run.verify_expected,
                "missing": run.verify_missing,
                "extra": run.verify_extra,
            }
            if run.verify_in_list is not None
            else None
        ),
        # the person's approval this run took (docs/contract.md "Mass-removal approvals")
        "approval": approval_json(run.approval),
    }


def approval_json(approval: MassRemovalApproval | None) -> dict[str, Any] | None:
    if approval is None:
        return None
    return {
        "by": approval.approved_by,
        "at": iso(approval.approved_at),
        "expires_at": iso(approval.expires_at),
        "held_run_id": approval.held_run_id,  # the held run it approved (null: none was held)
    }


def rejected_members_url(run: SyncRun) -> str | None:
    """Where the API lists a run's rejected members, one by one (None: it rejected nobody)."""
    if not run.rejected:
        return None
    return f"/v1/connectors/{run.connector_id}/runs/{run.id}/rejected"


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
