"""One batch against Klaviyo: resumable, idempotent, and honest about what Klaviyo confirmed.

A batch is a row; its members are rows. Each call of :func:`run_batch` picks up where the
last one stopped (after a retry, a crash or a redelivery) and returns either ``Finished`` or
``Later`` (call again after a countdown: throttled, a job still running, a profile not indexed
yet, a transient failure). The ledger changes only for what Klaviyo confirmed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

from segops_sync.config import ConfigError, Settings, get_settings
from segops_sync.db.models import Connector, SyncBatch, SyncBatchItem, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import (
    MAX_FILTER_VALUES,
    Endpoint,
    ImportErrorItem,
    InvalidRequest,
    KlaviyoClient,
    KlaviyoError,
    NotFound,
    ProfileInput,
    TransientError,
    scrub,
    split_into_jobs,
)
from segops_sync.observability import logging as obs_log
from segops_sync.secrets import decrypt_api_key
from segops_sync.states import OPEN_BATCH, BatchKind, BatchStatus, ItemOutcome
from segops_sync.sync.access import KlaviyoAccess, LimitedSession, Throttled
from segops_sync.sync.costs import goes_direct
from segops_sync.sync.direct import add_directly
from segops_sync.sync.ledger import (
    accept_job,
    added_times,
    confirm_removed,
    forget_profile_ids,
)
from segops_sync.sync.limiter import spread
from segops_sync.sync.outcomes import Action, decide
from segops_sync.sync.planner import materialize_batch
from segops_sync.sync.traits import trait_profiles
from segops_sync.sync.watcher import AccountJobs, job_overdue

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
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


class BatchStore(Protocol):
    """Where the batch state machine keeps its state: PostgreSQL in production, a dict in
    unit tests, so the transitions can be tested without a database."""

    def load(self, batch_id: int) -> BatchContext | None:
        """The batch with its run and connector; touches its heartbeat."""

    def fail(self, ctx: BatchContext, error: str, *, permanent: bool) -> None:
        """An open batch becomes failed; a permanent error also stops the run's other batches."""

    def count_failure(self, ctx: BatchContext) -> int:
        """One more transient failure in a row; returns how many so far."""


Work = Callable[[BatchContext, KlaviyoClient, Settings], "BatchStep"]


# The spread of a wait at most 5-25 % of this: a second at most.
JITTER_BASE_CAP = 4.0


def _jitter(base: float) -> float:
    """Spread retries so a fleet that was refused together does not return together. Capped:
    a churn's lookups wait ~45 s for the limiter's minute to roll, and 5-25 % of that spread
    their return over 11 s, where the limiter had slots from the first second (the churn ended
    at 73 s for a 63 s floor); the limiter itself orders those who come back together."""
    return spread(max(base, 0.2), cap=JITTER_BASE_CAP)


