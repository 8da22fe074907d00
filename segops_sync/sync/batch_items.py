"""A batch's member rows (``sync_batch_items``): the one module that reads and writes them.

A member row is keyed by (run_id, user_id) and indexed by its batch (run_id, kind, seq). The
bulk paths name the batch in every statement (see ``_THIS_BATCH``); the direct path's writes
and the trait check's (``trait_profiles``) name the run and the user, the primary key (a member is
in one batch of a run).

Left where they are, as single set-based statements: the planner's materialization (INSERT ...
SELECT from the segment, sync/planner.py), the ledger's ``accept_job`` (one statement settles
the items and feeds the ledger's insert) and ``confirm_added`` (reads the items into the
ledger), the retention purge (sync/retention.py), and the run-wide reports (progress, runs,
rejected, verify's run history).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Select, select, text, update
from sqlalchemy.orm import Session

from segops_sync.db.models import SyncBatchItem
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import ProfileInput
from segops_sync.states import ItemOutcome
from segops_sync.sync.inputs.traits import klaviyo_profile


class BatchKey(Protocol):
    """Which batch: its run, kind and seq (a ``BatchContext`` is one)."""

    @property
    def run_id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def seq(self) -> int: ...


# A batch's own rows: every update of members names the batch, so its plan starts from the
# batch's index (at most 10,000 rows) whatever the statistics say about the run: with statistics
# that know only the previous run, "run_id = :r AND user_id = ANY" can get a plan that reads the
# whole run per lookup (250 ms instead of 2).
_THIS_BATCH = "run_id = :r AND kind = :k AND seq = :q"


def _batch_params(batch: BatchKey) -> dict[str, Any]:
    return {"r": batch.run_id, "k": batch.kind, "q": batch.seq}


def hold_batch(s: Session, batch: BatchKey) -> None:
    """Lock the batch's row first in a transaction that writes its members and then the ledger
    (which takes the connector row): the order a forget takes them (batches, connectors, then
    members), so the two wait for each other instead of deadlocking."""
    s.execute(
        text(f"SELECT 1 FROM sync_batches WHERE {_THIS_BATCH} FOR NO KEY UPDATE"),
        _batch_params(batch),
    )


def _of(batch: BatchKey) -> tuple[ColumnElement[bool], ...]:
    """The condition that selects the batch's rows (an index), for the ORM's statements."""
    return (
        SyncBatchItem.run_id == batch.run_id,
        SyncBatchItem.kind == batch.kind,
        SyncBatchItem.seq == batch.seq,
    )


# -- reads ------------------------------------------------------------------------------------


def outcome_counts(s: Session, batch: BatchKey) -> tuple[dict[str | None, int], int]:
    """How many members have each outcome (None: unsettled), and how many trait values were
    left out of what was sent."""
    counts: dict[str | None, int] = {}
    dropped = 0
    for outcome, n, traits_dropped in s.execute(
        text(
            "SELECT outcome, count(*), COALESCE(sum(cardinality(dropped_traits)), 0) "
            f"FROM sync_batch_items WHERE {_THIS_BATCH} "
            "GROUP BY outcome"
        ),
        _batch_params(batch),
    ):
        counts[outcome] = int(n)
        dropped += int(traits_dropped)
    return counts, dropped


def unsent(s: Session, batch: BatchKey) -> Sequence[Any]:
    """The members in no job and without an outcome, in key order (user_id, email,
    external_id, traits). Core, not the ORM's row processing: ten thousand plain tuples."""
    return (
        s.connection()
        .execute(
            select(
                SyncBatchItem.user_id,
                SyncBatchItem.email,
                SyncBatchItem.external_id,
                SyncBatchItem.traits,
            )
            .where(*_of(batch), SyncBatchItem.job_id.is_(None), SyncBatchItem.outcome.is_(None))
            .order_by(SyncBatchItem.user_id)
        )
        .all()
    )


