"""One member across every connector (``members trace``, ``GET /v1/members/{user_id}``): is it
in the segment, does the ledger have it on the list, was it rejected, and what each run whose
member details are kept did to it.

Every read is an index probe, so the answer takes the same few milliseconds at any segment size:

- the connectors (a small table, read whole) and, per connector, one probe of each primary key
  ``segment_members (segment_id, user_id)``, ``connector_members (connector_id, user_id)`` and
  ``member_rejections (connector_id, user_id)``;
- the runs whose member details are kept (finished within SEGOPS_RETENTION_DAYS and not purged,
  through the partial index ``ix_sync_runs_unpurged``, and the running ones, through
  ``uq_sync_runs_one_running``), and for each one probe of ``sync_batch_items (run_id, user_id)``,
  then the item's batch by ``(run_id, kind, seq)``: a cost that grows with the number of kept
  runs of the deployment, never with the size of a segment;
- the running runs' batches that have not written their members yet (a batch writes them when
  it first runs): the run's batches by ``(run_id, kind, seq)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from segops_sync.config import get_settings
from segops_sync.errors import InputError
from segops_sync.states import (
    OPEN_BATCH,
    BatchKind,
    ConnectorStatus,
    MemberAction,
    RejectionRetry,
    RunStatus,
)
from segops_sync.sync.inputs.identity import MAX_KNOWN_USER_ID, known_user_id_problem

MAX_TRACED_USER_ID = MAX_KNOWN_USER_ID
# Runs listed per connector, newest first: a member rejected at every run of a 5-minute
# recompute would otherwise list thousands.
MAX_RUNS = 500


@dataclass(frozen=True)
class LedgerState:
    """The member's ledger row: sent to the list (``confirmed`` false: outcome never recorded)."""

    confirmed: bool
    profile_id: str | None
    added_at: datetime
    suppressed: bool


@dataclass(frozen=True)
class RejectionState:
    """The member's ``member_rejections`` row: not sent again until its data changes."""

    reason: str | None
    run_id: str | None
    rejected_at: datetime
    retry: RejectionRetry


@dataclass(frozen=True)
class TracedRun:
    run_id: str
    trigger: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    action: MemberAction
    # Klaviyo's reason of a rejection, ours of a pending or off-list removal, the batch's or
    # run's error of an unsettled member
    reason: str | None
    dropped_traits: tuple[str, ...]


@dataclass(frozen=True)
class ConnectorTrace:
    connector_id: str
    segment_id: str
    list_id: str
    status: ConnectorStatus
    in_segment: bool
    ledger: LedgerState | None
    rejection: RejectionState | None
    runs: tuple[TracedRun, ...]

    @property
    def on_list(self) -> bool:
        return self.ledger is not None


@dataclass(frozen=True)
class MemberTrace:
    user_id: str
    retention_days: int
    # connectors whose segment holds the member, whose ledger or rejections have it, or whose
    # kept runs name it; oldest connector first
    connectors: tuple[ConnectorTrace, ...]


def check_user_id(user_id: str) -> str:
    """The user id as given, or InputError (the id is not echoed: it may be an email)."""
    if known_user_id_problem(user_id) is not None:
        raise InputError(
            f"user_id must be 1 to {MAX_TRACED_USER_ID} characters, none of them a control "
            "character"
        )
    return user_id


# Each LATERAL ... LIMIT 1 stays a probe of its primary key per connector: a plain join could be
# planned as a scan of the million-row tables for the user id, which they have no index on.
_CONNECTORS_SQL = """
SELECT c.id, c.segment_id, c.list_id, c.status,
       EXISTS (SELECT 1 FROM segment_members sm
               WHERE sm.segment_id = c.segment_id AND sm.user_id = :u) AS in_segment,
       cm.confirmed, cm.profile_id, cm.added_at, cm.suppressed,
       mr.reason, mr.run_id, mr.rejected_at, mr.retry
FROM connectors c
LEFT JOIN LATERAL (SELECT confirmed, profile_id, added_at, suppressed FROM connector_members
                   WHERE connector_id = c.id AND user_id = :u LIMIT 1) cm ON true
LEFT JOIN LATERAL (SELECT reason, run_id, rejected_at, retry FROM member_rejections
                   WHERE connector_id = c.id AND user_id = :u LIMIT 1) mr ON true
ORDER BY c.created_at, c.id
"""

_RUN_COLUMNS = "id, connector_id, trigger, status, started_at, finished_at, error, abort_reason"
# The kept runs: finished inside the window and not purged (the partial index on finished_at),
# and the running one of each connector (the partial unique index).
_KEPT_RUNS = f"""
(SELECT {_RUN_COLUMNS} FROM sync_runs
 WHERE purged_at IS NULL AND finished_at IS NOT NULL AND finished_at >= :cutoff
 UNION ALL
 SELECT {_RUN_COLUMNS} FROM sync_runs WHERE status = 'running' AND finished_at IS NULL) r
"""

