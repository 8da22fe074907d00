"""The per-connector ledger: who is on the Klaviyo list, as Klaviyo confirmed it.

Every write to ``connector_members`` goes through this module. A row with ``confirmed`` false
is a member sent to Klaviyo whose outcome was never recorded (:func:`adopt_in_doubt`): it may
be on the list, so it counts as there for removals and is sent again while in the segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from segops_sync.db.inserts import insert_unless_conflict
from segops_sync.db.models import LedgerEntry
from segops_sync.states import BatchKind, ItemOutcome, RunStatus


def forget_ledger(session: Session, connector_id: str) -> None:
    session.execute(delete(LedgerEntry).where(LedgerEntry.connector_id == connector_id))


# Members confirmed on the list enter the ledger from their batch-item rows (with what was
# sent, and the hash of the traits sent, so that a change of them is sent again).
_INSERT_ADDED = (
    "INSERT INTO connector_members (connector_id, user_id, email, external_id, profile_id, "
    "traits_hash) "
    "SELECT :c, it.user_id, it.email, it.external_id, it.profile_id, it.traits_hash "
    "FROM {source}"
)
# ... and update the row a member already has.
_CONFIRM_ADDED = _INSERT_ADDED + (
    " ON CONFLICT (connector_id, user_id) DO UPDATE SET email = EXCLUDED.email, "
    "external_id = EXCLUDED.external_id, traits_hash = EXCLUDED.traits_hash, "
    "profile_id = COALESCE(EXCLUDED.profile_id, connector_members.profile_id), confirmed = true"
)


def _hold_connector(session: Session, connector_id: str) -> bool:
    """The ledger's foreign key, checked once per statement instead of once per row: a key
    share lock on the connector row until commit. A connector deleted before it has no ledger
    to write to (False); one deleted after waits for this commit, then its trigger deletes what
    was written (migration 0005)."""
    return (
        session.scalar(
            text("SELECT true FROM connectors WHERE id = :c FOR KEY SHARE"), {"c": connector_id}
        )
        is not None
    )


def confirm_added(
    session: Session, connector_id: str, run_id: str, user_ids: Sequence[str]
) -> None:
    """Members Klaviyo accepted into the list enter the ledger."""
    if not user_ids or not _hold_connector(session, connector_id):
        return
    session.execute(
        text(
            _CONFIRM_ADDED.format(
                source="sync_batch_items it WHERE it.run_id = :r AND it.user_id = ANY(:u)"
            )
        ),
        {"c": connector_id, "r": run_id, "u": list(user_ids)},
    )


def accept_job(
    session: Session, connector_id: str, run_id: str, kind: str, seq: int, job_id: str | None
) -> None:
    """Every member of one batch's finished bulk job not rejected by name was accepted: its
    item becomes added (or updated, a refresh of traits) and it enters the ledger, in one
    statement over the batch's index (the items' update feeds the insert). ``job_id`` None:
    the job the batch row names, which holds every unsettled member without a job of its own.

    A joiner was not in the ledger when its batch was written, so its row goes in by a plain
    insert; a refresh updates the row it has. ON CONFLICT for all of them only if the plain
    insert met a row after all (a race: db/inserts.py)."""
    if not _hold_connector(session, connector_id):
        return
    accepted = (
        "WITH accepted AS (UPDATE sync_batch_items it SET outcome = CASE WHEN refresh "
        f"THEN '{ItemOutcome.UPDATED}' ELSE '{ItemOutcome.ADDED}' END "
        "WHERE it.run_id = :r AND it.kind = :k AND it.seq = :q "
        f"AND it.job_id {'IS NULL' if job_id is None else '= :j'} AND it.outcome IS NULL "
        "RETURNING it.user_id, it.email, it.external_id, it.profile_id, it.traits_hash, "
        "it.refresh)"
    )
    insert_unless_conflict(
        session,
        text(
            f"{accepted}, refreshed AS ("
            + _CONFIRM_ADDED.format(source="accepted it WHERE it.refresh")
            + ") "
            + _INSERT_ADDED.format(source="accepted it WHERE NOT it.refresh")
        ),
        text(f"{accepted} " + _CONFIRM_ADDED.format(source="accepted it")),
        {"c": connector_id, "r": run_id, "k": kind, "q": seq, "j": job_id},
    )


# The unsettled members of a connector's add batches that sent them to Klaviyo and ended (their
# run closed) before recording what Klaviyo said; the batches stop being in doubt.
_IN_DOUBT = f"""
    WITH doubt AS (
      UPDATE sync_batches b SET in_doubt = false
      FROM sync_runs r
      WHERE b.in_doubt AND r.id = b.run_id AND r.connector_id = :c
        AND r.status <> '{RunStatus.RUNNING}' AND b.kind = '{BatchKind.ADD}'
      RETURNING b.run_id, b.kind, b.seq, b.sent_at, r.list_id),
    members AS (
      SELECT DISTINCT ON (it.user_id) it.user_id, it.email, it.external_id, it.profile_id,
             it.traits_hash, d.sent_at
      FROM doubt d JOIN sync_batch_items it
        ON it.run_id = d.run_id AND it.kind = d.kind AND it.seq = d.seq
      WHERE it.outcome IS NULL AND d.list_id = :list
      ORDER BY it.user_id, d.sent_at DESC)
