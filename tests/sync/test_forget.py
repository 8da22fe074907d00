"""Forgetting a member (sync/forget.py) as plain functions: the real PostgreSQL, the real Redis
(limiter) and the simulator over HTTP."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from segops_sync.config import get_settings
from segops_sync.db.models import ForgetRecord
from segops_sync.db.session import get_engine, session_scope
from segops_sync.sync import forget
from segops_sync.sync.batch_step import Finished
from segops_sync.sync.batches import run_batch
from segops_sync.sync.forget import (
    BadUserId,
    ForgetOutcome,
    ForgetSource,
    check_user_id,
    forget_member,
)
from segops_sync.sync.inputs.identity import MEMBER_LOCK_CLASS, record_identity
from segops_sync.sync.runs import finish_run
from segops_sync.sync.verify import FOREIGN_PREFIX, verify_list
from tests.sync.helpers import (
    World,
    drop_runs,
    message_forget_records,
    running_run_that_sent,
    start_and_plan,
)
from tests.sync.helpers import make_connector as _connector


def _sync(w: World, connector_id: str) -> str:
    """One whole run driven in this process; its id. (helpers.run_sync returns the row: these
    tests never asked for that.)"""
    run_id, plan = start_and_plan(connector_id)
    for batch_id in plan.batch_ids:
        deadline = time.monotonic() + 60
        while not isinstance(step := run_batch(batch_id, w.access, get_settings()), Finished):
            assert time.monotonic() < deadline, step.reason
            time.sleep(min(step.countdown, 0.2))
    with session_scope() as s:
        finish_run(s, run_id)
    return run_id


def _lands_on_the_list(w: World, user: str) -> None:
    """What the in-flight batch's job does at Klaviyo: the member's profile joins the list."""
    w.sim.add_to_list(w.list_id, [w.sim.add_profile(w.account, external_id=user)])


def _rows_naming(*values: str) -> dict[str, int]:
    """Rows of the member's tables that hold any of ``values`` (user id, email)."""
    checks = {
        "segment_members": "user_id = ANY(:v)",
        "identities": "user_id = ANY(:v) OR email = ANY(:v)",
        "connector_members": "user_id = ANY(:v) OR email = ANY(:v) OR external_id = ANY(:v)",
        "sync_batch_items": "user_id = ANY(:v) OR email = ANY(:v) OR external_id = ANY(:v)",
        "member_rejections": "user_id = ANY(:v)",
        "list_snapshots": "email = ANY(:v) OR external_id = ANY(:v)",
        "sync_batches": "user_ids && CAST(:v AS text[]) OR lo_user_id = ANY(:v) "
        "OR hi_user_id = ANY(:v)",
    }
    with session_scope() as s:
        found = {
            table: int(
                s.scalar(text(f"SELECT count(*) FROM {table} WHERE {where}"), {"v": list(values)})
                or 0
            )
            for table, where in checks.items()
        }
    return {t: n for t, n in found.items() if n}


def _forget(
    w: World,
    user_id: str,
    *,
    klaviyo_delete: bool = False,
    on_wait: Callable[[str], None] | None = None,
    run_wait: float = forget.RUN_WAIT,
) -> ForgetOutcome:
    return forget_member(
        user_id,
        source=ForgetSource.CLI,
        klaviyo_delete=klaviyo_delete,
        settings=get_settings(),
        access=w.access,
        on_wait=on_wait,
        run_wait=run_wait,
    )