def backoff(attempt: int, settings: Settings) -> float:
    """Exponential backoff with jitter for transient failures (attempt starts at 1)."""
    ceiling = min(MAX_BACKOFF, settings.retry_base_delay * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def run_batch(
    batch_id: int,
    access: KlaviyoAccess,
    settings: Settings,
    *,
    store: BatchStore | None = None,
    work: Work | None = None,
) -> BatchStep:
    """One step of the batch state machine: pending/submitted -> done | failed, or Later."""
    store = store or PostgresBatchStore()
    ctx = store.load(batch_id)
    if ctx is None:
        log.warning("batch %s no longer exists; dropped", batch_id)
        return Finished(batch_id, False)
    obs_log.bind(run_id=ctx.run_id, connector_id=ctx.connector_id)
    if ctx.status not in OPEN_BATCH:
        return Finished(batch_id, ctx.status == BatchStatus.DONE)
    if ctx.abort_reason:
        store.fail(ctx, ctx.abort_reason, permanent=True)
        return Finished(batch_id, False)
    try:
        api_key = decrypt_api_key(ctx.api_key_encrypted, settings.require_secret_key())
    except ConfigError as exc:  # SEGOPS_SECRET_KEY changed: only a person can fix that
        store.fail(
            ctx, f"{exc}; re-enter the key with `segops-sync connectors update`", permanent=True
        )
        return Finished(batch_id, False)
    limited: LimitedSession | None = None
    try:
        client, limited = access.client(api_key, claimant=ctx.connector_id)
        with client:
            if work is not None:
                return work(ctx, client, settings)
            if ctx.kind == BatchKind.ADD and goes_direct(ctx.planned_adds, settings):
                return _add_direct(ctx, client, settings)
            if ctx.kind == BatchKind.ADD:
                return _add(ctx, client, settings, access.jobs(client, limited), limited)
            return _remove(ctx, client, settings)
    except (Throttled, KlaviyoError) as exc:
        decision = decide(exc, list_id=ctx.list_id)
        from_klaviyo = not isinstance(exc, Throttled)
        # Only a built body waits for its submission slot in-process (SUBMIT_PATIENCE).
        built = isinstance(exc, Throttled) and exc.endpoint == Endpoint.CREATE_BULK_IMPORT_JOB
    if decision.action is Action.WAIT:
        wait = decision.wait
        if wait is None:
            wait = backoff(ctx.attempts + 1, settings)
        if limited is not None and from_klaviyo:
            limited.rate_limited(wait)  # a 429 backs off the whole fleet
        return Later(wait + _jitter(wait), decision.message, ahead=built)
    if decision.action is Action.RETRY:
        return _transient(ctx, scrub(decision.message, api_key), settings, store)
    # FAIL_RUN, or members refused where the path could not drop them itself.
    store.fail(ctx, scrub(decision.message, api_key), permanent=True)
    return Finished(batch_id, False)


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


# A batch's own rows: every update of members names the batch, so its plan starts from the
# batch's index (at most 10,000 rows) whatever the statistics say about the run. Found by the
# benchmark: after an ANALYZE that knew only the previous run, "run_id = :r AND user_id = ANY"
# chose a plan that read the whole run per lookup (250 ms instead of 2).
_THIS_BATCH = "run_id = :r AND kind = :k AND seq = :q"


def _batch_key(ctx: BatchContext) -> dict[str, Any]:
    return {"r": ctx.run_id, "k": ctx.kind, "q": ctx.seq}


def _items(s: Session, ctx: BatchContext) -> Any:
    return select(SyncBatchItem).where(
        SyncBatchItem.run_id == ctx.run_id,
        SyncBatchItem.kind == ctx.kind,
        SyncBatchItem.seq == ctx.seq,
    )


def _transient(
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


def _progress(s: Session, ctx: BatchContext) -> None:
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


def _finish(ctx: BatchContext) -> Finished:
    with session_scope() as s:
        counts: dict[str | None, int] = {}
        dropped = 0
        for outcome, n, traits_dropped in s.execute(
            text(
                "SELECT outcome, count(*), COALESCE(sum(cardinality(dropped_traits)), 0) "
                "FROM sync_batch_items WHERE run_id = :r AND kind = :k AND seq = :q "
                "GROUP BY outcome"
            ),
            {"r": ctx.run_id, "k": ctx.kind, "q": ctx.seq},
        ):
            counts[outcome] = int(n)
            dropped += int(traits_dropped)
        s.execute(
            update(SyncBatch)
            .where(SyncBatch.id == ctx.batch_id, SyncBatch.status.in_(OPEN_BATCH))
            .values(
                status=BatchStatus.DONE,
                added=counts.get(ItemOutcome.ADDED, 0),
                removed=counts.get(ItemOutcome.REMOVED, 0),
                rejected=counts.get(ItemOutcome.REJECTED, 0),
                pending=counts.get(ItemOutcome.PENDING, 0),
                updated=counts.get(ItemOutcome.UPDATED, 0),
                traits_dropped=dropped,
                in_doubt=False,  # every member it sent has its outcome
            )
        )
    return Finished(ctx.batch_id, True)


def _mark_sending(ctx: BatchContext) -> None:
    """Committed before Klaviyo is asked to add members: if the run ends between Klaviyo's
    answer and the ledger write, the next run's planner still finds them (they may be on the
    list) and enters them in the ledger unconfirmed (sync/ledger.py adopt_in_doubt)."""
    with session_scope() as s:
        s.execute(
            update(SyncBatch)
            .where(SyncBatch.id == ctx.batch_id)
            .values(in_doubt=True, sent_at=func.coalesce(SyncBatch.sent_at, func.now()))
        )


def _set_outcome(
    s: Session,
    ctx: BatchContext,
    user_ids: Iterable[str],
    outcome: ItemOutcome,
    reason: str | None = None,
) -> None:
    ids = list(user_ids)
    if ids:
        # One array parameter, not an IN list of 10,000 binds (compiled and parsed each time).
        s.execute(
            text(
                "UPDATE sync_batch_items SET outcome = :o, reason = :why "
                f"WHERE {_THIS_BATCH} AND user_id = ANY(CAST(:u AS text[]))"
            ),
            {"o": outcome, "why": reason, **_batch_key(ctx), "u": ids},
        )


# -- adds: bulk import jobs with the list attached -----------------------------------------


def _unsent(ctx: BatchContext) -> Sequence[Any]:
    """The batch's members not yet in a job, in key order (user_id, email, external_id,
    traits). Core, not the ORM's row processing: ten thousand plain tuples."""
    if ctx.whole_job_id is not None:  # the members without a job of their own are in it
        return ()
    with session_scope() as s:
        return (
            s.connection()
            .execute(
                _items(s, ctx)
                .where(SyncBatchItem.job_id.is_(None), SyncBatchItem.outcome.is_(None))
                .order_by(SyncBatchItem.user_id)
                .with_only_columns(
                    SyncBatchItem.user_id,
                    SyncBatchItem.email,
                    SyncBatchItem.external_id,
                    SyncBatchItem.traits,
                )
            )
            .all()
        )


# A batch whose job submission slot is this close builds its body now (it takes 0.05-0.5 s)...
SUBMIT_AHEAD = 1.0
# ...and, body built, waits in-process this long at most for a slot before it is re-queued.
# Several batches wait at once and whoever asks first at a free slot takes it: with 2 s, a few
# lost that race until their time ran out, went back to the queue and came back 1-1.7 s after
# the other submissions had ended, on the first sync's critical path.
SUBMIT_PATIENCE = 4.0


def _add(
    ctx: BatchContext,
    client: KlaviyoClient,
    settings: Settings,
    jobs: AccountJobs,
    limited: LimitedSession,
) -> BatchStep:
    if ctx.status == BatchStatus.PENDING and ctx.fresh_members != ():
        # Reading 10,000 members and encoding a 5 MB body costs a tenth of a CPU-second, all of
        # it lost when the limiter then refuses the submission: where submissions are the bound
        # (past 1.5M members, or an account shared by connectors) a waiting batch built its body
        # again every time it came back. It now asks first and comes back just before its slot,
        # builds once, and waits out the rest in-process (a slot left idle is time lost for good).
        wait = limited.slot_wait(Endpoint.CREATE_BULK_IMPORT_JOB)
        if wait > SUBMIT_AHEAD:
            ahead = wait - SUBMIT_AHEAD
            return Later(ahead + _jitter(ahead), f"a job submission slot in {wait:.2f}s")
    if ctx.status == BatchStatus.SUBMITTED and ctx.job_ids:
        # Waking while its jobs run is the common case (a million members: a hundred batches,
        # each back every poll): ask the watcher before reading any of the batch's rows.
        early = jobs.view(list(ctx.job_ids))
        if not early.finished:
            return Later(early.wait or settings.job_poll_interval, "bulk import job still running")
    if ctx.fresh_members is not None:  # written by this step: no need to read them back
        unsent: Sequence[Any] = ctx.fresh_members
    else:
        unsent = _unsent(ctx)
    if unsent:
        members = trait_profiles(ctx.run_id, unsent)
        _mark_sending(ctx)
        start = 0
        chunks = split_into_jobs([p for _, p in members])
        with limited.patient(SUBMIT_PATIENCE):
            whole = len(chunks) == 1
            for chunk in chunks:
                _submit(ctx, client, members[start : start + len(chunk)], jobs, whole=whole)
                start += len(chunk)

    with session_scope() as s:
        job_ids = list(
            s.scalars(
                _items(s, ctx)
                .where(SyncBatchItem.job_id.is_not(None), SyncBatchItem.outcome.is_(None))
                .with_only_columns(SyncBatchItem.job_id)
                .distinct()
            )
        )
        # read again: this very step may have submitted it
        whole = s.scalar(select(SyncBatch.whole_job_id).where(SyncBatch.id == ctx.batch_id))
    if whole is not None:
        job_ids.append(whole)
        ctx = replace(ctx, whole_job_id=whole)
    # One poll of the account's recent jobs answers for every batch (sync/watcher.py), with
    # each finished job's failed_count; only a job the poll could not find is read on its own.
    view = jobs.view(job_ids)
    running = bool(view.running)
    for job_id in view.finished:
        try:
            failed_count = jobs.final(job_id)
            if failed_count is None:
                job = quick_retry(client.get_bulk_import_job, job_id)
                if job.status in ("queued", "processing") and not job_overdue(
                    job.created_at, settings.job_give_up, _now_us()
                ):
                    jobs.still_running(job_id)  # the poll missed it (a page shifted)
                    running = True
                    continue
                if job.status in ("queued", "processing"):  # SEGOPS_JOB_GIVE_UP is past
                    log.warning(
                        "bulk import job %s unfinished %.0fs after it was created: taken as "
                        "lost, its members are sent again",
                        job_id,
                        settings.job_give_up,
                    )
                    _resend(ctx, job_id)
                    jobs.forget([job_id])
                    return Later(0.1, "resend a job given up")
                if job.status == "complete":
                    failed_count = job.failed_count
                    jobs.remember_final(job_id, failed_count)  # read once, even if deferred
            if failed_count is not None:
                # A job Klaviyo counts no failures of has no import errors to read: half of a
                # first sync's job reads, and a burst of them when ten jobs finish in one poll.
                errors = quick_retry(_all_import_errors, client, job_id) if failed_count else []
                problem = _settle_job(ctx, job_id, failed_count, errors)
                if problem is not None:
                    return _transient(ctx, problem, settings)
                jobs.forget([job_id])
                continue
        except NotFound:
            pass  # Klaviyo lost the job, or its results expired before we read them
        log.warning("bulk import job %s is gone or cancelled; its members are sent again", job_id)
        _resend(ctx, job_id)
        jobs.forget([job_id])
        return Later(0.1, "resend a lost job")
    if running:
        return Later(view.wait or settings.job_poll_interval, "bulk import job still running")
    jobs.forget(ctx.job_ids)  # nothing of this batch is watched any more
    return _finish(ctx)


def _add_direct(ctx: BatchContext, client: KlaviyoClient, settings: Settings) -> BatchStep:
    """A small delta's adds: profile-import per member, then one list write (sync/direct.py)."""

    def progress() -> None:
        with session_scope() as s:
            _progress(s, ctx)

    again = add_directly(
        ctx.run_id,
        ctx.kind,
        ctx.seq,
        ctx.connector_id,
        ctx.list_id,
        client,
        retry=quick_retry,
        on_progress=progress,
        on_sending=lambda: _mark_sending(ctx),
    )
    if again is not None:
        return Later(0.1, again)
    return _finish(ctx)


def _submit(
    ctx: BatchContext,
    client: KlaviyoClient,
    members: list[tuple[str, ProfileInput]],
    jobs: AccountJobs,
    *,
    whole: bool = False,
) -> None:
    """Create one job; when Klaviyo rejects the whole job for some members, drop them and resend.

    ``whole``: the job carries every unsent member of the batch (the common case): the batch
    row names it (``whole_job_id``), and none of the 10,000 member rows is written."""
    while members:
        try:
            job = quick_retry(client.create_bulk_import_job, [p for _, p in members], ctx.list_id)
        except InvalidRequest as exc:
            decision = decide(exc, list_id=ctx.list_id)
            refused = decision.members
            if decision.action is not Action.REJECT_MEMBERS or any(
                i >= len(members) for i in refused
            ):
                raise
            with session_scope() as s:
                for index, reason in refused.items():
                    _set_outcome(s, ctx, [members[index][0]], ItemOutcome.REJECTED, reason)
            members = [m for i, m in enumerate(members) if i not in refused]
            continue
        job_id = job.id
        with session_scope() as s:
            if not whole:
                s.execute(
                    text(
                        "UPDATE sync_batch_items SET job_id = :j "
                        f"WHERE {_THIS_BATCH} AND user_id = ANY(CAST(:u AS text[]))"
                    ),
                    {"j": job_id, **_batch_key(ctx), "u": [u for u, _ in members]},
                )
            s.execute(
                update(SyncBatch)
                .where(SyncBatch.id == ctx.batch_id)
                .values(
                    status=BatchStatus.SUBMITTED,
                    job_ids=SyncBatch.job_ids.op("||")([job_id]),
                    **({"whole_job_id": job_id} if whole else {}),
                )
            )
            _progress(s, ctx)
        jobs.register([job_id], {job_id: job.created_at})
        return


def _now_us() -> int:
    return round(datetime.now(UTC).timestamp() * 1_000_000)


def _resend(ctx: BatchContext, job_id: str) -> None:
    with session_scope() as s:
        if job_id == ctx.whole_job_id:  # its members are unsent again
            s.execute(
                update(SyncBatch)
                .where(SyncBatch.id == ctx.batch_id, SyncBatch.whole_job_id == job_id)
                .values(whole_job_id=None)
            )
            return
        s.execute(
            update(SyncBatchItem)
            .where(
                SyncBatchItem.run_id == ctx.run_id,
                SyncBatchItem.kind == ctx.kind,
                SyncBatchItem.seq == ctx.seq,
                SyncBatchItem.job_id == job_id,
                SyncBatchItem.outcome.is_(None),
            )
            .values(job_id=None)
        )


def _in_job(ctx: BatchContext, job_id: str) -> Any:
    """The condition on a batch's member rows that selects the unsettled members of a job."""
    if job_id == ctx.whole_job_id:
        return SyncBatchItem.job_id.is_(None)
    return SyncBatchItem.job_id == job_id


def _identity_keys(payload: dict[str, Any] | None) -> tuple[str | None, str | None]:
    if not payload:
        return None, None
    attrs = payload.get("attributes", payload)
    if not isinstance(attrs, dict):
        return None, None
    email, ext = attrs.get("email"), attrs.get("external_id")
    return (email.lower() if isinstance(email, str) else None), (
        ext if isinstance(ext, str) else None
    )


def _all_import_errors(client: KlaviyoClient, job_id: str) -> list[ImportErrorItem]:
    return list(client.iter_bulk_import_errors(job_id))


def _settle_job(
    ctx: BatchContext, job_id: str, failed_count: int, errors: Sequence[ImportErrorItem]
) -> str | None:
    """Members of a finished job: rejected ones get Klaviyo's reason, the rest enter the ledger.

    Returns why the job cannot be settled yet, or None. When Klaviyo counts more failed
    profiles than its import errors name, we cannot tell who failed: nobody of the job is
    confirmed (the others would be "added" on faith, the silent success others ship)."""
    with session_scope() as s:
        rejected: dict[str, str] = {}
        if errors or failed_count:
            # Only a job with failures needs its members by name, to tell who failed.
            members = s.execute(
                select(SyncBatchItem.user_id, SyncBatchItem.email, SyncBatchItem.external_id).where(
                    # the batch's own rows (an index), not a scan of the whole run for the job
                    SyncBatchItem.run_id == ctx.run_id,
                    SyncBatchItem.kind == ctx.kind,
                    SyncBatchItem.seq == ctx.seq,
                    _in_job(ctx, job_id),
                    SyncBatchItem.outcome.is_(None),
                )
            ).all()
            by_email = {e.lower(): u for u, e, _ in members if e}
            by_ext = {x: u for u, _, x in members if x}
            unattributed = 0
            for err in errors:
                email, ext = _identity_keys(err.original_payload)
                user_id = (by_ext.get(ext) if ext else None) or (
                    by_email.get(email) if email else None
                )
                if user_id is None:
                    unattributed += 1
                    continue
                rejected[user_id] = f"{err.title}: {err.detail}" if err.title else err.detail
            if unattributed:
                log.warning("job %s: %d import errors name no member we sent", job_id, unattributed)
        if failed_count > len(rejected):
            return (
                f"Klaviyo's bulk import job {job_id} counts {failed_count} failed profiles but its "
                f"import errors name {len(rejected)} of ours; its members stay unconfirmed"
            )
        for user_id, reason in rejected.items():
            _set_outcome(s, ctx, [user_id], ItemOutcome.REJECTED, reason)
        # The rest of the job was accepted: added, or (already on the list) its traits updated.
        whole = job_id == ctx.whole_job_id
        accept_job(s, ctx.connector_id, ctx.run_id, ctx.kind, ctx.seq, None if whole else job_id)
        if whole:  # settled: the batch's members without a job are none of its any more
            s.execute(
                update(SyncBatch).where(SyncBatch.id == ctx.batch_id).values(whole_job_id=None)
            )
        _progress(s, ctx)
    return None


# -- removes: profile ids from the ledger or by lookup, then DELETE ≤1,000 ------------------


def _remove(ctx: BatchContext, client: KlaviyoClient, settings: Settings) -> BatchStep:
    rows: Sequence[Any]
    if ctx.fresh_members is not None:  # written by this step: no need to read them back
        rows = ctx.fresh_members
    else:
        with session_scope() as s:
            rows = s.execute(
                _items(s, ctx)
                .where(SyncBatchItem.outcome.is_(None))
                .with_only_columns(
                    SyncBatchItem.user_id,
                    SyncBatchItem.email,
                    SyncBatchItem.external_id,
                    SyncBatchItem.profile_id,
                )
            ).all()
    if not rows:
        return _finish(ctx)
    profile_ids = {u: p for u, _, _, p in rows if p}
    missing = [(u, e, x) for u, e, x, p in rows if not p]
    found: dict[str, str] = {}
    # external_id first (it is what we sent for opaque ids), then email; each chunk of 100
    # values is one call, saved as soon as it answers so a retry never asks again.
    by_ext = {x: u for u, _, x in missing if x}
    for chunk in _chunks(list(by_ext), MAX_FILTER_VALUES):
        hits = {
            by_ext[v]: pid
            for v, pid in quick_retry(client.find_profile_ids, "external_id", chunk).items()
        }
        _record_found(ctx, hits)
        found.update(hits)
    by_email = {e.lower(): u for u, e, _ in missing if e and u not in found}
    for chunk in _chunks(list(by_email), MAX_FILTER_VALUES):
        answer = quick_retry(client.find_profile_ids, "email", chunk)
        hits = {by_email[v.lower()]: pid for v, pid in answer.items() if v.lower() in by_email}
        _record_found(ctx, hits)
        found.update(hits)
    profile_ids.update(found)

    if profile_ids:
        pairs = sorted(profile_ids.items())
        try:
            quick_retry(client.remove_profiles_from_list, ctx.list_id, [p for _, p in pairs])
        except InvalidRequest as exc:
            decision = decide(exc, list_id=ctx.list_id)
            stale = {i for i in decision.members if i < len(pairs)}
            if decision.action is not Action.REJECT_MEMBERS or not stale:
                raise
            # Ids Klaviyo no longer knows (merged or deleted profiles): look them up again.
            with session_scope() as s:
                stale_users = [pairs[i][0] for i in stale]
                s.execute(
                    update(SyncBatchItem)
                    .where(
                        SyncBatchItem.run_id == ctx.run_id,
                        SyncBatchItem.kind == ctx.kind,
                        SyncBatchItem.seq == ctx.seq,
                        SyncBatchItem.user_id.in_(stale_users),
                    )
                    .values(profile_id=None)
                )
                forget_profile_ids(s, ctx.connector_id, stale_users)
            return Later(0.1, "stale profile ids")
        with session_scope() as s:
            _set_outcome(s, ctx, profile_ids, ItemOutcome.REMOVED)
            confirm_removed(s, ctx.connector_id, list(profile_ids))
            _progress(s, ctx)

    unfound = [u for u, _, _ in missing if u not in found]
    if unfound:
        return _unfound(ctx, unfound, settings)
    return _finish(ctx)


def _chunks(values: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _record_found(ctx: BatchContext, found: dict[str, str]) -> None:
    """Profile ids learnt by lookup: kept on the batch's items (a retry needs no lookup again);
    counts as progress. Not in the ledger: these members are leaving it, and writing 100 ledger
    rows per lookup was a fifth of a churn's PostgreSQL time."""
    if not found:
        return
    with session_scope() as s:
        # Profile ids are a cache of what Klaviyo would answer again: their commit need not wait
        # for the disk (a crash loses at most a moment of them, and costs a lookup again).
        # A churn of 100,000 makes 1,000 of these, paced by the lookups' own budget.
        s.execute(text("SET LOCAL synchronous_commit TO OFF"))
        s.execute(
            text(
                "UPDATE sync_batch_items it SET profile_id = f.pid "
                "FROM unnest(CAST(:u AS text[]), CAST(:p AS text[])) AS f(uid, pid) "
                "WHERE it.run_id = :r AND it.kind = :k AND it.seq = :q AND it.user_id = f.uid"
            ),
            {**_batch_key(ctx), "u": list(found), "p": list(found.values())},
        )
        _progress(s, ctx)


def _unfound(ctx: BatchContext, user_ids: list[str], settings: Settings) -> BatchStep:
    """Members Klaviyo cannot find yet. Wait while Klaviyo may still be indexing them;
    then leave them pending in the ledger (the next sync retries), unless they were added so
    long ago that the profile must be gone (deleted in Klaviyo), and so is off the list."""
    now = datetime.now(UTC)
    with session_scope() as s:
        added_at = added_times(s, ctx.connector_id, user_ids)
    indexing = timedelta(seconds=settings.indexing_wait)
    newest = max((added_at.get(u, now) for u in user_ids), default=now)
    waited = now - ctx.first_attempt_at
    if now - newest < indexing and waited < indexing:
        return Later(
            max(0.2, min(30.0, settings.indexing_wait / 20)),
            "waiting for Klaviyo to index profiles",
        )
    gone_after = timedelta(seconds=max(settings.profile_gone_after, settings.indexing_wait))
    gone = [u for u in user_ids if now - added_at.get(u, now) >= gone_after]
    pending = [u for u in user_ids if u not in set(gone)]
    with session_scope() as s:
        _set_outcome(s, ctx, gone, ItemOutcome.REMOVED, "no such profile in Klaviyo any more")
        confirm_removed(s, ctx.connector_id, gone)
        _set_outcome(
            s,
            ctx,
            pending,
            ItemOutcome.PENDING,
            "not found in Klaviyo yet (still indexing); retried next sync",
        )
    return _finish(ctx)
