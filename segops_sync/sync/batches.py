"""One batch against Klaviyo: resumable, idempotent, and honest about what Klaviyo confirmed.

A batch is a row; its members are rows (sync/batch_items.py). Each call of :func:`run_batch`
picks up where the last one stopped (after a retry, a crash or a redelivery) and returns either
``Finished`` or ``Later`` (call again after a countdown: throttled, a job still running, a
profile not indexed yet, a transient failure). The ledger changes only for what Klaviyo
confirmed.

This module is the state machine: it loads the batch, sends it down its path by kind and size
(sync/bulk_add.py, sync/direct.py, sync/removal.py) and maps what Klaviyo or the limiter said
into the next step. What a step is and the bookkeeping the paths share are sync/batch_step.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from segops_sync.config import ConfigError, Settings
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import Endpoint, KlaviyoClient, KlaviyoError, scrub
from segops_sync.observability import logging as obs_log
from segops_sync.secrets import decrypt_api_key
from segops_sync.states import OPEN_BATCH, BatchKind, BatchStatus
from segops_sync.sync.batch_step import (
    BatchContext,
    BatchStep,
    BatchStore,
    Finished,
    Later,
    PostgresBatchStore,
    finish,
    mark_sending,
    pause_requested,
    quick_retry,
    record_progress,
    stop_for_pause,
    transient,
)
from segops_sync.sync.bulk_add import add_in_bulk
from segops_sync.sync.costs import goes_direct
from segops_sync.sync.direct import PAUSED, add_directly
from segops_sync.sync.fleet.access import KlaviyoAccess, LimitedSession, Throttled
from segops_sync.sync.outcomes import Action, decide
from segops_sync.sync.removal import remove
from segops_sync.sync.retry import jitter, wait_or_backoff

log = logging.getLogger(__name__)

Work = Callable[[BatchContext, KlaviyoClient, Settings], BatchStep]


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
    if ctx.paused and ctx.status == BatchStatus.PENDING:
        # The batch boundary: nothing of it is at Klaviyo awaiting an answer. (A submitted bulk
        # batch still settles its jobs, then stops before sending more: sync/bulk_add.py.)
        return stop_for_pause(ctx)
    if ctx.abort_reason and not ctx.paused:
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
                return _add_direct(ctx, client)
            if ctx.kind == BatchKind.ADD:
                return add_in_bulk(ctx, client, settings, access.jobs(client, limited), limited)
            return remove(ctx, client, settings)
    except (Throttled, KlaviyoError) as exc:
        decision = decide(exc, list_id=ctx.list_id)
        from_klaviyo = not isinstance(exc, Throttled)
        # Only a built body waits for its submission slot in-process (SUBMIT_PATIENCE).
        built = isinstance(exc, Throttled) and exc.endpoint == Endpoint.CREATE_BULK_IMPORT_JOB
    if decision.action is Action.WAIT:
        wait = wait_or_backoff(decision.wait, ctx.attempts + 1, settings)
        if limited is not None and from_klaviyo:
            limited.rate_limited(wait)  # a 429 backs off the whole fleet
        return Later(wait + jitter(wait), decision.message, ahead=built)
    if decision.action is Action.RETRY:
        return transient(ctx, scrub(decision.message, api_key), settings, store)
    # FAIL_RUN, or members refused where the path could not drop them itself.
    store.fail(ctx, scrub(decision.message, api_key), permanent=True)
    return Finished(batch_id, False)


def _add_direct(ctx: BatchContext, client: KlaviyoClient) -> BatchStep:
    """A small delta's adds: profile-import per member, then one list write (sync/direct.py)."""

    def progress() -> None:
        with session_scope() as s:
            record_progress(s, ctx)

    again = add_directly(
        ctx,
        ctx.connector_id,
        ctx.list_id,
        client,
        retry=quick_retry,
        on_progress=progress,
        on_sending=lambda: mark_sending(ctx),
        stop=lambda: pause_requested(ctx),
    )
    if again is PAUSED:
        return stop_for_pause(ctx)
    if again is not None:
        return Later(0.1, again)
    return finish(ctx)