def test_a_forgotten_member_leaves_the_list_klaviyo_and_every_table(world: World) -> None:
    token = uuid.uuid4().hex[:8]
    user, email = f"cust-{token}", f"forget.{token}@example.com"
    others = [f"stay.{token}.{i}@example.com" for i in range(3)]
    segment = f"forget-{token}"
    connector_id = _connector(world, segment, [user, *others])
    with session_scope() as s:
        record_identity(s, user, email, {"email": email, "first_name": f"Zed{token}"})
    run_id = _sync(world, connector_id)
    [profile] = [p for p in world.sim.list_members(world.list_id) if p.external_id == user]
    with session_scope() as s:  # what a rejection, a read-back and a batch list keep of it
        s.execute(
            text(
                "INSERT INTO member_rejections (connector_id, user_id, reason) "
                "VALUES (:c, :u, 'refused')"
            ),
            {"c": connector_id, "u": user},
        )
        s.execute(
            text(
                "INSERT INTO list_snapshots (verify_id, profile_id, connector_id, email) "
                "VALUES ('v-forget', :p, :c, :e)"
            ),
            {"p": profile.id, "c": connector_id, "e": email},
        )
        s.execute(
            text(
                "UPDATE sync_batches SET user_ids = ARRAY[:u, :o], lo_user_id = :u "
                "WHERE run_id = :r"
            ),
            {"u": user, "o": others[0], "r": run_id},
        )
    assert set(_rows_naming(user, email)) == {
        "segment_members",
        "identities",
        "connector_members",
        "sync_batch_items",
        "member_rejections",
        "list_snapshots",
        "sync_batches",
    }

    outcome = _forget(world, user, klaviyo_delete=True)

    assert (outcome.lists_removed, outcome.klaviyo_deletions, outcome.problems) == (1, 1, [])
    assert _rows_naming(user, email) == {}
    on_list = {p.external_id or p.email for p in world.sim.list_members(world.list_id)}
    assert on_list == set(others)
    deadline = time.monotonic() + 10  # Klaviyo deletes shortly after it accepted (202)
    while world.sim.profile(profile.id) is not None:
        assert time.monotonic() < deadline, "the data-privacy deletion never ran"
        time.sleep(0.05)
    with session_scope() as s:
        record = s.execute(
            text("SELECT * FROM forget_records WHERE id = :i"), {"i": outcome.record_id}
        ).one()
        kept = s.scalar(text("SELECT user_ids FROM sync_batches WHERE run_id = :r"), {"r": run_id})
    assert (record.source, record.klaviyo_delete, record.lists_removed) == ("cli", True, 1)
    assert (record.klaviyo_deletions, record.error) == (1, None)
    assert record.finished_at is not None
    assert kept == [others[0]]  # the other members of the batch stay

    # again: nothing left to delete, nothing asked of Klaviyo, and not an error
    requests = len(world.sim.requests())
    again = _forget(world, user, klaviyo_delete=True)
    assert (again.lists_removed, again.klaviyo_deletions, again.problems) == (0, 0, [])
    assert len(world.sim.requests()) == requests


def test_a_member_a_running_sync_was_sending_is_removed_again_after_it(world: World) -> None:
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"inflight-{token}", [user])
    run_id = running_run_that_sent(connector_id, user, seq=0)

    def the_job_lands_and_the_run_ends(_: str) -> None:
        _lands_on_the_list(world, user)
        with session_scope() as s:
            s.execute(
                text("UPDATE sync_runs SET status = 'failed', finished_at = now() WHERE id = :r"),
                {"r": run_id},
            )

    outcome = _forget(world, user, on_wait=the_job_lands_and_the_run_ends)

    assert (outcome.lists_removed, outcome.problems) == (1, [])
    assert world.sim.list_members(world.list_id) == []
    assert _rows_naming(user) == {}


def test_the_forget_waits_for_the_batch_that_sent_the_member_not_for_its_whole_run(
    world: World,
) -> None:
    """The batch settles while its run goes on (a big sync's other batches): the forget asks
    the list again then, instead of holding its worker until the run ends."""
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"batchwait-{token}", [user])
    # batch 3 sent the member; batch 4 of the same run is still to go
    run_id = running_run_that_sent(connector_id, user, seq=3, batches=("submitted", "pending"))
    said: list[str] = []

    def the_job_lands_and_the_batch_settles(message: str) -> None:
        said.append(message)
        _lands_on_the_list(world, user)
        with session_scope() as s:
            s.execute(
                text("UPDATE sync_batches SET status = 'done' WHERE run_id = :r AND seq = 3"),
                {"r": run_id},
            )

    outcome = _forget(world, user, on_wait=the_job_lands_and_the_batch_settles, run_wait=5)

    assert said == ["waiting for 1 batch(es) of a running sync that sent the member"]
    assert (outcome.lists_removed, outcome.problems) == (1, [])
    assert world.sim.list_members(world.list_id) == []
    with session_scope() as s:  # the run goes on: only its batch was waited for
        assert s.scalar(text("SELECT status FROM sync_runs WHERE id = :r"), {"r": run_id}) == (
            "running"
        )
        s.execute(text("DELETE FROM sync_batches WHERE run_id = :r"), {"r": run_id})
        s.execute(text("DELETE FROM sync_runs WHERE id = :r"), {"r": run_id})


