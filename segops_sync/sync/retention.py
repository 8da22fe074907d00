"""Member data leaves on time: what a run wrote of its members goes SEGOPS_RETENTION_DAYS after
it finished, and a list read back for a verification never outlives that verification.

What stays is live state: ``identities`` (the latest ``context_identified`` of each user, which
the next sync of any segment needs), ``connector_members`` (who is on each list: a member leaves
it when they leave the list) and ``segment_members`` (the recompute service's). What goes:

- a finished run's ``sync_batch_items`` (each member's email, external id, traits and Klaviyo's
  answer, the rejected members' details among them) and the member lists of its
  ``sync_batches`` (``user_ids``, ``lo_user_id``, ``hi_user_id``). The run keeps its counts and
  is stamped ``purged_at``. A run still running is never touched, however old; nor is one
  with a batch in doubt (members Klaviyo may have accepted unrecorded) until those are in the
  ledger (sync/ledger.py adopt_in_doubt): the connector's next run enters them, or, once the
  run has expired and no run of the connector is going (a paused or inactive one has no next
  run), the purge does.
- ``list_snapshots`` whose verification is no longer running (crashed: killed, out of memory,
  its database connection lost). A verification holds a lease, a PostgreSQL session advisory
  lock on its verify id, from before its first page to after its snapshot is deleted;
  PostgreSQL releases it when the holder's connection ends, however the process ended. A
  snapshot whose lease can be taken has no verification left.

The purge costs live runs nothing: it takes no table lock (plain DELETE / UPDATE of rows that
only finished runs own), deletes a few thousand rows per statement, each in its own short
transaction, and gives up on a row someone holds (``lock_timeout``) until the next pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, OperationalError

from segops_sync.config import Settings
from segops_sync.db.session import get_engine, session_scope
from segops_sync.states import RunStatus
from segops_sync.sync.ledger import adopt_in_doubt

log = logging.getLogger(__name__)

# Seconds between two passes of the beat's purge (nothing to do costs one index probe).
PURGE_INTERVAL = 600.0
# Rows per DELETE: a statement of a few milliseconds, however large the run was.
ROWS_PER_STATEMENT = 5_000
# Runs purged per pass: a first pass over years of history is spread over several.
RUNS_PER_PASS = 200
# A row someone holds is left for the next pass rather than waited for.
LOCK_TIMEOUT = "2s"
# Class id of the verify leases' advisory locks (the object id is a hash of the verify id).
SNAPSHOT_LEASE_CLASS = 7313008


@dataclass(frozen=True)
class Purged:
    runs: int  # runs whose member details were deleted
    items: int  # sync_batch_items rows deleted
    snapshots: int  # list_snapshots rows of crashed verifications deleted


def purge_expired(
    settings: Settings,
    *,
    now: datetime | None = None,
    rows_per_statement: int = ROWS_PER_STATEMENT,
    runs_per_pass: int = RUNS_PER_PASS,
) -> Purged:
    """One pass: the member details of runs finished more than ``retention_days`` ago, and the
    snapshots of verifications no longer running."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.retention_days)
    _settle_doubt(cutoff)
    with session_scope() as s:
        run_ids = list(
            s.scalars(
                text(
                    "SELECT id FROM sync_runs WHERE purged_at IS NULL "
                    "AND finished_at IS NOT NULL AND finished_at < :cutoff "
                    "AND status <> 'running' AND NOT EXISTS (SELECT 1 FROM sync_batches b "
                    "WHERE b.run_id = sync_runs.id AND b.in_doubt) "
                    "ORDER BY finished_at LIMIT :n"
                ),
                {"cutoff": cutoff, "n": runs_per_pass},
            )
        )
    runs = items = 0
    for run_id in run_ids:
        deleted = purge_run(run_id, rows_per_statement)
        if deleted is not None:
            runs += 1
            items += deleted
    return Purged(runs, items, purge_abandoned_snapshots(rows_per_statement))


def _settle_doubt(cutoff: datetime) -> None:
    """An expired run held back by a batch in doubt waits for its connector's next run to
    enter those members in the ledger. A paused or inactive connector has no next run, so the
    items would stay for good: the purge enters them itself (as the planner would: unconfirmed,
    possibly on the list), where no run of the connector is going (that one's plan did, or its
    end will leave them for the next)."""
    with session_scope() as s:
        held = s.execute(
            text(
                "SELECT DISTINCT c.id, c.list_id FROM sync_runs r "
                "JOIN connectors c ON c.id = r.connector_id "
                "WHERE r.purged_at IS NULL AND r.finished_at < :cutoff "
                f"AND r.status <> '{RunStatus.RUNNING}' "
                "AND EXISTS (SELECT 1 FROM sync_batches b WHERE b.run_id = r.id AND b.in_doubt) "
                "AND NOT EXISTS (SELECT 1 FROM sync_runs g WHERE g.connector_id = c.id "
                f"AND g.status = '{RunStatus.RUNNING}')"
            ),
            {"cutoff": cutoff},
        ).all()
    for connector_id, list_id in held:
        with session_scope() as s:
            adopted = adopt_in_doubt(s, connector_id, list_id)
        log.info(
            "connector %s: %d members of expired runs in doubt entered in the ledger",
            connector_id,
            adopted,
        )