def job_ids(s: Session, batch: BatchKey) -> list[str]:
    """The jobs that hold unsettled members by a mark of their own (not the whole-batch job)."""
    return [
        job_id
        for job_id in s.scalars(
            select(SyncBatchItem.job_id)
            .where(*_of(batch), SyncBatchItem.job_id.is_not(None), SyncBatchItem.outcome.is_(None))
            .distinct()
        )
        if job_id is not None
    ]


def job_members(s: Session, batch: BatchKey, job_id: str, *, whole: bool) -> Sequence[Any]:
    """The unsettled members of one job (user_id, email, external_id). ``whole``: the job the
    batch row names, which holds every member without a job of its own."""
    in_job = SyncBatchItem.job_id.is_(None) if whole else SyncBatchItem.job_id == job_id
    return s.execute(
        select(SyncBatchItem.user_id, SyncBatchItem.email, SyncBatchItem.external_id).where(
            *_of(batch), in_job, SyncBatchItem.outcome.is_(None)
        )
    ).all()


def _unsettled(batch: BatchKey) -> Select[str, str | None, str | None, str | None]:
    return select(
        SyncBatchItem.user_id,
        SyncBatchItem.email,
        SyncBatchItem.external_id,
        SyncBatchItem.profile_id,
    ).where(*_of(batch), SyncBatchItem.outcome.is_(None))


def unsettled(s: Session, batch: BatchKey) -> Sequence[Any]:
    """The members without an outcome (user_id, email, external_id, profile_id)."""
    return s.execute(_unsettled(batch)).all()


def unsettled_with_traits(s: Session, batch: BatchKey) -> Sequence[Any]:
    """The members without an outcome, in key order (user_id, email, external_id, profile_id,
    traits)."""
    return s.execute(
        _unsettled(batch).add_columns(SyncBatchItem.traits).order_by(SyncBatchItem.user_id)
    ).all()


def unsettled_profile_ids(s: Session, batch: BatchKey) -> Sequence[Any]:
    """(user_id, profile_id) of the members without an outcome whose profile id is known, in
    key order."""
    return s.execute(
        select(SyncBatchItem.user_id, SyncBatchItem.profile_id)
        .where(*_of(batch), SyncBatchItem.outcome.is_(None), SyncBatchItem.profile_id.is_not(None))
        .order_by(SyncBatchItem.user_id)
    ).all()


# -- writes of the bulk paths: the batch named in every statement -----------------------------


def set_outcome(
    s: Session,
    batch: BatchKey,
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
            {"o": outcome, "why": reason, **_batch_params(batch), "u": ids},
        )


def mark_job(s: Session, batch: BatchKey, job_id: str, user_ids: list[str]) -> None:
    """These members went out in this job (a job that does not hold the whole batch)."""
    s.execute(
        text(
            "UPDATE sync_batch_items SET job_id = :j "
            f"WHERE {_THIS_BATCH} AND user_id = ANY(CAST(:u AS text[]))"
        ),
        {"j": job_id, **_batch_params(batch), "u": user_ids},
    )


def unmark_job(s: Session, batch: BatchKey, job_id: str) -> None:
    """The unsettled members of a lost job are unsent again."""
    s.execute(
        update(SyncBatchItem)
        .where(*_of(batch), SyncBatchItem.job_id == job_id, SyncBatchItem.outcome.is_(None))
        .values(job_id=None)
    )


def _save_profile_ids(
    s: Session, rows: str, params: dict[str, Any], found: Mapping[str, str]
) -> None:
    """user_id -> profile_id onto the member rows ``rows`` selects; one pair of arrays."""
    s.execute(
        text(
            "UPDATE sync_batch_items it SET profile_id = f.pid "
            "FROM unnest(CAST(:u AS text[]), CAST(:p AS text[])) AS f(uid, pid) "
            f"WHERE {rows} AND it.user_id = f.uid"
        ),
        {**params, "u": list(found), "p": list(found.values())},
    )