def test_a_batch_that_failed_with_its_job_unanswered_is_waited_for_as_its_run(
    world: World,
) -> None:
    """Its job may still run at Klaviyo and add the member: until the run ends, the batch
    counts as open; past the wait, the list is named with its repair."""
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"doubt-{token}", [user])
    run_id = running_run_that_sent(connector_id, user, seq=0, batches=("failed",))
    with session_scope() as s:
        s.execute(text("UPDATE sync_batches SET in_doubt = true WHERE run_id = :r"), {"r": run_id})

    outcome = _forget(world, user, run_wait=0.5)

    assert len(outcome.problems) == 1 and "still open after" in outcome.problems[0]
    drop_runs(run_id)


def test_past_a_wait_before_the_purge_an_open_batch_is_named_at_once(world: World) -> None:
    """A message that waited its whole RUN_WAIT for the member's batch before the purge
    (tasks.forget_user) waits no more after it: the problem says how long the batch was open."""
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"waited-{token}", [user])
    run_id = running_run_that_sent(connector_id, user, seq=0, batches=("submitted",))
    said: list[str] = []

    try:
        outcome = forget_member(
            user,
            source=ForgetSource.MESSAGE,
            klaviyo_delete=False,
            settings=get_settings(),
            access=world.access,
            run_wait=0.0,
            waited=forget.RUN_WAIT,
            sleep=lambda _: pytest.fail("the forget slept"),
            on_wait=said.append,
        )

        assert len(outcome.problems) == 1
        assert f"still open after {forget.RUN_WAIT:.0f}s" in outcome.problems[0]
        assert _rows_naming(user) == {}
    finally:
        drop_runs(run_id)


def test_a_deferred_forget_message_comes_back_less_often_and_gives_up_waiting_in_time() -> None:
    """tasks.forget_user's schedule: soon at first (a batch usually settles in seconds), then
    every DEFER_POLL_MAX, so a burst of deferred messages does not churn the queue; and a bound
    of about RUN_WAIT in a few dozen deliveries, not hundreds."""
    schedule = [forget.deferral(n) for n in range(40)]
    assert schedule[:5] == [(0.0, 2.0), (2.0, 4.0), (6.0, 8.0), (14.0, 16.0), (30.0, 30.0)]
    for (waited, poll), (waited_next, _) in itertools.pairwise(schedule):
        assert waited_next == waited + poll and 0 < poll <= forget.DEFER_POLL_MAX
    deliveries = next(n for n, (waited, _) in enumerate(schedule) if waited >= forget.RUN_WAIT)
    assert deliveries == 23 and schedule[deliveries][0] == forget.RUN_WAIT


@pytest.mark.parametrize(
    ("batch", "in_doubt", "run_status", "kind", "purged", "expected"),
    [
        ("submitted", False, "running", "add", False, True),  # sent, no answer recorded
        ("pending", False, "running", "add", False, True),  # written, its job may go any moment
        ("failed", True, "running", "add", False, True),  # its job may still run at Klaviyo
        ("failed", False, "running", "add", False, False),
        ("done", False, "running", "add", False, False),  # settled: its answer is recorded
        ("submitted", False, "failed", "add", False, False),  # its run is over
        (None, False, "running", "add", False, False),  # no batch row: nothing to wait for
        ("submitted", False, "running", "remove", False, False),  # a removal adds nothing back
        ("submitted", False, "running", "add", True, False),  # a purged run's items are gone
    ],
)
def test_a_member_is_in_flight_exactly_while_the_purge_would_wait_for_its_batch(
    world: World,
    batch: str | None,
    in_doubt: bool,
    run_status: str,
    kind: str,
    purged: bool,
    expected: bool,
) -> None:
    """member_in_flight (what tasks.forget_user asks before the purge, and the purge under
    its locks when it may not wait) says yes exactly when a forget that may wait would wait:
    both are asked of the same rows."""
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"flight-{token}", [user])
    assert not forget.member_in_flight(user)
    run_id = running_run_that_sent(connector_id, user, seq=0, batches=(batch,) if batch else ())
    with session_scope() as s:
        s.execute(
            text("UPDATE sync_batches SET in_doubt = :d, kind = :k WHERE run_id = :r"),
            {"d": in_doubt, "k": kind, "r": run_id},
        )
        s.execute(
            text("UPDATE sync_batch_items SET kind = :k WHERE run_id = :r"),
            {"k": kind, "r": run_id},
        )
        s.execute(
            text(
                "UPDATE sync_runs SET status = :s, purged_at = CASE WHEN :p THEN now() END "
                "WHERE id = :r"
            ),
            {"s": run_status, "p": purged, "r": run_id},
        )
    try:
        assert forget.member_in_flight(user) is expected
        assert not forget.member_in_flight(f"other-{token}")
        slept: list[float] = []

        def the_batch_settles(seconds: float) -> None:  # the wait's first poll ends it
            slept.append(seconds)
            with session_scope() as s:
                s.execute(
                    text(
                        "UPDATE sync_batches SET status = 'done', in_doubt = false WHERE run_id = :r"
                    ),
                    {"r": run_id},
                )

        outcome = forget_member(
            user,
            source=ForgetSource.CLI,
            klaviyo_delete=False,
            settings=get_settings(),
            access=world.access,
            run_wait=5.0,
            sleep=the_batch_settles,
        )
        assert (bool(slept), outcome.problems) == (expected, [])
        assert not forget.member_in_flight(user)  # nothing of the member is left to be
    finally:
        drop_runs(run_id)


