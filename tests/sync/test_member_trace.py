"""``trace_member``: the actions of real syncs (bulk jobs, the simulator over HTTP, the real
PostgreSQL), and the states a sync leaves on its way, written as the pipeline writes them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from segops_sync.config import get_settings
from segops_sync.connectors import create_connector
from segops_sync.db.session import session_scope
from segops_sync.errors import InputError
from segops_sync.states import ConnectorStatus, MemberAction
from segops_sync.sync.inputs.identity import record_identity
from segops_sync.sync.member_trace import MAX_TRACED_USER_ID, MemberTrace, trace_member
from tests.sync.helpers import World
from tests.sync.helpers import run_sync as _sync
from tests.sync.helpers import set_members as _set_members


def _trace(user_id: str, **kwargs: object) -> MemberTrace:
    with session_scope() as s:
        return trace_member(s, user_id, **kwargs)  # type: ignore[arg-type]


def _actions(trace: MemberTrace) -> list[tuple[str, MemberAction]]:
    [connector] = trace.connectors
    return [(r.run_id, r.action) for r in connector.runs]


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_a_real_sync_is_traced_member_by_member(world: World) -> None:
    """Two bulk-job runs (one whole job each): an add, a traits update, a rejection with
    Klaviyo's reason, a removal; a second connector whose segment lacks them is not shown."""
    tag = uuid.uuid4().hex[:6]
    segment = f"trace-{tag}"
    keep, leave, late = (f"{n}-{tag}@example.com" for n in ("keep", "leave", "late"))
    too_long = f"{tag}-" + "x" * 300  # Klaviyo refuses an external_id this long
    with session_scope() as s:
        record_identity(s, keep, None, {"first_name": "Ada"})
        connector, _ = create_connector(
            s,
            get_settings(),
            segment_id=segment,
            list_id=world.list_id,
            api_key=world.key,
            verify=False,
            traits=["first_name"],
        )
        connector.status = ConnectorStatus.ACTIVE
        connector_id = connector.id
        other, _ = create_connector(
            s,
            get_settings(),
            segment_id=f"other-{tag}",
            list_id=world.list_id,
            api_key=world.key,
            verify=False,
        )
    _set_members(segment, [keep, leave, too_long])
    first = _sync(world, connector_id)
    assert (first.added, first.rejected) == (2, 1)

    with session_scope() as s:
        record_identity(s, keep, None, {"first_name": "Grace"})
    _set_members(segment, [keep, late, too_long])
    second = _sync(world, connector_id)
    assert (second.updated, second.removed, second.added) == (1, 1, 1)

    kept = _trace(keep)
    [c] = kept.connectors
    assert (c.connector_id, c.in_segment, c.on_list, c.rejection) == (
        connector_id,
        True,
        True,
        None,
    )
    assert c.ledger is not None and c.ledger.confirmed
    assert _actions(kept) == [(second.id, MemberAction.UPDATED), (first.id, MemberAction.ADDED)]

    gone = _trace(leave)
    assert (gone.connectors[0].in_segment, gone.connectors[0].on_list) == (False, False)
    assert _actions(gone) == [(second.id, MemberAction.REMOVED), (first.id, MemberAction.ADDED)]
    assert _actions(_trace(late)) == [(second.id, MemberAction.ADDED)]

    refused = _trace(too_long).connectors[0]
    assert (refused.in_segment, refused.on_list) == (True, False)
    oldest = refused.runs[-1]
    assert (oldest.run_id, oldest.action) == (first.id, MemberAction.REJECTED)
    assert oldest.reason and "external_id" in oldest.reason

    assert other.id not in {c.connector_id for c in kept.connectors}
    assert _trace(f"nobody-{tag}").connectors == ()


def _row(table: str, **values: object) -> None:
    with session_scope() as s:
        s.execute(
            text(f"INSERT INTO {table} ({', '.join(values)}) VALUES (:{', :'.join(values)})"),
            values,
        )


@pytest.fixture
def made() -> Iterator[list[str]]:
    """Connectors the test made, deleted afterwards: a run it left running would hold up every
    later test that waits for the fleet to be quiet."""
    ids: list[str] = []
    yield ids
    with session_scope() as s:
        s.execute(text("DELETE FROM connectors WHERE id = ANY(:c)"), {"c": ids})