"""


def adopt_in_doubt(session: Session, connector_id: str, list_id: str) -> int:
    """Members an ended batch sent to Klaviyo without recording the outcome (the run failed
    between Klaviyo's answer and the ledger write, or gave the batch up) may be on the list:
    they enter the ledger unconfirmed, with the time they were sent. The planner then removes
    those who left the segment (a removal of a profile not on the list changes nothing) and
    sends the others again, which confirms them. Members of a batch that wrote to another
    list (the connector's list changed since) are let go: the ledger is about this list."""
    if not _hold_connector(session, connector_id):
        return 0
    result = session.execute(
        text(
            f"{_IN_DOUBT} INSERT INTO connector_members (connector_id, user_id, email, "
            "external_id, profile_id, traits_hash, added_at, confirmed) "
            "SELECT :c, m.user_id, m.email, m.external_id, m.profile_id, m.traits_hash, "
            "COALESCE(m.sent_at, now()), false FROM members m "
            "ON CONFLICT (connector_id, user_id) DO NOTHING"
        ),
        {"c": connector_id, "list": list_id},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def confirm_removed(session: Session, connector_id: str, user_ids: Sequence[str]) -> None:
    if not user_ids:
        return
    session.execute(
        text("DELETE FROM connector_members WHERE connector_id = :c AND user_id = ANY(:u)"),
        {"c": connector_id, "u": list(user_ids)},
    )


def forget_profile_ids(session: Session, connector_id: str, user_ids: Sequence[str]) -> None:
    """Klaviyo no longer knows these ids (merged or deleted profiles): look them up again."""
    if not user_ids:
        return
    session.execute(
        update(LedgerEntry)
        .where(LedgerEntry.connector_id == connector_id, LedgerEntry.user_id.in_(user_ids))
        .values(profile_id=None)
    )


def added_times(
    session: Session, connector_id: str, user_ids: Sequence[str]
) -> dict[str, datetime]:
    """When each of these members entered the list, as far as the ledger knows."""
    rows = session.execute(
        select(LedgerEntry.user_id, LedgerEntry.added_at).where(
            LedgerEntry.connector_id == connector_id, LedgerEntry.user_id.in_(list(user_ids))
        )
    ).all()
    return {user_id: added_at for user_id, added_at in rows}


# -- what a read-back of the list taught us (sync/verify.py) -------------------------------


def forget_missing(
    session: Session,
    connector_id: str,
    missing_sql: str,
    params: dict[str, Any],
    confirmed_before: datetime,
) -> int:
    """Members Klaviyo no longer has on the list leave the ledger, so the next sync adds them
    again. ``missing_sql`` selects their user_ids; only rows confirmed before the read began go
    (a run may have added others since)."""
    result = session.execute(
        text(
            "DELETE FROM connector_members cm WHERE cm.connector_id = :c "
            f"AND cm.added_at < :confirmed_before AND cm.user_id IN ({missing_sql})"
        ),
        {**params, "c": connector_id, "confirmed_before": confirmed_before},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def adopt_foreign(
    session: Session, connector_id: str, profiles_sql: str, params: dict[str, Any], prefix: str
) -> int:
    """Profiles the connector never added enter the ledger (user_id ``prefix + profile id``),
    so that the normal removal path, mass-removal guard included, removes them.
    ``profiles_sql`` selects profile_id.

    By the profile id alone: the DELETE needs nothing else, and a profile on the list that is
    no member of ours may be a person who was forgotten (a forget whose Klaviyo removal failed,
    or ran while this list was read): their email or external id must not come back into our
    tables through the repair, nor stay in its batch items for the retention period."""
    if not _hold_connector(session, connector_id):
        return 0
    result = session.execute(
        text(
            "INSERT INTO connector_members (connector_id, user_id, profile_id) "
            "SELECT :c, :prefix || f.profile_id, f.profile_id "
            f"FROM ({profiles_sql}) f ON CONFLICT (connector_id, user_id) DO NOTHING"
        ),
        {**params, "c": connector_id, "prefix": prefix},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def release_foreign(session: Session, connector_id: str, prefix: str) -> int:
    """Adopted foreign profiles leave the ledger again (their removal was held)."""
    result = session.execute(
        text(
            "DELETE FROM connector_members WHERE connector_id = :c "
            "AND starts_with(user_id, :prefix)"
        ),
        {"c": connector_id, "prefix": prefix},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def learn_profile_ids(
    session: Session, connector_id: str, pairs_sql: str, params: dict[str, Any]
) -> int:
    """Keep the profile id the read-back paired with each member, so that its removal needs no
    lookup. ``pairs_sql`` selects (user_id, profile_id); a member paired with two profiles (its
    email on one, its external_id on another) is left as it is, since either could be it.
    One statement, touching only rows whose id is unknown or differs."""
    result = session.execute(
        text(
            "UPDATE connector_members cm SET profile_id = p.profile_id "
            "FROM (SELECT user_id, min(profile_id) AS profile_id "
            f"      FROM ({pairs_sql}) x GROUP BY user_id HAVING count(*) = 1) p "
            "WHERE cm.connector_id = :c AND cm.user_id = p.user_id "
            "AND cm.profile_id IS DISTINCT FROM p.profile_id"
        ),
        {**params, "c": connector_id},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def mark_suppressed(
    session: Session, connector_id: str, suppressed_sql: str, params: dict[str, Any]
) -> None:
    """Remember which members Klaviyo suppresses (``suppressed_sql`` selects their user_ids):
    every run then counts them, not only the runs a read-back starts."""
    session.execute(
        text(
            "UPDATE connector_members cm SET suppressed = "
            f"(cm.user_id IN ({suppressed_sql})) WHERE cm.connector_id = :c "
            f"AND cm.suppressed IS DISTINCT FROM (cm.user_id IN ({suppressed_sql}))"
        ),
        {**params, "c": connector_id},
    )


def suppressed_count(session: Session, connector_id: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.connector_id == connector_id, LedgerEntry.suppressed)
        )
        or 0
    )