def _forget_message(user: str, *, retries: int = 0) -> Any:
    """``segops.forget_user`` run eagerly in this process (Celery's ``apply``): a retry runs
    again at once, its countdown skipped, so one call goes through every deferral."""
    from segops_sync import tasks

    tasks._access = None  # built again from this test's settings (the world's simulator)
    return tasks.forget_user.apply(kwargs={"user_id": user}, retries=retries)


def test_a_forget_message_defers_while_its_batch_is_open_then_forgets_without_waiting(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The task's schedule end to end (countdowns skipped): it defers, keeping nothing, as long
    as the bound allows (23 deferrals: 600 s of countdowns), then forgets without waiting and
    names the list the batch may still add the member to. One record, written once the
    waiting is over."""
    from segops_sync import tasks

    asked: list[bool] = []

    def member_in_flight(user_id: str) -> bool:  # the real check, counted
        asked.append(forget.member_in_flight(user_id))
        return asked[-1]

    monkeypatch.setattr(tasks, "member_in_flight", member_in_flight)
    caplog.set_level("INFO", logger="segops_sync.tasks")
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"deferred-{token}", [user])
    run_id = running_run_that_sent(connector_id, user, batches=("submitted",))
    _lands_on_the_list(world, user)  # the batch's job has landed; its step has not seen it yet
    before = message_forget_records()
    try:
        result = _forget_message(user)

        assert result.state == "SUCCESS", result.traceback
        assert asked == [True] * 23  # the 24th delivery asks no more
        assert forget.deferral(23)[0] == forget.RUN_WAIT
        assert [r.getMessage() for r in caplog.records].count(
            "forget deferred: a running sync has sent the member and awaits Klaviyo's answer; "
            "asked again later, for 600s at most"
        ) == 1
        (record,) = message_forget_records()[len(before) :]
        assert record[1:3] == (True, 1)
        assert "still open after 600s" in record[3] and connector_id in record[3]
        assert world.sim.list_members(world.list_id) == []
        assert _rows_naming(user) == {}
    finally:
        drop_runs(run_id)


def test_a_forget_message_not_in_flight_forgets_at_once(world: World) -> None:
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    _sync(world, _connector(world, f"at-once-{token}", [user]))
    assert len(world.sim.list_members(world.list_id)) == 1
    before = message_forget_records()

    result = _forget_message(user)

    assert result.state == "SUCCESS", result.traceback
    assert [r[1:] for r in message_forget_records()[len(before) :]] == [(True, 1, None)]
    assert world.sim.list_members(world.list_id) == []
    assert _rows_naming(user) == {}


def test_a_forget_message_whose_deferral_cannot_be_sent_forgets_now_and_waits(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery rejects (and so drops) a message whose retry it could not publish: an erasure
    request would vanish without a trace. The task forgets at once instead, waiting for the
    batch in the task as the command does."""
    from celery.exceptions import Reject

    from segops_sync import tasks

    def the_broker_refuses(*_: Any, **__: Any) -> None:
        raise Reject(ConnectionError("the broker is away"), requeue=False)

    monkeypatch.setattr(tasks.forget_user, "retry", the_broker_refuses)
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"unsent-{token}", [user])
    run_id = running_run_that_sent(connector_id, user, batches=("submitted",))
    before = message_forget_records()

    def the_batch_settles_soon() -> None:  # its job lands, then its step records it
        time.sleep(1.5 * forget.RUN_POLL)
        _lands_on_the_list(world, user)
        with session_scope() as s:
            s.execute(
                text("UPDATE sync_batches SET status = 'done' WHERE run_id = :r"), {"r": run_id}
            )

    settling = threading.Thread(target=the_batch_settles_soon)
    settling.start()
    try:
        result = _forget_message(user)
        settling.join()

        assert result.state == "SUCCESS", result.traceback
        assert [r[1:] for r in message_forget_records()[len(before) :]] == [(True, 1, None)]
        assert world.sim.list_members(world.list_id) == []
        assert _rows_naming(user) == {}
    finally:
        settling.join()
        drop_runs(run_id)


