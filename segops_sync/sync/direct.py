"""The synchronous path for a small delta's adds: no bulk job to wait for.

Each member is upserted with ``POST /api/profile-import`` (which answers with the profile id),
then the ids join the list with one ``POST /api/lists/{id}/relationships/profiles``. The planner
sends a run's adds this way when they are few (``costs.goes_direct``; the arithmetic is there).

Same guarantees as the bulk path: every request takes a slot from the fleet-wide limiter (a
``Throttled`` aborts the step, and what was learnt so far is saved first); the profile ids are
saved on the batch-item rows as they come, so a retry, a crash or a redelivery resumes where it
stopped (an upsert repeated after a crash is harmless: Klaviyo matches the same profile); and a
member enters the ledger only once Klaviyo answered 204 to the list write that names it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from segops_sync.db.session import session_scope
from segops_sync.klaviyo import (
    MAX_IDS_PER_RELATIONSHIP_CALL,
    InvalidRequest,
    KlaviyoClient,
    ProfileInput,
)
from segops_sync.sync import batch_items
from segops_sync.sync.batch_items import BatchKey, trait_profiles
from segops_sync.sync.ledger import confirm_added
from segops_sync.sync.outcomes import profile_rejection_reason

log = logging.getLogger(__name__)

# Profile ids are written back every this many upserts (and whenever the step stops).
SAVE_EVERY = 25
# What add_directly returns when the connector was paused before a list write (sync/pause.py).
PAUSED = "paused before the list write"


def member_problem(exc: InvalidRequest, user_id: str, profile: ProfileInput) -> str | None:
    """Klaviyo's reason when a refused upsert names the member's own data, else None (then the
    request itself is wrong, and the batch fails as the bulk path would)."""
    named = [e for e in exc.errors if (e.pointer or "").startswith("/data")]
    if not named:
        return None
    first = named[0]
    return profile_rejection_reason(first.title, first.detail, user_id, profile)


def add_directly(
    batch: BatchKey,
    connector_id: str,
    list_id: str,
    client: KlaviyoClient,
    *,
    retry: Callable[..., Any],
    on_progress: Callable[[], None],
    on_sending: Callable[[], None] = lambda: None,
    stop: Callable[[], bool] = lambda: False,
) -> str | None:
    """Drive one synchronous add batch as far as it goes.

    Returns None when every member has an outcome, or a short reason when the step must come
    back (stale profile ids to upsert again). Raises what the client raises (Throttled, 429s,
    transient and permanent errors); the caller maps those exactly as for bulk batches.
    ``retry`` wraps each call (quick in-process retries of transient failures);
    ``on_sending`` is called (and commits) before the first list write. ``stop`` is asked
    before each list write (the batch boundary of a pause: upserts put nobody on the list);
    when it says so, :data:`PAUSED` comes back and nothing more is sent.
    """
    run_id = batch.run_id
    with session_scope() as s:
        rows = batch_items.unsettled_with_traits(s, batch)
    # the named traits, refused values left out and named on the item (see sync/inputs/traits.py)
    profiles = trait_profiles(run_id, [(u, e, x, t) for u, e, x, p, t in rows if not p])

    learnt: dict[str, str] = {}
    rejected: dict[str, str] = {}
    try:
        for user_id, profile in profiles:
            try:
                learnt[user_id] = retry(client.upsert_profile, profile)
            except InvalidRequest as exc:
                reason = member_problem(exc, user_id, profile)
                if reason is None:
                    raise
                rejected[user_id] = reason
            if len(learnt) + len(rejected) >= SAVE_EVERY:
                _save(run_id, learnt, rejected, on_progress)
                learnt, rejected = {}, {}
    finally:
        _save(run_id, learnt, rejected, on_progress)

    with session_scope() as s:
        pairs = batch_items.unsettled_profile_ids(s, batch)
    if pairs and stop():  # asked before in_doubt is set: nothing of this batch was sent
        return PAUSED
    if pairs:  # from here Klaviyo may put them on the list before we record it
        on_sending()
    for start in range(0, len(pairs), MAX_IDS_PER_RELATIONSHIP_CALL):
        if start and stop():
            return PAUSED
        chunk = pairs[start : start + MAX_IDS_PER_RELATIONSHIP_CALL]
        users = [u for u, _ in chunk]
        try:
            retry(client.add_profiles_to_list, list_id, [p for _, p in chunk])
        except InvalidRequest as exc:
            stale = {i for i in exc.profile_indexes() if i < len(chunk)}
            if not stale:
                raise
            # Ids Klaviyo no longer knows (a profile merged or deleted since): upsert again.
            _forget_ids(run_id, [users[i] for i in stale])
            return "stale profile ids"
        with session_scope() as s:
            batch_items.hold_batch(s, batch)
            batch_items.accept_listed(s, run_id, users)
            confirm_added(s, connector_id, run_id, users)
        on_progress()
    return None


def _save(
    run_id: str,
    learnt: dict[str, str],
    rejected: dict[str, str],
    on_progress: Callable[[], None],
) -> None:
    if not learnt and not rejected:
        return
    with session_scope() as s:
        if learnt:
            batch_items.save_upserted_ids(s, run_id, learnt)
        batch_items.reject(s, run_id, rejected)
    on_progress()


def _forget_ids(run_id: str, user_ids: Sequence[str]) -> None:
    with session_scope() as s:
        batch_items.forget_upserted_ids(s, run_id, user_ids)
