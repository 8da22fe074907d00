"""Closing a run: the connector's ``last_synced_at``, or its error in words a person can act on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from segops_sync.db.models import Connector, SyncBatch, SyncRun
from segops_sync.db.statistics import analyze_if_stale
from segops_sync.states import (
    OPEN_BATCH,
    BatchStatus,
    CloseOutcome,
    ConnectorStatus,
    RunPhase,
    RunStatus,
    Trigger,
)
from segops_sync.sync.ledger import suppressed_count
from segops_sync.sync.pause import PAUSE_REASON, stops_for_pause
from segops_sync.sync.planner import StartOutcome, start_run
from segops_sync.sync.rejected import RUN_REJECTED_ITEMS, record_rejections

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunClosed:
    run_id: str
    status: CloseOutcome
    next_run: StartOutcome | None = None
    # Set when this call closed the run (succeeded | failed | cancelled): what the logs and
    # metrics report.
    connector_id: str | None = None
    seconds: float | None = None
    added: int = 0
    removed: int = 0
    rejected: int = 0
    error: str | None = None

    @property
    def closed_now(self) -> bool:
        return self.status in (CloseOutcome.SUCCEEDED, CloseOutcome.FAILED, CloseOutcome.CANCELLED)


def _closed(run: SyncRun, outcome: CloseOutcome, next_run: StartOutcome | None) -> RunClosed:
    seconds = (
        (run.finished_at - run.started_at).total_seconds()
        if run.finished_at and run.started_at
        else None
    )
    return RunClosed(
        run.id,
        outcome,
        next_run,
        connector_id=run.connector_id,
        seconds=seconds,
        added=run.added,
        removed=run.removed,
        rejected=run.rejected,
        error=run.error,
    )


def finish_run(session: Session, run_id: str) -> RunClosed:
    """Record a run from its batch rows (never from chord results). Idempotent."""
    run = session.scalars(
        select(SyncRun).where(SyncRun.id == run_id).with_for_update()
    ).one_or_none()
    if run is None or run.status != RunStatus.RUNNING:
        return RunClosed(run_id, CloseOutcome.ALREADY_CLOSED)
    batches = list(session.scalars(select(SyncBatch).where(SyncBatch.run_id == run_id)))
    if any(b.status in OPEN_BATCH for b in batches):
        # A chord that fired early (a duplicate delivery); the last batch or the sweeper closes it.
        return RunClosed(run_id, CloseOutcome.STILL_OPEN)
    connector = session.get_one(Connector, run.connector_id, with_for_update=True)
    run.added = sum(b.added for b in batches)
    run.removed = sum(b.removed for b in batches)
    run.rejected = sum(b.rejected for b in batches)
    run.pending = sum(b.pending for b in batches)
    _trait_counts(session, run, batches)
    failed = [b for b in batches if b.status == BatchStatus.FAILED]
    # A pause cancels the run only where it stopped a batch (or the plan): a pause that landed
    # after the last batch finished leaves a complete sync, and a batch that failed for another
    # reason fails the run as it would have anyway (with its alert).
    stopped = any(b.error == PAUSE_REASON for b in failed)
    failed = [b for b in failed if b.error != PAUSE_REASON]
    # (a run planned with nothing to do has its list_id too; one paused before its plan has none)
    unplanned = not batches and run.list_id is None
    cancelled = not failed and (stopped or (stops_for_pause(run.abort_reason) and unplanned))
    error: str | None = None
    if failed:
        permanent = next((b for b in failed if b.permanent), None)
        error = (permanent or failed[0]).error or "a batch failed"
    # Members Klaviyo rejected for their data do not fail the run: they wait for new data
    # (sync/rejected.py), `connectors rejected` names them, and a large share is sync.degraded.
    record_rejections(session, run)
    now = datetime.now(UTC)
    run.finished_at, run.phase = now, RunPhase.FINISHED
    if cancelled:
        # Not a failure: no alert, and the connector keeps its status (paused, or active if it
        # was resumed meanwhile), its last_error and its last_synced_at (the sync is not done).
        run.status = RunStatus.CANCELLED
        run.error = _cancelled(batches)
        return _closed(run, CloseOutcome.CANCELLED, _follow_up(session, connector))
    if error is None:
        run.status = RunStatus.SUCCEEDED
        notes = []
        if run.rejected:
            notes.append(_rejections(session, run))
        if run.pending:
            notes.append(
                f"{run.pending} removals wait for Klaviyo to index the profiles; "
                "the next sync retries them"
            )
        run.error = "; ".join(notes) or None
        connector.last_synced_at = now
        connector.last_error = run.error
        if connector.status == ConnectorStatus.ERROR:
            connector.status = ConnectorStatus.ACTIVE
        closed = CloseOutcome.SUCCEEDED
    else:
        run.status, run.error = RunStatus.FAILED, error
        if connector.status not in _KEPT_ON_FAILURE:
            connector.status = ConnectorStatus.ERROR
        connector.last_error = error
        closed = CloseOutcome.FAILED
    return _closed(run, closed, _follow_up(session, connector))


def fail_run(session: Session, run_id: str, reason: str) -> RunClosed:
    """Close a run that cannot finish normally (an unexpected error, a lost chord)."""
    run = session.scalars(
        select(SyncRun).where(SyncRun.id == run_id).with_for_update()
    ).one_or_none()
    if run is None or run.status != RunStatus.RUNNING:
        return RunClosed(run_id, CloseOutcome.ALREADY_CLOSED)
    connector = session.get_one(Connector, run.connector_id, with_for_update=True)
    # What Klaviyo confirmed before the failure still happened: the run's counts say so.
    batches = list(session.scalars(select(SyncBatch).where(SyncBatch.run_id == run_id)))
    run.added = sum(b.added for b in batches)
    run.removed = sum(b.removed for b in batches)
    run.rejected = sum(b.rejected for b in batches)
    record_rejections(session, run)
    run.status, run.phase, run.error = RunStatus.FAILED, RunPhase.FINISHED, reason
    run.finished_at = datetime.now(UTC)
    if connector.status not in _KEPT_ON_FAILURE:
        connector.status = ConnectorStatus.ERROR
    connector.last_error = reason
    return _closed(run, CloseOutcome.FAILED, _follow_up(session, connector))


# A person's choice outlives a failed run: inactive stays inactive, paused stays paused.
_KEPT_ON_FAILURE = (ConnectorStatus.INACTIVE, ConnectorStatus.PAUSED)


def _cancelled(batches: list[SyncBatch]) -> str:
    stopped = sum(1 for b in batches if b.status == BatchStatus.FAILED and b.error == PAUSE_REASON)
    return (
        f"{PAUSE_REASON} ({stopped} of {len(batches)} batches stopped early); "
        "resuming the connector syncs the rest"
    )


def _follow_up(session: Session, connector: Connector) -> StartOutcome | None:
    """Triggers that arrived during the run are served now, by one more run."""
    if not connector.resync_requested or connector.status == ConnectorStatus.INACTIVE:
        return None
    trigger = connector.resync_trigger or Trigger.COALESCED
    # a queued "mass-removal" trigger approves nothing (approvals are rows): a coalesced run
    return start_run(
        session,
        connector.id,
        trigger=Trigger.COALESCED if trigger == Trigger.MASS_REMOVAL else trigger,
    )


def finished_runs(session: Session, connector_id: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(SyncRun)
            .where(SyncRun.connector_id == connector_id, SyncRun.status != RunStatus.RUNNING)
        )
        or 0
    )


def wait_until_idle(
    connector_id: str,
    *,
    finished_at_least: int,
    timeout: float,
    on_poll: Callable[[], None] | None = None,
) -> SyncRun | None:
    """Poll until the connector has finished N runs and has nothing running or coalesced;
    returns its newest run, or None on timeout. For the CLI's --wait and the demo.
    ``on_poll`` runs between polls (the CLI's progress display)."""
    from segops_sync.db.session import session_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            connector = s.get_one(Connector, connector_id)
            running = s.scalar(
                select(SyncRun.id).where(
                    SyncRun.connector_id == connector_id, SyncRun.status == RunStatus.RUNNING
                )
            )
            if (
                running is None
                and not connector.resync_requested
                and finished_runs(s, connector_id) >= finished_at_least
            ):
                newest = s.scalars(
                    select(SyncRun)
                    .where(SyncRun.connector_id == connector_id)
                    .order_by(SyncRun.started_at.desc())
                    .limit(1)
                ).first()
                if newest is not None:
                    s.expunge(newest)
                return newest
        if on_poll is not None:
            on_poll()
        time.sleep(0.25)
    return None


def _trait_counts(session: Session, run: SyncRun, batches: list[SyncBatch]) -> None:
    """Trait updates and refused trait values, as each batch counted them when it finished."""
    run.updated = sum(b.updated for b in batches)
    run.traits_dropped = sum(b.traits_dropped for b in batches)
    # members on the list whose email Klaviyo suppresses, as the last read-back saw them:
    # counted in every run, never failures
    run.suppressed = suppressed_count(session, run.connector_id)


def _rejections(session: Session, run: SyncRun) -> str:
    reasons = session.execute(
        text(
            f"SELECT it.reason, count(*) AS n {RUN_REJECTED_ITEMS} "
            "GROUP BY it.reason ORDER BY n DESC, it.reason LIMIT 3"
        ),
        {"r": run.id},
    ).all()
    summary = "; ".join(f"{n}x {reason}" for reason, n in reasons)
    return (
        f"{run.rejected} members rejected by Klaviyo ({summary}); the others were synced, and "
        "these are sent again when a context_identified event changes their data"
    )


def refresh_statistics(session: Session, run_id: str) -> list[str]:
    """After a run that changed the ledger (or wrote items) in bulk: analyze what the next
    run's statements will be planned over (db/statistics.py). Returns the tables analyzed."""
    run = session.get(SyncRun, run_id)
    if run is None:
        return []
    changes = {
        "connector_members": (run.added or 0) + (run.removed or 0) + (run.updated or 0),
        "sync_batch_items": (run.planned_adds or 0) + (run.planned_removes or 0),
    }
    return [table for table, n in changes.items() if analyze_if_stale(session, table, n)]


def closed_summary(session: Session, run_id: str) -> RunClosed:
    """A run the planner held, described as :func:`finish_run` describes the runs it closes."""
    return _closed(session.get_one(SyncRun, run_id), CloseOutcome.HELD, None)