def test_a_profile_another_connector_entered_as_foreign_leaves_with_the_member(
    world: World,
) -> None:
    """Connector B read its list back and entered the member's profile as foreign (it is on
    B's list, in none of B's segments): the forget removes it from B's list too, and B's ledger
    row and batch items of that profile go with the rest."""
    token = uuid.uuid4().hex[:8]
    user, email = f"cust-{token}", f"both.{token}@example.com"
    a = _connector(world, f"own-{token}", [user, f"stay-{token}"])
    with session_scope() as s:
        record_identity(s, user, email, {"email": email})
    _sync(world, a)
    [profile] = [p.id for p in world.sim.list_members(world.list_id) if p.external_id == user]
    other = replace(world, list_id=world.sim.create_list(world.account, f"B {token}"))
    world.sim.add_to_list(other.list_id, [profile])
    b = _connector(other, f"theirs-{token}", [f"b-{token}"])
    verify_list(b, world.access, get_settings(), adopt_extra=True)
    key = FOREIGN_PREFIX + profile
    run_id = str(uuid.uuid4())
    with session_scope() as s:  # a removal of B's that listed the profile
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status) "
                "VALUES (:r, :c, 'resync', 'succeeded')"
            ),
            {"r": run_id, "c": b},
        )
        s.execute(
            text(
                "INSERT INTO sync_batches (run_id, kind, seq, status, user_ids) "
                "VALUES (:r, 'remove', 0, 'done', ARRAY[:k, 'someone-else'])"
            ),
            {"r": run_id, "k": key},
        )
        s.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, profile_id) "
                "VALUES (:r, :k, 'remove', 0, :p)"
            ),
            {"r": run_id, "k": key, "p": profile},
        )
    assert set(_rows_naming(key)) == {"connector_members", "sync_batch_items", "sync_batches"}

    outcome = _forget(world, user)

    assert (outcome.lists_removed, outcome.problems) == (2, [])
    assert profile not in world.sim.list_member_ids(other.list_id)
    assert profile not in world.sim.list_member_ids(world.list_id)
    assert _rows_naming(user, email, key) == {}
    with session_scope() as s:
        kept = s.scalar(text("SELECT user_ids FROM sync_batches WHERE run_id = :r"), {"r": run_id})
        s.execute(text("DELETE FROM sync_batches WHERE run_id = :r"), {"r": run_id})
        s.execute(text("DELETE FROM sync_runs WHERE id = :r"), {"r": run_id})
    assert kept == ["someone-else"]


def test_an_identity_message_sent_before_the_forget_does_not_bring_the_member_back(
    world: World,
) -> None:
    """A context_identified retried or redelivered after the forget is dropped for a day; the
    marker that says so holds no user id, and another member's message is stored as ever."""
    from segops_sync.tasks import context_identified

    token = uuid.uuid4().hex[:8]
    user, email, other = f"cust-{token}", f"late.{token}@example.com", f"other-{token}"
    connector_id = _connector(world, f"late-{token}", [user])
    with session_scope() as s:
        record_identity(s, user, email, {"email": email})
    _sync(world, connector_id)
    _forget(world, user)

    context_identified(user_id=user, traits={"email": email, "first_name": "Late"})
    context_identified(user_id=other, traits={"email": f"other.{token}@example.com"})

    with session_scope() as s:
        identified = set(
            s.scalars(
                text("SELECT user_id FROM identities WHERE user_id IN (:u, :o)"),
                {"u": user, "o": other},
            )
        )
    assert identified == {other}
    assert _rows_naming(user, email) == {}
    redis = world.access.redis
    marker = forget._markers(get_settings(), user)[0]
    assert user not in marker and 0 < redis.ttl(marker) <= forget.FORGOTTEN_FOR