def save_found_ids(s: Session, batch: BatchKey, found: Mapping[str, str]) -> None:
    """Profile ids learnt by lookup (user_id -> profile_id)."""
    rows = "it.run_id = :r AND it.kind = :k AND it.seq = :q"
    _save_profile_ids(s, rows, _batch_params(batch), found)


def forget_found_ids(s: Session, batch: BatchKey, user_ids: list[str]) -> None:
    """Profile ids Klaviyo no longer knows: the members are looked up again."""
    s.execute(
        update(SyncBatchItem)
        .where(*_of(batch), SyncBatchItem.user_id.in_(user_ids))
        .values(profile_id=None)
    )


# -- writes of the direct path and of trait checks: the run and the user (the key) ------------


def save_upserted_ids(s: Session, run_id: str, learnt: Mapping[str, str]) -> None:
    """Profile ids Klaviyo answered to upserts (user_id -> profile_id)."""
    _save_profile_ids(s, "it.run_id = :r", {"r": run_id}, learnt)


def forget_upserted_ids(s: Session, run_id: str, user_ids: Sequence[str]) -> None:
    s.execute(
        update(SyncBatchItem)
        .where(SyncBatchItem.run_id == run_id, SyncBatchItem.user_id.in_(list(user_ids)))
        .values(profile_id=None)
    )


def reject(s: Session, run_id: str, reasons: Mapping[str, str]) -> None:
    """Members Klaviyo refused, each with its reason (user_id -> reason)."""
    for user_id, reason in reasons.items():
        s.execute(
            update(SyncBatchItem)
            .where(SyncBatchItem.run_id == run_id, SyncBatchItem.user_id == user_id)
            .values(outcome=ItemOutcome.REJECTED, reason=reason)
        )


def accept_listed(s: Session, run_id: str, user_ids: list[str]) -> None:
    """Members the list write named and Klaviyo took: added, or (a refresh) updated."""
    for refresh, outcome in ((False, ItemOutcome.ADDED), (True, ItemOutcome.UPDATED)):
        s.execute(
            update(SyncBatchItem)
            .where(
                SyncBatchItem.run_id == run_id,
                SyncBatchItem.user_id.in_(user_ids),
                SyncBatchItem.refresh.is_(refresh),
            )
            .values(outcome=outcome, reason=None)
        )


def record_dropped_traits(s: Session, run_id: str, dropped: Mapping[str, list[str]]) -> None:
    """The names of the trait values left out of what was sent (user_id -> names); set, not
    added: a resumed batch counts them once."""
    s.execute(
        text(
            "UPDATE sync_batch_items it SET dropped_traits = "
            "ARRAY(SELECT jsonb_array_elements_text(d.names)) "
            "FROM jsonb_each(CAST(:d AS jsonb)) AS d(uid, names) "
            "WHERE it.run_id = :r AND it.user_id = d.uid"
        ),
        {"r": run_id, "d": json.dumps(dropped)},
    )


def trait_profiles(
    run_id: str, rows: Sequence[tuple[str, str | None, str | None, Mapping[str, Any] | None]]
) -> list[tuple[str, ProfileInput]]:
    """(user_id, profile) for batch rows (user_id, email, external_id, traits); the names of
    refused values are set on the rows (set, not added: a resumed batch counts them once)."""
    members: list[tuple[str, ProfileInput]] = []
    dropped: dict[str, list[str]] = {}
    identified = ProfileInput.identified
    for user_id, email, external_id, traits in rows:
        if not traits:  # the common case: no traits to check, no wrapper to build
            members.append((user_id, identified(email, external_id)))
            continue
        built = klaviyo_profile(email, external_id, traits)
        members.append((user_id, built.profile))
        if built.dropped:
            dropped[user_id] = built.dropped
    if dropped:
        with session_scope() as s:
            record_dropped_traits(s, run_id, dropped)
    return members
