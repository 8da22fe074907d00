"""A remove batch: profile ids from the ledger or by lookup, then DELETE at most 1,000 at once.

A member whose profile id the ledger knows (the synchronous path, a read-back, an earlier
lookup) costs the DELETE alone. The others are looked up: external ids account-wide (what we
sent for opaque ids; the list cannot be filtered by them), then emails on the list itself (a
leaver not on the list needs no DELETE); each answer is saved as it comes, so a retry never
asks again. Members not found are waited for while Klaviyo may still be indexing them, then
left pending (or, added long ago, taken as off the list). Ids Klaviyo refuses (merged or
deleted profiles) are forgotten and looked up again, but for a profile known by its id alone (a
foreign one, sync/verify.py), which counts as removed: there is nothing else to find it by.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import MAX_FILTER_VALUES, InvalidRequest, KlaviyoClient
from segops_sync.states import ItemOutcome
from segops_sync.sync import batch_items
from segops_sync.sync.batch_step import (
    BatchContext,
    BatchStep,
    Later,
    finish,
    pause_requested,
    quick_retry,
    record_progress,
    stop_for_pause,
)
from segops_sync.sync.ledger import added_times, confirm_removed, forget_profile_ids
from segops_sync.sync.outcomes import Action, decide


def remove(ctx: BatchContext, client: KlaviyoClient, settings: Settings) -> BatchStep:
    rows: Sequence[Any]
    if ctx.fresh_members is not None:  # written by this step: no need to read them back
        rows = ctx.fresh_members
    else:
        with session_scope() as s:
            rows = batch_items.unsettled(s, ctx)
    if not rows:
        return finish(ctx)
    profile_ids = {u: p for u, _, _, p in rows if p}
    missing = [(u, e, x) for u, e, x, p in rows if not p]
    found: dict[str, str] = {}
    # external_id first (it is what we sent for opaque ids), then email on the list; each
    # chunk of 100 values is one call, saved as soon as it answers so a retry never asks again.
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
        answer = quick_retry(client.find_list_profile_ids, ctx.list_id, chunk)
        hits = {by_email[v.lower()]: pid for v, pid in answer.items() if v.lower() in by_email}
        _record_found(ctx, hits)
        found.update(hits)
    profile_ids.update(found)

    if profile_ids and pause_requested(ctx):  # paused: no DELETE; the lookups changed nothing
        return stop_for_pause(ctx)
    if profile_ids:
        pairs = sorted(profile_ids.items())
        try:
            quick_retry(client.remove_profiles_from_list, ctx.list_id, [p for _, p in pairs])
        except InvalidRequest as exc:
            decision = decide(exc, list_id=ctx.list_id)
            stale = {i for i in decision.members if i < len(pairs)}
            if decision.action is not Action.REJECT_MEMBERS or not stale:
                raise
            # Ids Klaviyo no longer knows (merged or deleted profiles): look them up again. A
            # profile known by its id alone (a foreign one, verify.py) has nothing else to be
            # found by: it is gone from the list, and the next read-back names any survivor.
            stale_users = {pairs[i][0] for i in stale}
            id_only = [u for u, e, x, _ in rows if u in stale_users and not e and not x]
            again = sorted(stale_users - set(id_only))
            with session_scope() as s:
                batch_items.hold_batch(s, ctx)  # items, then the ledger: a forget's order
                _settle_removed(s, ctx, id_only, "not in Klaviyo any more")
                batch_items.forget_found_ids(s, ctx, again)
                forget_profile_ids(s, ctx.connector_id, again)
            return Later(0.1, "stale profile ids")
        with session_scope() as s:
            batch_items.hold_batch(s, ctx)
            _settle_removed(s, ctx, list(profile_ids))
            record_progress(s, ctx)

    unfound = [u for u, _, _ in missing if u not in found]
    if unfound:
        return _unfound(ctx, unfound, settings)
    return finish(ctx)


def _settle_removed(
    s: Session, ctx: BatchContext, user_ids: list[str], reason: str | None = None
) -> None:
    """These members are off the list: their items say so, and they leave the ledger (the
    caller holds the batch row first, a forget's order)."""
    batch_items.set_outcome(s, ctx, user_ids, ItemOutcome.REMOVED, reason)
    confirm_removed(s, ctx.connector_id, user_ids)


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
        batch_items.hold_batch(s, ctx)  # record_progress writes the batch row after the items
        batch_items.save_found_ids(s, ctx, found)
        record_progress(s, ctx)


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
        batch_items.hold_batch(s, ctx)  # items, then the ledger: a forget's order
        _settle_removed(s, ctx, gone, "not on the list in Klaviyo any more")
        batch_items.set_outcome(
            s,
            ctx,
            pending,
            ItemOutcome.PENDING,
            "not found in Klaviyo yet (still indexing); retried next sync",
        )
    return finish(ctx)