def test_without_redis_the_forget_still_purges_and_says_what_is_left_open() -> None:
    """A forget that could not be redone (nothing says whom it was for) is not given up for
    the marker: the purge goes ahead, and the record says late messages may bring it back."""
    import redis

    from segops_sync.sync.fleet.access import KlaviyoAccess

    token = uuid.uuid4().hex[:8]
    user, email = f"cust-{token}", f"noredis.{token}@example.com"
    with session_scope() as s:
        record_identity(s, user, email, {"email": email})
    nowhere = redis.Redis(port=1, socket_connect_timeout=0.5)  # nothing listens on port 1
    outcome = forget_member(
        user,
        source=ForgetSource.CLI,
        klaviyo_delete=False,
        settings=get_settings(),
        access=KlaviyoAccess(get_settings(), redis_client=nowhere),
    )
    assert outcome.problems == [
        "a message sent before the forget may write the member's identity back for 24 hours "
        "(Redis took no marker: ConnectionError)"
    ]
    assert _rows_naming(user, email) == {}


def test_an_identity_write_under_way_commits_before_the_forget_deletes_it(world: World) -> None:
    """A context_identified that checked for the marker before the forget set it, and has not
    committed yet: the forget waits for it (the member's lock), then deletes what it wrote."""
    token = uuid.uuid4().hex[:8]
    user, email = f"cust-{token}", f"racing.{token}@example.com"
    with get_engine().connect() as identifying:
        identifying.execute(
            text("SELECT pg_advisory_xact_lock(:c, hashtext(:u))"),
            {"c": MEMBER_LOCK_CLASS, "u": user},
        )
        identifying.execute(
            text("INSERT INTO identities (user_id, email, traits) VALUES (:u, :e, '{}')"),
            {"u": user, "e": email},
        )
        forgetting, done = _forget_blocked_on(world, user, "pg_advisory_xact_lock")
        identifying.commit()
        forgetting.join(30)
    assert done, "the forget did not end"
    assert _rows_naming(user, email) == {}


def _forget_blocked_on(
    world: World, user: str, statement: str, run_wait: float = forget.RUN_WAIT
) -> tuple[threading.Thread, list[ForgetOutcome]]:
    """A forget of ``user`` in a thread, once it waits for a lock in ``statement``; its outcome
    lands in the list when it ends."""
    done: list[ForgetOutcome] = []
    forgetting = threading.Thread(
        target=lambda: done.append(_forget(world, user, run_wait=run_wait))
    )
    forgetting.start()
    deadline = time.monotonic() + 10
    while not _waits_for_a_lock(statement):
        assert time.monotonic() < deadline, f"the forget never waited in {statement!r}"
        time.sleep(0.02)
    return forgetting, done


def _waits_for_a_lock(statement: str) -> bool:
    """A backend of this test's database is waiting for a row lock in a statement containing
    ``statement`` (another database's workers run the same statements)."""
    with session_scope() as s:
        return bool(
            s.scalar(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND strpos(query, :q) > 0)"
                ),
                {"q": statement},
            )
        )


def test_batches_a_planner_wrote_while_the_forget_waited_for_it_are_locked_too(
    world: World,
) -> None:
    """A planner holds the connector row while it writes a run's batches; the forget waits for
    it. A batch that exists only once that wait ends, and whose first step starts writing the
    member's items at once, must be waited for too, or its items outlive the forget."""
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"planned-{token}", [user, f"stay-{token}"])
    run_id = str(uuid.uuid4())
    engine = get_engine()
    share = text("SELECT 1 FROM connectors WHERE id = :c FOR KEY SHARE")
    with engine.connect() as planner, engine.connect() as ledger, engine.connect() as step:
        planner.execute(share, {"c": connector_id})
        planner.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status) "
                "VALUES (:r, :c, 'resync', 'running')"
            ),
            {"r": run_id, "c": connector_id},
        )
        planner.execute(
            text(
                "INSERT INTO sync_batches (run_id, kind, seq, status) VALUES (:r, 'add', 0, 'pending')"
            ),
            {"r": run_id},
        )
        ledger.execute(share, {"c": connector_id})  # a second holder keeps the forget waiting
        forgetting, done = _forget_blocked_on(
            world, user, "FROM connectors WHERE id = ANY", run_wait=0.2
        )
        deadline = time.monotonic() + 10
        planner.commit()
        # the batch's first step: its row, then the member's item from the segment
        step.execute(text("SELECT 1 FROM sync_batches WHERE run_id = :r FOR UPDATE"), {"r": run_id})
        step.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, external_id) "
                "VALUES (:r, :u, 'add', 0, :u)"
            ),
            {"r": run_id, "u": user},
        )
        ledger.commit()
        while forgetting.is_alive() and not _waits_for_a_lock("FOR UPDATE OF b"):
            assert time.monotonic() < deadline, "the forget neither ended nor waited"
            time.sleep(0.02)
        step.commit()
        forgetting.join(30)
    assert done, "the forget did not end"
    try:
        assert _rows_naming(user) == {}
        assert [p for p in done[0].problems if "still open after" in p], done[0].problems
    finally:
        drop_runs(run_id)


