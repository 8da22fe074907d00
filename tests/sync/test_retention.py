"""The retention purge (sync/retention.py) as a plain function, on the real PostgreSQL. The whole
path through the beat is tests/integration/test_personal_data.py."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from segops_sync.config import get_settings
from segops_sync.db.session import session_scope
from segops_sync.states import ConnectorStatus
from segops_sync.sync.retention import purge_expired
from tests.sync.helpers import World
from tests.sync.helpers import make_connector as _connector


def _expired_run_in_doubt(connector_id: str, members: list[str]) -> str:
    """A run that failed 40 days ago after its add batch sent ``members`` unanswered."""
    run_id = str(uuid.uuid4())
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status, started_at, "
                "finished_at, list_id) SELECT :r, :c, 'resync', 'failed', "
                "now() - interval '40 days', now() - interval '40 days', list_id "
                "FROM connectors WHERE id = :c"
            ),
            {"r": run_id, "c": connector_id},
        )
        s.execute(
            text(
                "INSERT INTO sync_batches (run_id, kind, seq, status, in_doubt, sent_at) "
                "VALUES (:r, 'add', 0, 'failed', true, now() - interval '40 days')"
            ),
            {"r": run_id},
        )
        s.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email) "
                "VALUES (:r, :u, 'add', 0, :u)"
            ),
            [{"r": run_id, "u": m} for m in members],
        )
    return run_id


def _state(run_id: str, connector_id: str) -> tuple[int, bool, list[tuple[str, bool]]]:
    """(items of the run, purged?, the connector's ledger as (user id, confirmed))."""
    with session_scope() as s:
        items = s.scalar(
            text("SELECT count(*) FROM sync_batch_items WHERE run_id = :r"), {"r": run_id}
        )
        purged = s.scalar(
            text("SELECT purged_at IS NOT NULL FROM sync_runs WHERE id = :r"), {"r": run_id}
        )
        ledger = s.execute(
            text(
                "SELECT user_id, confirmed FROM connector_members WHERE connector_id = :c "
                "ORDER BY user_id"
            ),
            {"c": connector_id},
        ).all()
    return int(items or 0), bool(purged), [tuple(row) for row in ledger]


def test_a_paused_connectors_expired_run_in_doubt_goes_its_members_enter_the_ledger(
    world: World,
) -> None:
    """A paused connector has no next run to enter its in-doubt members in the ledger: the
    purge does it, so the run's member details still leave on time."""
    token = uuid.uuid4().hex[:6]
    members = [f"doubt.{token}.{i}@example.com" for i in range(3)]
    paused = _connector(world, f"paused-{token}", members)
    with session_scope() as s:
        s.execute(
            text("UPDATE connectors SET status = :p WHERE id = :c"),
            {"p": ConnectorStatus.PAUSED, "c": paused},
        )
    run_id = _expired_run_in_doubt(paused, members)
    # another connector's, with a run going: that run's plan took them, or its end leaves them
    # to the next one
    busy = _connector(world, f"busy-{token}", members)
    held = _expired_run_in_doubt(busy, members)
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status) "
                "VALUES (:r, :c, 'resync', 'running')"
            ),
            {"r": str(uuid.uuid4()), "c": busy},
        )

    try:
        purge_expired(get_settings())

        assert _state(run_id, paused) == (0, True, [(m, False) for m in sorted(members)])
        assert _state(held, busy) == (3, False, [])
    finally:
        with session_scope() as s:  # their runs and ledgers go with them
            s.execute(text("DELETE FROM connectors WHERE id IN (:a, :b)"), {"a": paused, "b": busy})