_ITEMS_SQL = f"""
SELECT r.connector_id, r.id, r.trigger, r.status, r.started_at, r.finished_at,
       COALESCE(r.error, r.abort_reason) AS run_error,
       it.outcome, it.reason, it.dropped_traits, b.status AS batch_status, b.error AS batch_error
FROM {_KEPT_RUNS}
JOIN LATERAL (SELECT kind, seq, outcome, reason, dropped_traits FROM sync_batch_items
              WHERE run_id = r.id AND user_id = :u LIMIT 1) it ON true
LEFT JOIN LATERAL (SELECT status, error FROM sync_batches
                   WHERE run_id = r.id AND kind = it.kind AND seq = it.seq LIMIT 1) b ON true
"""

# Batches of running runs that have not written their members yet and whose plan covers the
# member: by name (a small delta's batch), or by its key range (compared in PostgreSQL, whose
# collation ordered the range).
_QUEUED_SQL = f"""
SELECT r.connector_id, r.id, r.trigger, r.status, r.started_at, r.finished_at,
       b.kind, b.user_ids IS NOT NULL AS listed
FROM sync_runs r JOIN sync_batches b ON b.run_id = r.id
WHERE r.status = '{RunStatus.RUNNING}' AND r.finished_at IS NULL AND NOT b.materialized
  AND b.status IN ({", ".join(f"'{s}'" for s in OPEN_BATCH)})
  AND (CAST(:u AS text) = ANY(b.user_ids)
       OR (b.user_ids IS NULL AND (b.lo_user_id IS NULL OR b.lo_user_id <= :u)
           AND (b.hi_user_id IS NULL OR :u <= b.hi_user_id)))
"""


def trace_member(
    session: Session,
    user_id: str,
    *,
    retention_days: int | None = None,
    now: datetime | None = None,
) -> MemberTrace:
    """Where ``user_id`` stands with every connector (see the module's docstring for what is
    read). An unknown member has no connectors; an ill-formed id raises InputError."""
    check_user_id(user_id)
    if retention_days is None:
        retention_days = get_settings().retention_days
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    params = {"u": user_id, "cutoff": cutoff}

    states = session.execute(text(_CONNECTORS_SQL), params).all()
    runs: dict[str, dict[str, TracedRun]] = {}
    for row in session.execute(text(_ITEMS_SQL), params):
        runs.setdefault(row.connector_id, {})[row.id] = _item_run(row)

    by_connector = {row.id: row for row in states}
    for row in session.execute(text(_QUEUED_SQL), params):
        state = by_connector.get(row.connector_id)
        kept = runs.setdefault(row.connector_id, {})
        if state is None or row.id in kept or not (row.listed or _would_join(state, row.kind)):
            continue
        kept[row.id] = _run(row, MemberAction.QUEUED, None, ())

    traces = []
    for row in states:
        ledger = (
            LedgerState(bool(row.confirmed), row.profile_id, row.added_at, bool(row.suppressed))
            if row.confirmed is not None
            else None
        )
        rejection = (
            RejectionState(row.reason, row.run_id, row.rejected_at, RejectionRetry(row.retry))
            if row.rejected_at is not None
            else None
        )
        newest_first = sorted(
            runs.get(row.id, {}).values(), key=lambda r: (r.started_at, r.run_id), reverse=True
        )[:MAX_RUNS]
        if not (row.in_segment or ledger or rejection or newest_first):
            continue
        traces.append(
            ConnectorTrace(
                connector_id=row.id,
                segment_id=row.segment_id,
                list_id=row.list_id,
                status=ConnectorStatus(row.status),
                in_segment=bool(row.in_segment),
                ledger=ledger,
                rejection=rejection,
                runs=tuple(newest_first),
            )
        )
    return MemberTrace(user_id, retention_days, tuple(traces))


def _would_join(state: Any, kind: str) -> bool:
    """Whether a range batch not started yet will take the member, as the segment and the
    ledger stand now (a member whose traits changed since is not foreseen)."""
    on_list = state.confirmed is not None
    if kind == BatchKind.ADD:
        return bool(state.in_segment) and not (on_list and state.confirmed)
    return on_list and not state.in_segment


def _run(row: Any, action: MemberAction, reason: str | None, dropped: tuple[str, ...]) -> TracedRun:
    return TracedRun(
        run_id=row.id,
        trigger=row.trigger,
        status=RunStatus(row.status),
        started_at=row.started_at,
        finished_at=row.finished_at,
        action=action,
        reason=reason,
        dropped_traits=dropped,
    )


def _item_run(row: Any) -> TracedRun:
    """The action of a member row. A settled member has its outcome: the bulk path writes it on
    every member of a finished job (rejected by name, the rest accepted: sync/ledger.py
    accept_job) in the transaction that clears the batch's whole_job_id, so a done batch keeps
    no member without one. Without an outcome the member is in flight while its batch is open,
    and unsettled once the batch or run ended first (the next run enters a member sent so in
    the ledger unconfirmed: sync/ledger.py adopt_in_doubt)."""
    dropped = tuple(row.dropped_traits or ())
    if row.outcome is not None:
        return _run(row, MemberAction(row.outcome), row.reason, dropped)
    if row.status == RunStatus.RUNNING and row.batch_status in OPEN_BATCH:
        return _run(row, MemberAction.IN_FLIGHT, None, dropped)
    return _run(row, MemberAction.UNSETTLED, row.batch_error or row.run_error, dropped)