@pytest.mark.parametrize("world", ["bulk"], indirect=True)
def test_states_on_the_way_and_the_retention_window(world: World, made: list[str]) -> None:
    """In flight (a whole job running), queued (batches not started: listed, or a key range),
    unsettled (the batch failed), and runs outside the window or purged left out."""
    tag = uuid.uuid4().hex[:6]
    segment = f"ways-{tag}"
    sent, listed, ranged, failed = (f"{n}-{tag}" for n in ("sent", "listed", "ranged", "failed"))
    with session_scope() as s:
        connector, _ = create_connector(
            s,
            get_settings(),
            segment_id=segment,
            list_id=world.list_id,
            api_key=world.key,
            verify=False,
        )
        connector_id = connector.id
    made.append(connector_id)
    _set_members(segment, [sent, listed, ranged, failed])
    now = datetime.now(UTC)
    for run_id, status, finished, purged in (
        (f"old-{tag}", "succeeded", now - timedelta(days=40), None),
        (f"purged-{tag}", "succeeded", now - timedelta(days=2), now),
        (f"failed-{tag}", "failed", now - timedelta(days=1), None),
        (f"live-{tag}", "running", None, None),
    ):
        _row(
            "sync_runs",
            id=run_id,
            connector_id=connector_id,
            trigger="recompute",
            status=status,
            started_at=(finished or now) - timedelta(minutes=1),
            finished_at=finished,
            purged_at=purged,
        )
        if status != "running":  # each finished run added the members sent and failed
            for user_id in (sent, failed):
                outcome = None if run_id.startswith("failed") and user_id == failed else "added"
                _row(
                    "sync_batch_items",
                    run_id=run_id,
                    user_id=user_id,
                    kind="add",
                    seq=0,
                    outcome=outcome,
                )
    _row(
        "sync_batches",
        run_id=f"failed-{tag}",
        kind="add",
        seq=0,
        status="failed",
        error="Klaviyo kept failing",
        materialized=True,
    )
    live = f"live-{tag}"
    # batch 0 went out in one bulk job; 1 lists its members; 2 covers a key range
    _row(
        "sync_batches",
        run_id=live,
        kind="add",
        seq=0,
        status="submitted",
        whole_job_id="job-1",
        materialized=True,
    )
    _row("sync_batch_items", run_id=live, user_id=sent, kind="add", seq=0)
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO sync_batches (run_id, kind, seq, status, materialized, user_ids, "
                "lo_user_id, hi_user_id) VALUES (:r, 'add', 1, 'pending', false, "
                "ARRAY[CAST(:listed AS text)], NULL, NULL), "
                "(:r, 'add', 2, 'pending', false, NULL, :lo, :hi)"
            ),
            {"r": live, "listed": listed, "lo": ranged, "hi": ranged + "~"},
        )

    def runs(user_id: str) -> list[tuple[str, MemberAction, str | None]]:
        [c] = _trace(user_id, retention_days=30).connectors
        return [(r.run_id, r.action, r.reason) for r in c.runs]

    assert runs(sent) == [
        (live, MemberAction.IN_FLIGHT, None),
        (f"failed-{tag}", MemberAction.ADDED, None),
    ]
    assert runs(failed) == [(f"failed-{tag}", MemberAction.UNSETTLED, "Klaviyo kept failing")]
    assert runs(listed) == [(live, MemberAction.QUEUED, None)]
    assert runs(ranged) == [(live, MemberAction.QUEUED, None)]
    # a wider window takes the old run (not purged yet) in; the purged one never
    assert (f"old-{tag}", MemberAction.ADDED) in [
        (r.run_id, r.action) for r in _trace(sent, retention_days=60).connectors[0].runs
    ]
    # on the list already: a range batch of adds will not take it
    _row("connector_members", connector_id=connector_id, user_id=ranged)
    assert runs(ranged) == []


@pytest.mark.parametrize(
    "user_id", ["", "a" * (MAX_TRACED_USER_ID + 1), "a\nb", "a\x00b", "\ud800"]
)
def test_an_ill_formed_user_id_is_refused_before_any_query(user_id: str) -> None:
    with pytest.raises(InputError, match="user_id must be"):
        trace_member(None, user_id)  # type: ignore[arg-type]  # never reaches the session