def test_a_forget_that_may_not_wait_rolls_back_on_a_batch_written_under_its_locks(
    world: World,
) -> None:
    """What member_in_flight cannot see: a batch step is writing the member's items (holding
    its batch row) when the forget begins. The purge waits for that row, then finds the items.
    A forget that may not wait (a message's) rolls back: every row of the member stays for its
    next try, and no forget record is left."""
    token = uuid.uuid4().hex[:8]
    user = f"cust-{token}"
    connector_id = _connector(world, f"materializing-{token}", [user])
    run_id = running_run_that_sent(connector_id, f"other-{token}", batches=("pending",))
    with session_scope() as s:
        records = s.scalar(text("SELECT count(*) FROM forget_records"))
    raised: list[BaseException] = []

    def forget_without_waiting() -> None:
        try:
            forget_member(
                user,
                source=ForgetSource.MESSAGE,
                klaviyo_delete=False,
                settings=get_settings(),
                access=world.access,
                defer_in_flight=True,
                run_wait=0.0,
            )
        except BaseException as exc:
            raised.append(exc)

    try:
        with get_engine().connect() as step:
            step.execute(
                text("SELECT 1 FROM sync_batches WHERE run_id = :r FOR UPDATE"), {"r": run_id}
            )
            step.execute(
                text(
                    "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, external_id) "
                    "VALUES (:r, :u, 'add', 0, :u)"
                ),
                {"r": run_id, "u": user},
            )
            assert not forget.member_in_flight(user)  # not committed: invisible without locks
            forgetting = threading.Thread(target=forget_without_waiting)
            forgetting.start()
            deadline = time.monotonic() + 10
            while not _waits_for_a_lock("FOR UPDATE OF b"):
                assert time.monotonic() < deadline, "the forget never waited for the batch"
                time.sleep(0.02)
            step.commit()
            forgetting.join(30)
        assert [type(e) for e in raised] == [forget.MemberInFlight]
        assert _rows_naming(user) == {"segment_members": 1, "sync_batch_items": 1}
        with session_scope() as s:
            assert s.scalar(text("SELECT count(*) FROM forget_records")) == records
    finally:
        drop_runs(run_id)


