"""The shapes of docs/contract.md, each spelled once: what a connector's input fields accept,
and the JSON of a connector and of a run.

The input rules serve the connector service's checks (CLI and API alike) and the API's request
schemas. The JSON field tables give both the JSON (the CLI's ``--json`` and the HTTP API) and
its schema in the OpenAPI document: a field added to a table is in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from segops_sync.states import ConnectorStatus, MemberAction, RejectionRetry, RunStatus

if TYPE_CHECKING:  # read through attributes only: the API's input checks load no database
    from segops_sync.db.models import Connector, MassRemovalApproval, SyncRun
    from segops_sync.klaviyo import KlaviyoList
    from segops_sync.sync.member_trace import (
        ConnectorTrace,
        LedgerState,
        MemberTrace,
        RejectionState,
        TracedRun,
    )

# -- what a connector accepts --------------------------------------------------------------

CONNECTOR_TYPES = ("klaviyo",)  # the first is the default
LIST_ID_PATTERN = "^[A-Za-z0-9]{6}$"
API_KEY_PATTERN = "^pk_[A-Za-z0-9_]{8,}$"
SEGMENT_ID_MAX = 200
# the statuses a person sets; "error" is the sync's to set
SETTABLE_STATUSES = (ConnectorStatus.ACTIVE.value, ConnectorStatus.INACTIVE.value)

# -- what a connector and a run show -------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class JsonField(Generic[T]):
    """One field of a JSON shape: its name, its JSON Schema, and its value for an object."""

    name: str
    schema: dict[str, Any]
    value: Callable[[T], Any]


def shape_json(fields: Sequence[JsonField[T]], item: T) -> dict[str, Any]:
    """The JSON of ``item``: every field of the table, in the table's order."""
    return {f.name: f.value(item) for f in fields}


def shape_schema(
    fields: Sequence[JsonField[Any]],
    *,
    nullable: bool = False,
    description: str | None = None,
    required: bool = True,
) -> dict[str, Any]:
    """The JSON Schema (OpenAPI 3.0) of the objects ``shape_json`` makes from this table."""
    schema: dict[str, Any] = {"type": "object"}
    if nullable:
        schema["nullable"] = True
    if description is not None:
        schema["description"] = description
    schema["properties"] = {f.name: f.schema for f in fields}
    if required:
        schema["required"] = [f.name for f in fields]
    return schema


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


STRING: dict[str, Any] = {"type": "string"}
NULLABLE_STRING: dict[str, Any] = {"type": "string", "nullable": True}
INTEGER: dict[str, Any] = {"type": "integer"}
TIME: dict[str, Any] = {"type": "string", "format": "date-time"}
NULLABLE_TIME: dict[str, Any] = {"type": "string", "format": "date-time", "nullable": True}

CONNECTOR_FIELDS: tuple[JsonField[Connector], ...] = (
    JsonField("id", STRING, lambda c: c.id),
    JsonField("type", {"type": "string", "enum": list(CONNECTOR_TYPES)}, lambda c: c.type),
    JsonField("segment_id", STRING, lambda c: c.segment_id),
    JsonField("list_id", STRING, lambda c: c.list_id),
    JsonField(
        "status",
        {"type": "string", "enum": [s.value for s in ConnectorStatus]},
        lambda c: c.status,
    ),
    JsonField("last_synced_at", NULLABLE_TIME, lambda c: iso(c.last_synced_at)),
    JsonField("last_error", NULLABLE_STRING, lambda c: c.last_error),
    JsonField(
        "api_key",
        {"type": "string", "description": "redacted hint, never the whole key"},
        lambda c: c.api_key_hint,  # the key itself is never stored
    ),
    JsonField("traits", {"type": "array", "items": STRING}, lambda c: list(c.traits or [])),
    # double_opt_in means API membership subscribes nobody
    JsonField(
        "opt_in_process",
        {
            "type": "string",
            "nullable": True,
            "description": "as Klaviyo last reported it: double_opt_in or single_opt_in",
        },
        lambda c: c.opt_in_process,
    ),
)

# a run's read-back of the list (null: the run did not verify)
VERIFY_FIELDS: tuple[JsonField[SyncRun], ...] = (
    JsonField("in_list", INTEGER, lambda r: r.verify_in_list),
    JsonField("expected", INTEGER, lambda r: r.verify_expected),
    JsonField("missing", INTEGER, lambda r: r.verify_missing),
    JsonField("extra", INTEGER, lambda r: r.verify_extra),
)