# A chunk of rows to delete, found by an index prefix (:n rows at most): the DELETE joins it on
# the primary key, since PostgreSQL's DELETE takes no LIMIT.
_RUN_ITEMS = (
    "DELETE FROM sync_batch_items it USING ("
    "  SELECT run_id, user_id FROM sync_batch_items WHERE run_id = :r LIMIT :n"
    ") d WHERE it.run_id = d.run_id AND it.user_id = d.user_id"
)
_SNAPSHOT_ROWS = (
    "DELETE FROM list_snapshots ls USING ("
    "  SELECT verify_id, profile_id FROM list_snapshots WHERE verify_id = :v LIMIT :n"
    ") d WHERE ls.verify_id = d.verify_id AND ls.profile_id = d.profile_id"
)


def _delete_in_chunks(
    sql: str,
    params: dict[str, object],
    rows_per_statement: int,
    *,
    lock_timeout: str | None = None,
) -> int:
    """Run the chunk DELETE ``sql`` (``:n`` bound to ``rows_per_statement``), each chunk in its
    own short transaction, until a chunk comes back short; rows deleted. With ``lock_timeout``
    a held row raises OperationalError (55P03) instead of being waited for."""
    deleted = 0
    while True:
        with session_scope() as s:
            if lock_timeout is not None:
                s.execute(text(f"SET LOCAL lock_timeout = '{lock_timeout}'"))
            result = s.execute(text(sql), {**params, "n": rows_per_statement})
        n = int(getattr(result, "rowcount", 0) or 0)
        deleted += n
        if n < rows_per_statement:
            return deleted


def purge_run(run_id: str, rows_per_statement: int = ROWS_PER_STATEMENT) -> int | None:
    """Delete one finished run's member details; the number of items deleted, or None when a
    row was held by someone else (the next pass tries again)."""
    try:
        deleted = _delete_in_chunks(
            _RUN_ITEMS, {"r": run_id}, rows_per_statement, lock_timeout=LOCK_TIMEOUT
        )
        with session_scope() as s:
            s.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            s.execute(
                text(
                    "UPDATE sync_batches SET user_ids = NULL, lo_user_id = NULL, "
                    "hi_user_id = NULL WHERE run_id = :r AND (user_ids IS NOT NULL "
                    "OR lo_user_id IS NOT NULL OR hi_user_id IS NOT NULL)"
                ),
                {"r": run_id},
            )
            s.execute(
                text(
                    "UPDATE sync_runs SET purged_at = now() WHERE id = :r AND status <> 'running'"
                ),
                {"r": run_id},
            )
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
            raise
        log.info("run %s: a row is in use; its member details go at the next purge", run_id)
        return None
    return deleted


# -- list snapshots ----------------------------------------------------------------------------

# Each verify id once, one index probe each (a skip scan of the primary key), not a scan of a
# million-row snapshot.
_SNAPSHOT_IDS = """
WITH RECURSIVE v AS (
    (SELECT verify_id FROM list_snapshots ORDER BY verify_id LIMIT 1)
    UNION ALL
    SELECT (SELECT s.verify_id FROM list_snapshots s WHERE s.verify_id > v.verify_id
            ORDER BY s.verify_id LIMIT 1)
    FROM v WHERE v.verify_id IS NOT NULL
)
SELECT verify_id FROM v WHERE verify_id IS NOT NULL
"""


def purge_abandoned_snapshots(rows_per_statement: int = ROWS_PER_STATEMENT) -> int:
    """Delete the snapshots whose verification holds no lease any more; rows deleted."""
    with session_scope() as s:
        verify_ids = list(s.scalars(text(_SNAPSHOT_IDS)))
    deleted = 0
    for verify_id in verify_ids:
        with session_scope() as s:
            # held only for this transaction: enough to know that no verification holds it
            free = s.scalar(
                text("SELECT pg_try_advisory_xact_lock(:c, hashtext(:v))"),
                {"c": SNAPSHOT_LEASE_CLASS, "v": verify_id},
            )
        if not free:
            continue
        deleted += _delete_in_chunks(_SNAPSHOT_ROWS, {"v": verify_id}, rows_per_statement)
        log.info("list snapshot %s: its verification is gone; deleted", verify_id)
    return deleted


class SnapshotLease:
    """A verification's claim on its snapshot, held on a connection of its own."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def held(self) -> bool:
        """False when the connection holding the lease was lost: the snapshot may be gone."""
        try:
            self._connection.execute(text("SELECT 1"))
            self._connection.commit()
        except DBAPIError:
            return False
        return True


@contextmanager
def snapshot_lease(verify_id: str) -> Iterator[SnapshotLease]:
    """Hold the lease of ``verify_id`` for the life of its snapshot (delete the snapshot inside)."""
    connection = get_engine().connect()
    try:
        connection.execute(
            text("SELECT pg_advisory_lock(:c, hashtext(:v))"),
            {"c": SNAPSHOT_LEASE_CLASS, "v": verify_id},
        )
        connection.commit()
        yield SnapshotLease(connection)
    finally:
        try:
            connection.execute(
                text("SELECT pg_advisory_unlock(:c, hashtext(:v))"),
                {"c": SNAPSHOT_LEASE_CLASS, "v": verify_id},
            )
            connection.commit()
            connection.close()
        except DBAPIError:
            connection.invalidate()  # the session ends, and its lock with it