def test_a_forget_stopped_after_the_purge_names_each_list_it_knew(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are gone once the purge commits, so a retry would find no list: the record
    names each one with its repair instead of saying only that the forget stopped. The repair
    it names takes the member off the list and brings none of its identifiers back."""
    token = uuid.uuid4().hex[:8]
    user, email = f"cust-{token}", f"stopped.{token}@example.com"
    others = [f"stay.{token}.{i}@example.com" for i in range(3)]  # under the removal guard
    connector_id = _connector(world, f"stopped-{token}", [user, *others])
    with session_scope() as s:
        record_identity(s, user, email, {"email": email})
    _sync(world, connector_id)
    assert user in {p.external_id for p in world.sim.list_members(world.list_id)}

    def the_network_goes(*_: object, **__: object) -> None:
        raise ConnectionError("gone")

    monkeypatch.setattr(forget, "_remove", the_network_goes)
    with pytest.raises(ConnectionError):
        _forget(world, user)
    with session_scope() as s:
        error = s.scalar(select(ForgetRecord.error).order_by(ForgetRecord.id.desc()).limit(1))
    assert error == (
        "the forget stopped on an error (ConnectionError); "
        f"connector {connector_id}: the member may still be on Klaviyo list {world.list_id}; "
        f"`segops-sync connectors verify {connector_id} --repair --remove-extra` removes it once "
        "fixed"
    )
    assert _rows_naming(user, email) == {}
    monkeypatch.undo()

    verify_list(connector_id, world.access, get_settings(), adopt_extra=True)  # the repair
    _sync(world, connector_id)
    on_list = {p.external_id or p.email for p in world.sim.list_members(world.list_id)}
    assert on_list == set(others)
    assert _rows_naming(user, email) == {}


def test_waiting_for_a_sync_outlasts_the_database_going_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def away() -> None:
        raise OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(forget, "session_scope", away)
    slept: list[float] = []
    assert forget._wait_for_batches([("r1", "add", 0)], 0.0, slept.append) == {("r1", "add", 0)}


def test_problems_the_database_will_not_record_go_to_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def away(_: ForgetOutcome) -> None:
        raise OperationalError("UPDATE", {}, Exception("server closed the connection"))

    monkeypatch.setattr(forget, "_close_record", away)
    outcome = ForgetOutcome(7, problems=["connector c1: the member may still be on list L1"])
    with caplog.at_level("ERROR", logger=forget.__name__), pytest.raises(OperationalError):
        forget._close_or_log(outcome)
    assert [r.getMessage() for r in caplog.records] == [
        "forget 7 (record not closed): connector c1: the member may still be on list L1"
    ]


def test_the_key_range_of_a_batch_still_to_be_written_skips_the_member(world: World) -> None:
    token = uuid.uuid4().hex[:6]
    m = [f"k{token}-{i}" for i in range(5)]  # in key order; m[2] is forgotten
    connector_id = _connector(world, f"range-{token}", m)
    running, finished = str(uuid.uuid4()), str(uuid.uuid4())
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status, finished_at) VALUES "
                "(:a, :c, 'resync', 'running', NULL), (:b, :c, 'resync', 'succeeded', now())"
            ),
            {"a": running, "b": finished, "c": connector_id},
        )
        s.execute(
            text(
                "INSERT INTO sync_batches (run_id, kind, seq, status, lo_user_id, hi_user_id, "
                "materialized) VALUES (:a, 'add', 0, 'pending', :m2, :m4, false), "
                "(:a, 'add', 1, 'pending', :m0, :m2, false), "
                "(:a, 'add', 2, 'pending', :m2, :m2, false), "
                "(:b, 'add', 0, 'done', :m2, :m4, true)"
            ),
            {"a": running, "b": finished, "m0": m[0], "m2": m[2], "m4": m[4]},
        )

    assert _forget(world, m[2]).problems == []

    with session_scope() as s:
        rows = s.execute(
            text(
                "SELECT run_id = :a AS running, seq, lo_user_id, hi_user_id, user_ids "
                "FROM sync_batches WHERE run_id IN (:a, :b) ORDER BY 1 DESC, seq"
            ),
            {"a": running, "b": finished},
        ).all()
    assert [tuple(r) for r in rows] == [
        (True, 0, m[3], m[4], None),  # the nearest member after it
        (True, 1, m[0], m[1], None),  # ... and before it
        (True, 2, None, None, []),  # nobody left: an empty list of members
        (False, 0, None, m[4], None),  # a finished run's bound just goes
    ]


@pytest.mark.parametrize("bad", ["", "   ", "a\x00b", "tab\there", "x" * 1001, "a\ud800b"])
def test_a_malformed_user_id_is_refused_before_anything_is_written(world: World, bad: str) -> None:
    with session_scope() as s:
        before = s.scalar(text("SELECT count(*) FROM forget_records"))
    with pytest.raises(BadUserId) as refused:
        _forget(world, bad)
    assert bad.strip() == "" or bad not in str(refused.value)  # never echoed
    with pytest.raises(BadUserId):
        check_user_id(bad)
    with session_scope() as s:
        assert s.scalar(text("SELECT count(*) FROM forget_records")) == before


def test_an_id_longer_than_recompute_takes_can_still_be_forgotten() -> None:
    """The recompute service writes segment_members itself: an id of 300 characters (one
    Klaviyo rejects as external_id) is a member like any other, and must be forgettable."""
    assert check_user_id("x" * 300) == "x" * 300


def test_the_snapshot_rows_of_a_member_are_found_by_index(world: World) -> None:
    """A read-back in progress holds a whole list; the forget deletes the member's rows of it
    while holding the connectors' rows, so by index probes. With sequential scans priced out,
    the plan of the very statement the purge runs reads no list_snapshots row by row."""
    with session_scope() as s:
        s.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            s.scalars(
                text(f"EXPLAIN {forget.SNAPSHOT_ROWS_DELETE}"),
                {"emails": ["ann@example.com"], "exts": ["ann-1"]},
            )
        )
    assert "Seq Scan on list_snapshots" not in plan, plan
    assert "ix_list_snapshots_email" in plan and "ix_list_snapshots_external_id" in plan, plan
