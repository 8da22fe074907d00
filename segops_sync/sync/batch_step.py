"""One step of a batch: what it returns (``Finished`` or ``Later``), what it knows of its
batch (``BatchContext``), where the batch's state is kept (``BatchStore``), and the
bookkeeping every path of a batch shares (progress, transient failures, the last count).

The state machine that drives a step is sync/batches.py; its paths are sync/bulk_add.py,
sync/direct.py (through batches.py) and sync/removal.py. They all build on this module, which
imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

from segops_sync.config import Settings, get_settings
from segops_sync.db.models import Connector, SyncBatch, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import TransientError
from segops_sync.states import OPEN_BATCH, BatchKind, BatchStatus, ItemOutcome
from segops_sync.sync import batch_items
from segops_sync.sync.pause import PAUSE_REASON, run_paused, stops_for_pause
from segops_sync.sync.planner import materialize_batch
from segops_sync.sync.retry import backoff

QUICK_ATTEMPTS = 3
T = TypeVar("T")


@dataclass(frozen=True)
class Finished:
    batch_id: int
    ok: bool

    def as_result(self) -> dict[str, Any]:
        # Tiny and deterministic: a redelivered batch adds an identical chord entry.
        return {"batch": self.batch_id, "ok": self.ok}


@dataclass(frozen=True)
class Later:
    countdown: float
    reason: str
    # It built its job body and lost the race for a submission slot: it comes back ahead of the
    # batches that have not started, or it would be submitted after all of them.
    ahead: bool = False


BatchStep = Finished | Later


@dataclass(frozen=True)
class BatchContext:
    batch_id: int
    run_id: str
    kind: BatchKind
    seq: int
    status: BatchStatus
    attempts: int
    first_attempt_at: datetime
    connector_id: str
    list_id: str
    api_key_encrypted: bytes
    abort_reason: str | None
    planned_adds: int = 0
    job_ids: tuple[str, ...] = ()  # every bulk job this batch submitted
    # The job that holds every member of the batch with neither a job nor an outcome of its own
    # (SyncBatch.whole_job_id): None while they are unsent.
    whole_job_id: str | None = None
    # The members this very step wrote (materialize_batch), in key order: read without a query.
    fresh_members: tuple[tuple[Any, ...], ...] | None = None

    @property
    def paused(self) -> bool:
        """The connector was paused when this step began: send nothing new."""
        return stops_for_pause(self.abort_reason)


class BatchStore(Protocol):
    """Where the batch state machine keeps its state: PostgreSQL in production, a dict in
    unit tests, so the transitions can be tested without a database."""

    def load(self, batch_id: int) -> BatchContext | None:
        """The batch with its run and connector; touches its heartbeat."""

    def fail(self, ctx: BatchContext, error: str, *, permanent: bool) -> None:
        """An open batch becomes failed; a permanent error also stops the run's other batches."""

    def count_failure(self, ctx: BatchContext) -> int:
        """One more transient failure in a row; returns how many so far."""


# -- loading and recording ---------------------------------------------------------------


class PostgresBatchStore:
    """The batch state machine's state in PostgreSQL (``sync_batches`` and friends)."""

    def load(self, batch_id: int) -> BatchContext | None:
        with session_scope() as s:
            row = s.execute(
                select(SyncBatch, SyncRun.abort_reason, Connector, SyncRun.planned_adds)
                .join(SyncRun, SyncRun.id == SyncBatch.run_id)
                .join(Connector, Connector.id == SyncRun.connector_id)
                .where(SyncBatch.id == batch_id)
            ).one_or_none()
            if row is None:
                return None
            batch, abort_reason, connector, planned_adds = row
            fresh = None
            if not batch.materialized and batch.status in OPEN_BATCH and abort_reason is None:
                fresh = _materialize(s, batch, connector, planned_adds or 0)
            now = datetime.now(UTC)
            if batch.first_attempt_at is None:
                batch.first_attempt_at = now
            batch.updated_at = now  # a heartbeat: the sweeper leaves batches that are alive alone
            return BatchContext(
                batch_id=batch.id,
                run_id=batch.run_id,
                kind=batch.kind,
                seq=batch.seq,
                status=batch.status,
                attempts=batch.attempts,
                first_attempt_at=batch.first_attempt_at,
                connector_id=connector.id,
                list_id=connector.list_id,
                api_key_encrypted=connector.api_key_encrypted,
                abort_reason=abort_reason,
                planned_adds=planned_adds or 0,
                job_ids=tuple(batch.job_ids or ()),
                whole_job_id=batch.whole_job_id,
                fresh_members=None if fresh is None else tuple(fresh),
            )

    def fail(self, ctx: BatchContext, error: str, *, permanent: bool) -> None:
        with session_scope() as s:
            s.execute(
                update(SyncBatch)
                .where(SyncBatch.id == ctx.batch_id, SyncBatch.status.in_(OPEN_BATCH))
                .values(status=BatchStatus.FAILED, error=error, permanent=permanent)
            )
            if permanent:
                # The other batches of the run would only meet the same wall: stop them early.
                s.execute(
                    update(SyncRun)
                    .where(SyncRun.id == ctx.run_id, SyncRun.abort_reason.is_(None))
                    .values(abort_reason=error)
                )

    def count_failure(self, ctx: BatchContext) -> int:
        with session_scope() as s:
            return int(
                s.execute(
                    update(SyncBatch)
                    .where(SyncBatch.id == ctx.batch_id)
                    .values(attempts=SyncBatch.attempts + 1)
                    .returning(SyncBatch.attempts)
                ).scalar_one()
            )


