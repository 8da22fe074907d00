"""An add batch in bulk import jobs with the list attached: the path of all but small deltas.

A step submits the batch's unsent members (one job for the whole batch in the common case),
then waits on the account's job watcher (sync/fleet/watcher.py), and settles each finished job: its
members Klaviyo named in import errors are rejected with Klaviyo's reason, the rest enter the
ledger. A job Klaviyo lost, or one unfinished after ``SEGOPS_JOB_GIVE_UP``, is sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from segops_sync.config import Settings
from segops_sync.db.models import SyncBatch
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import (
    ENDPOINT_LIMITS,
    MAX_PAGE_SIZE,
    UNFINISHED_JOB_STATES,
    Endpoint,
    ImportErrorItem,
    InvalidRequest,
    JobStatus,
    KlaviyoClient,
    NotFound,
    ProfileInput,
    split_into_jobs,
)
from segops_sync.states import BatchStatus, ItemOutcome
from segops_sync.sync import batch_items
from segops_sync.sync.batch_items import trait_profiles
from segops_sync.sync.batch_step import (
    BatchContext,
    BatchStep,
    Later,
    finish,
    mark_sending,
    pause_requested,
    quick_retry,
    record_progress,
    stop_for_pause,
    transient,
)
from segops_sync.sync.fleet.access import LimitedSession
from segops_sync.sync.fleet.watcher import AccountJobs, job_overdue
from segops_sync.sync.ledger import accept_job
from segops_sync.sync.outcomes import (
    Action,
    decide,
    member_values,
    profile_rejection_reason,
    rejection_reason,
)
from segops_sync.sync.retry import jitter

log = logging.getLogger(__name__)

# A batch whose job submission slot is this close builds its body now (it takes 0.05-0.5 s)...
SUBMIT_AHEAD = 1.0
# ...and, body built, waits in-process this long at most for a slot before it is re-queued.
# Several batches wait at once and whoever asks first at a free slot takes it: 2 s is too short,
# a few lose that race until their time runs out, go back to the queue and come back 1-1.7 s
# after the other submissions ended, on the first sync's critical path.
SUBMIT_PATIENCE = 4.0


def add_in_bulk(
    ctx: BatchContext,
    client: KlaviyoClient,
    settings: Settings,
    jobs: AccountJobs,
    limited: LimitedSession,
) -> BatchStep:
    if ctx.status == BatchStatus.PENDING and ctx.fresh_members != ():
        # Reading 10,000 members and encoding a 5 MB body costs a tenth of a CPU-second, all of
        # it lost when the limiter then refuses the submission: where submissions are the bound
        # (past 1.5M members, or an account shared by connectors) a batch that built first would
        # build again every time it came back. So it asks first, comes back just before its slot,
        # builds once, and waits out the rest in-process (a slot left idle is time lost for good).
        wait = limited.slot_wait(Endpoint.CREATE_BULK_IMPORT_JOB)
        if wait > SUBMIT_AHEAD:
            ahead = wait - SUBMIT_AHEAD
            return Later(ahead + jitter(ahead), f"a job submission slot in {wait:.2f}s")
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
    # A paused connector's batch sends no new job; the jobs it has out are still settled.
    held_back = bool(unsent) and pause_requested(ctx)
    if unsent and not held_back:
        members = trait_profiles(ctx.run_id, unsent)
        mark_sending(ctx)
        start = 0
        chunks = split_into_jobs([p for _, p in members])
        with limited.patient(SUBMIT_PATIENCE):
            whole = len(chunks) == 1
            for chunk in chunks:
                if start and pause_requested(ctx):
                    held_back = True
                    break
                _submit(ctx, client, members[start : start + len(chunk)], jobs, whole=whole)
                start += len(chunk)

    with session_scope() as s:
        # read again: this very step may have submitted it
        row = s.execute(
            select(SyncBatch.whole_job_id, SyncBatch.job_ids).where(SyncBatch.id == ctx.batch_id)
        ).one()
        whole_job: str | None = row.whole_job_id
        # A job of its own is marked on its members in the transaction that adds it to the
        # batch's jobs: a batch that never submitted another job than its whole one has no
        # marks, and skips reading its 10,000 rows for them (twice for each batch of a sync).
        marked = set(row.job_ids or ()) - {whole_job}
        job_ids = batch_items.job_ids(s, ctx) if marked else []
    if whole_job is not None:
        job_ids.append(whole_job)
        ctx = replace(ctx, whole_job_id=whole_job)
    # One poll of the account's recent jobs answers for every batch (sync/fleet/watcher.py), with
    # each finished job's failed_count; only a job the poll could not find is read on its own.
    view = jobs.view(job_ids)
    running = bool(view.running)
    for job_id in view.finished:
        try:
            failed_count = jobs.final(job_id)
            if failed_count is None:
                job = quick_retry(client.get_bulk_import_job, job_id)
                if job.status in UNFINISHED_JOB_STATES and not job_overdue(
                    job.created_at, settings.job_give_up, _now_us()
                ):
                    jobs.still_running(job_id, job.created_at)  # the poll missed it
                    running = True
                    continue
                if job.status in UNFINISHED_JOB_STATES:  # SEGOPS_JOB_GIVE_UP is past
                    log.warning(
                        "bulk import job %s unfinished %.0fs after it was created: taken as "
                        "lost, its members are sent again",
                        job_id,
                        settings.job_give_up,
                    )
                    _resend(ctx, job_id)
                    jobs.forget([job_id])
                    return Later(0.1, "resend a job given up")
                if job.status == JobStatus.COMPLETE:
                    failed_count = job.failed_count
                    jobs.remember_final(job_id, failed_count)  # read once, even if deferred
            if failed_count is not None:
                # A job Klaviyo counts no failures of has no import errors to read: half of a
                # first sync's job reads, and a burst of them when ten jobs finish in one poll.
                errors = _import_errors(client, limited, job_id, failed_count)
                problem = _settle_job(ctx, job_id, failed_count, errors)
                if problem is not None:
                    return transient(ctx, problem, settings)
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
    return stop_for_pause(ctx) if held_back else finish(ctx)


def _unsent(ctx: BatchContext) -> Sequence[Any]:
    """The batch's members not yet in a job, in key order (user_id, email, external_id,
    traits)."""
    if ctx.whole_job_id is not None:  # the members without a job of their own are in it
        return ()
    with session_scope() as s:
        return batch_items.unsent(s, ctx)


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
                    user_id, profile = members[index]
                    batch_items.set_outcome(
                        s,
                        ctx,
                        [user_id],
                        ItemOutcome.REJECTED,
                        profile_rejection_reason(None, reason, user_id, profile),
                    )
            members = [m for i, m in enumerate(members) if i not in refused]
            continue
        job_id = job.id
        with session_scope() as s:
            batch_items.hold_batch(s, ctx)  # its members, then its row: a forget's order
            if not whole:
                batch_items.mark_job(s, ctx, job_id, [u for u, _ in members])
            s.execute(
                update(SyncBatch)
                .where(SyncBatch.id == ctx.batch_id)
                .values(
                    status=BatchStatus.SUBMITTED,
                    job_ids=SyncBatch.job_ids.op("||")([job_id]),
                    **({"whole_job_id": job_id} if whole else {}),
                )
            )
            record_progress(s, ctx)
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
        batch_items.unmark_job(s, ctx, job_id)


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


def _attributes(payload: dict[str, Any] | None) -> object:
    """What an import error echoes of the member we sent (its type and id are not its data)."""
    return (payload or {}).get("attributes", payload)


def _import_errors(
    client: KlaviyoClient, limited: LimitedSession, job_id: str, failed_count: int
) -> list[ImportErrorItem]:
    """Every import error of a finished job, read in this step.

    A job that refused many of its members has more pages of errors than one burst allows
    (100 pages for 10,000 members; 10 a second and 150 a minute per account). Re-queued when
    the limiter refuses a page, a step would drop the pages it had read, and two such jobs
    settling at once would each get half a minute's budget, every minute, and never settle. So
    a read longer than a burst (over 1,000 failed members) waits in-process for each page, up
    to a steady window: it holds its pool slot for the whole read, minutes when several such
    jobs of one account read together (a job Klaviyo refused a thousand members of is rare; a
    run that never ends is worse). A 429 or a third transient failure still ends the read and
    its pages are read again at the next step. A short read keeps the batch's patience
    (Throttled re-queues). Reading page by page across steps, each page's rejections saved with
    the cursor, would hold no slot; that is the next step."""
    if not failed_count:
        return []
    pages = -(-failed_count // MAX_PAGE_SIZE)
    if pages <= ENDPOINT_LIMITS[Endpoint.GET_BULK_IMPORT_ERRORS].burst:
        return quick_retry(_all_import_errors, client, job_id)
    limiter = limited.limiter
    with limited.patient(limiter.steady_window + limiter.burst_window):
        return quick_retry(_all_import_errors, client, job_id)


def _all_import_errors(client: KlaviyoClient, job_id: str) -> list[ImportErrorItem]:
    return list(client.iter_bulk_import_errors(job_id))


def _settle_job(
    ctx: BatchContext, job_id: str, failed_count: int, errors: Sequence[ImportErrorItem]
) -> str | None:
    """Members of a finished job: rejected ones get Klaviyo's reason, the rest enter the ledger.

    Returns why the job cannot be settled yet, or None. When Klaviyo counts more failed
    profiles than its import errors name, we cannot tell who failed: nobody of the job is
    confirmed (the others would be "added" on faith, the silent success others ship)."""
    whole = job_id == ctx.whole_job_id
    with session_scope() as s:
        batch_items.hold_batch(s, ctx)
        rejected: dict[str, str] = {}
        if errors or failed_count:
            # Only a job with failures needs its members by name, to tell who failed.
            members = batch_items.job_members(s, ctx, job_id, whole=whole)
            by_email = {e.lower(): u for u, e, _ in members if e}
            by_ext = {x: u for u, _, x in members if x}
            stored = {u: (e, x) for u, e, x in members}
            unattributed = 0
            for err in errors:
                email, ext = _identity_keys(err.original_payload)
                user_id = (by_ext.get(ext) if ext else None) or (
                    by_email.get(email) if email else None
                )
                if user_id is None:
                    unattributed += 1
                    continue
                # what Klaviyo echoed and what the member's batch row holds (an external-id
                # match's stored email may differ from the payload's)
                identifiers = (user_id, email, ext, *stored[user_id])
                sent = member_values(_attributes(err.original_payload))
                rejected[user_id] = rejection_reason(err.title, err.detail, identifiers, sent)
            if unattributed:
                log.warning("job %s: %d import errors name no member we sent", job_id, unattributed)
        if failed_count > len(rejected):
            return (
                f"Klaviyo's bulk import job {job_id} counts {failed_count} failed profiles but its "
                f"import errors name {len(rejected)} of ours; its members stay unconfirmed"
            )
        for user_id, reason in rejected.items():
            batch_items.set_outcome(s, ctx, [user_id], ItemOutcome.REJECTED, reason)
        # The rest of the job was accepted: added, or (already on the list) its traits updated.
        accept_job(s, ctx.connector_id, ctx.run_id, ctx.kind, ctx.seq, None if whole else job_id)
        if whole:  # settled: the batch's members without a job are none of its any more
            s.execute(
                update(SyncBatch).where(SyncBatch.id == ctx.batch_id).values(whole_job_id=None)
            )
        record_progress(s, ctx)
    return None