# the person's approval a run took (docs/contract.md "Mass-removal approvals")
APPROVAL_FIELDS: tuple[JsonField[MassRemovalApproval], ...] = (
    JsonField(
        "by",
        {"type": "string", "description": "who approved (api-token over the API)"},
        lambda a: a.approved_by,
    ),
    JsonField("at", TIME, lambda a: iso(a.approved_at)),
    JsonField("expires_at", TIME, lambda a: iso(a.expires_at)),
    JsonField(
        "held_run_id",
        {**NULLABLE_STRING, "description": "the held run it approved (null: none was held)"},
        lambda a: a.held_run_id,
    ),
)


def rejected_members_url(run: SyncRun) -> str | None:
    """Where the API lists a run's rejected members, one by one (None: it rejected nobody)."""
    if not run.rejected:
        return None
    return f"/v1/connectors/{run.connector_id}/runs/{run.id}/rejected"


def approval_json(approval: MassRemovalApproval | None) -> dict[str, Any] | None:
    return shape_json(APPROVAL_FIELDS, approval) if approval is not None else None


def _verify_json(run: SyncRun) -> dict[str, Any] | None:
    return shape_json(VERIFY_FIELDS, run) if run.verify_in_list is not None else None


RUN_FIELDS: tuple[JsonField[SyncRun], ...] = (
    JsonField("id", STRING, lambda r: r.id),
    JsonField("connector_id", STRING, lambda r: r.connector_id),
    JsonField("trigger", STRING, lambda r: r.trigger),
    # a run row is written as it starts: started_at is never null
    JsonField("started_at", TIME, lambda r: iso(r.started_at)),
    JsonField("finished_at", NULLABLE_TIME, lambda r: iso(r.finished_at)),
    JsonField(
        "status", {"type": "string", "enum": [s.value for s in RunStatus]}, lambda r: r.status
    ),
    JsonField("added", INTEGER, lambda r: r.added),
    JsonField("removed", INTEGER, lambda r: r.removed),
    JsonField("rejected", INTEGER, lambda r: r.rejected),
    JsonField("error", NULLABLE_STRING, lambda r: r.error),
    # beyond the contract's fields: the run's outcome in detail
    JsonField(
        "updated",
        {"type": "integer", "description": "members whose changed traits were resent"},
        lambda r: r.updated,
    ),
    JsonField(
        "traits_dropped",
        {"type": "integer", "description": "trait values Klaviyo would refuse"},
        lambda r: r.traits_dropped,  # left out of what was sent
    ),
    JsonField(
        "suppressed",
        {"type": "integer", "description": "members whose email is suppressed"},
        lambda r: r.suppressed,  # on the list, counted by a read-back
    ),
    JsonField(
        "rejected_members",
        {**NULLABLE_STRING, "description": "path listing this run's rejected members"},
        rejected_members_url,
    ),
    # no "required" here: the document has published the verify object without one
    JsonField("verify", shape_schema(VERIFY_FIELDS, nullable=True, required=False), _verify_json),
    JsonField(
        "approval",
        shape_schema(
            APPROVAL_FIELDS,
            nullable=True,
            description="the person's mass-removal approval this run took (null: none)",
        ),
        lambda r: approval_json(r.approval),
    ),
)


# a list of POST /v1/klaviyo/lists (docs/contract.md "List picker")
KLAVIYO_LIST_FIELDS: tuple[JsonField[KlaviyoList], ...] = (
    JsonField("id", STRING, lambda k: k.id),
    JsonField("name", STRING, lambda k: k.name),
    JsonField(
        "profile_count",
        {
            "type": "integer",
            "nullable": True,
            "description": "members on the list; null when not counted (only the first lists are)",
        },
        lambda k: k.profile_count,
    ),
)


def klaviyo_list_json(found: KlaviyoList) -> dict[str, Any]:
    return shape_json(KLAVIYO_LIST_FIELDS, found)


def connector_json(connector: Connector) -> dict[str, Any]:
    return shape_json(CONNECTOR_FIELDS, connector)


def run_json(run: SyncRun) -> dict[str, Any]:
    return shape_json(RUN_FIELDS, run)


# -- one member across every connector (members trace, GET /v1/members/{user_id}) -------------

BOOLEAN: dict[str, Any] = {"type": "boolean"}