def _materialize(
    s: Session, batch: SyncBatch, connector: Connector, planned_adds: int
) -> list[tuple[Any, ...]] | None:
    """A batch's first run writes its members (the planner wrote only its key range) and
    returns them; the row lock makes a redelivered twin wait, then find them written (None:
    it reads them as any later step does)."""
    s.refresh(batch, with_for_update=True)
    if batch.materialized:
        return None
    return materialize_batch(s, batch, connector, planned_adds, get_settings())


def transient(
    ctx: BatchContext, detail: str, settings: Settings, store: BatchStore | None = None
) -> BatchStep:
    store = store or PostgresBatchStore()
    attempts = store.count_failure(ctx)
    if attempts > settings.transient_retry_budget:
        store.fail(
            ctx,
            f"Klaviyo kept failing after {attempts} attempts ({detail}); "
            "the next sync retries what is left",
            permanent=False,
        )
        return Finished(ctx.batch_id, False)
    return Later(backoff(attempts, settings), f"transient: {detail}")


def record_progress(s: Session, ctx: BatchContext) -> None:
    """Klaviyo answered and we saved it: the transient budget counts failures in a row."""
    s.execute(
        update(SyncBatch)
        .where(SyncBatch.id == ctx.batch_id, SyncBatch.attempts > 0)
        .values(attempts=0)
    )


def quick_retry(call: Callable[..., T], *args: Any) -> T:
    """One or two quick in-process retries of a transient failure (a dropped connection, a
    5xx) before the task-level backoff takes over. Klaviyo writes here are idempotent."""
    for attempt in Retrying(
        stop=stop_after_attempt(QUICK_ATTEMPTS),
        wait=wait_random(0.05, 0.3),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    ):
        with attempt:
            return call(*args)
    raise AssertionError("unreachable")  # pragma: no cover


def finish(ctx: BatchContext) -> Finished:
    # in_doubt=False: every member it sent has its outcome.
    _close_batch(ctx, BatchStatus.DONE, in_doubt=False)
    return Finished(ctx.batch_id, True)


def _close_batch(ctx: BatchContext, status: BatchStatus, **extra: Any) -> None:
    """An open batch closes with ``status`` and what Klaviyo confirmed of it, counted from its
    items; ``extra`` are the other columns its path sets."""
    with session_scope() as s:
        counts, dropped = batch_items.outcome_counts(s, ctx)
        s.execute(
            update(SyncBatch)
            .where(SyncBatch.id == ctx.batch_id, SyncBatch.status.in_(OPEN_BATCH))
            .values(
                status=status,
                added=counts.get(ItemOutcome.ADDED, 0),
                removed=counts.get(ItemOutcome.REMOVED, 0),
                rejected=counts.get(ItemOutcome.REJECTED, 0),
                pending=counts.get(ItemOutcome.PENDING, 0),
                updated=counts.get(ItemOutcome.UPDATED, 0),
                traits_dropped=dropped,
                **extra,
            )
        )


def mark_sending(ctx: BatchContext) -> None:
    """Committed before Klaviyo is asked to add members: if the run ends between Klaviyo's
    answer and the ledger write, the next run's planner still finds them (they may be on the
    list) and enters them in the ledger unconfirmed (sync/ledger.py adopt_in_doubt)."""
    with session_scope() as s:
        s.execute(
            update(SyncBatch)
            .where(SyncBatch.id == ctx.batch_id)
            .values(in_doubt=True, sent_at=func.coalesce(SyncBatch.sent_at, func.now()))
        )


def pause_requested(ctx: BatchContext) -> bool:
    """Asked before the next request that would change the list: the connector may have been
    paused since this step began (sync/pause.py)."""
    if ctx.paused:
        return True
    with session_scope() as s:
        return run_paused(s, ctx.run_id)


def stop_for_pause(ctx: BatchContext) -> Finished:
    """End a batch of a paused connector without sending the rest: it closes failed with the
    pause as its error, counting what Klaviyo confirmed of it. Called only with nothing of it
    left at Klaviyo unsettled, so its run closes ``cancelled`` with exact counts; ``in_doubt``
    stays as it is (a send whose answer was lost is still adopted by the next run)."""
    _close_batch(ctx, BatchStatus.FAILED, error=PAUSE_REASON, permanent=False)
    return Finished(ctx.batch_id, False)