TRACE_LEDGER_FIELDS: tuple[JsonField[LedgerState], ...] = (
    JsonField(
        "confirmed",
        {**BOOLEAN, "description": "false: sent, Klaviyo's answer never recorded (maybe on it)"},
        lambda e: e.confirmed,
    ),
    JsonField("profile_id", NULLABLE_STRING, lambda e: e.profile_id),
    JsonField("added_at", TIME, lambda e: iso(e.added_at)),
    JsonField(
        "suppressed",
        {**BOOLEAN, "description": "Klaviyo suppresses its email (the last read-back saw it)"},
        lambda e: e.suppressed,
    ),
)

TRACE_REJECTION_FIELDS: tuple[JsonField[RejectionState], ...] = (
    JsonField("reason", {**NULLABLE_STRING, "description": "Klaviyo's reason"}, lambda r: r.reason),
    JsonField("run_id", NULLABLE_STRING, lambda r: r.run_id),
    JsonField("rejected_at", TIME, lambda r: iso(r.rejected_at)),
    JsonField(
        "retry",
        {
            "type": "string",
            "enum": [v.value for v in RejectionRetry],
            "description": "waiting: not sent again until its data changes; due: sent next run",
        },
        lambda r: r.retry,
    ),
)

TRACE_RUN_FIELDS: tuple[JsonField[TracedRun], ...] = (
    JsonField("run_id", STRING, lambda r: r.run_id),
    JsonField("trigger", STRING, lambda r: r.trigger),
    JsonField(
        "status", {"type": "string", "enum": [s.value for s in RunStatus]}, lambda r: r.status
    ),
    JsonField("started_at", TIME, lambda r: iso(r.started_at)),
    JsonField("finished_at", NULLABLE_TIME, lambda r: iso(r.finished_at)),
    JsonField(
        "action",
        {"type": "string", "enum": [a.value for a in MemberAction]},
        lambda r: r.action,
    ),
    JsonField(
        "reason",
        {
            **NULLABLE_STRING,
            "description": "Klaviyo's reason of a rejection; why a removal is pending or a "
            "member unsettled",
        },
        lambda r: r.reason,
    ),
    JsonField(
        "dropped_traits",
        {
            "type": "array",
            "items": STRING,
            "description": "traits left out of what was sent: Klaviyo would refuse their values",
        },
        lambda r: list(r.dropped_traits),
    ),
)

TRACE_CONNECTOR_FIELDS: tuple[JsonField[ConnectorTrace], ...] = (
    JsonField("connector_id", STRING, lambda c: c.connector_id),
    JsonField("segment_id", STRING, lambda c: c.segment_id),
    JsonField("list_id", STRING, lambda c: c.list_id),
    JsonField(
        "status",
        {"type": "string", "enum": [s.value for s in ConnectorStatus]},
        lambda c: c.status,
    ),
    JsonField("in_segment", BOOLEAN, lambda c: c.in_segment),
    JsonField(
        "on_list",
        {**BOOLEAN, "description": "the ledger has the member on the connector's list"},
        lambda c: c.on_list,
    ),
    JsonField(
        "ledger",
        shape_schema(TRACE_LEDGER_FIELDS, nullable=True, description="null: not on the list"),
        lambda c: shape_json(TRACE_LEDGER_FIELDS, c.ledger) if c.ledger else None,
    ),
    JsonField(
        "rejection",
        shape_schema(
            TRACE_REJECTION_FIELDS,
            nullable=True,
            description="Klaviyo rejected the member's data (null: no rejection stands)",
        ),
        lambda c: shape_json(TRACE_REJECTION_FIELDS, c.rejection) if c.rejection else None,
    ),
    JsonField(
        "runs",
        {
            "type": "array",
            "items": shape_schema(TRACE_RUN_FIELDS),
            "description": "what each kept run did to the member, newest first (at most 500)",
        },
        lambda c: [shape_json(TRACE_RUN_FIELDS, r) for r in c.runs],
    ),
)

MEMBER_TRACE_FIELDS: tuple[JsonField[MemberTrace], ...] = (
    JsonField("user_id", STRING, lambda t: t.user_id),
    JsonField(
        "retention_days",
        {**INTEGER, "description": "runs older than this are not traced (SEGOPS_RETENTION_DAYS)"},
        lambda t: t.retention_days,
    ),
    JsonField(
        "connectors",
        {
            "type": "array",
            "items": shape_schema(TRACE_CONNECTOR_FIELDS),
            "description": "connectors whose segment, ledger, rejections or kept runs name "
            "the member (empty: none does)",
        },
        lambda t: [shape_json(TRACE_CONNECTOR_FIELDS, c) for c in t.connectors],
    ),
)


def member_trace_json(trace: MemberTrace) -> dict[str, Any]:
    return shape_json(MEMBER_TRACE_FIELDS, trace)
