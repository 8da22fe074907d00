"""Forgetting a member on the real stack: a worker and the Klaviyo simulator over HTTP, in a
database and Redis prefix of their own (so every table and key can be searched for the member).

``members forget USER_ID --klaviyo-delete`` as a person runs it, after real syncs put the
member on two lists (two Klaviyo accounts) with its traits: the lists and Klaviyo lose the
profile, no column of any table and no Redis key or value holds the member's identifiers (the
one ``forget_records`` row holds neither), and the member's next appearance in the segment is
added as new. Then the ``segops.forget_user`` message, through the worker.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from segops_sync.celery import SEGOPS_QUEUE, configure
from segops_sync.config import get_settings
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator
from segops_sync.sync.inputs.identity import record_identity
from tests.integration.helpers import (
    Klaviyo,
    cli,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    redis_texts,
    simulated_fleet,
    wait_idle,
)
from tests.sync.helpers import drop_runs, message_forget_records, running_run_that_sent


@dataclass
class Stack:
    sim: Simulator
    base_url: str

    def klaviyo(self) -> Klaviyo:
        return Klaviyo.new(self.sim, self.base_url)


@pytest.fixture(scope="module")
def stack(
    segops_env: dict[str, str], pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    workdir = tmp_path_factory.mktemp("forget-worker")
    with simulated_fleet(sim, segops_env, pg_server_url, workdir, "forget") as base_url:
        yield Stack(sim, base_url)


def _columns_holding(*values: str) -> list[str]:
    """``table.column`` of every column of every table whose text holds one of ``values``
    (any case): text, JSON and arrays cast to text, bytes read as text."""
    with session_scope() as s:
        columns = s.execute(
            text(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'public' ORDER BY table_name, column_name"
            )
        ).all()
        found = []
        for table, column, data_type in columns:
            as_text = (
                f"encode(\"{column}\", 'escape')"
                if data_type == "bytea"
                else f'CAST("{column}" AS text)'
            )
            hit = s.scalar(
                text(f'SELECT EXISTS (SELECT 1 FROM "{table}" WHERE {as_text} ILIKE ANY(:p))'),
                {"p": [f"%{v}%" for v in values]},
            )
            if hit:
                found.append(f"{table}.{column}")
    return found


def _redis_holding(*values: str) -> list[str]:
    """Keys and values under this stack's prefix, in the broker's, the result backend's and the
    limiter's Redis, that hold one of ``values``."""
    prefix = os.environ["SEGOPS_REDIS_KEY_PREFIX"]
    texts = [
        chunk
        for var in ("SEGOPS_BROKER_URL", "SEGOPS_RESULT_BACKEND", "SEGOPS_LIMITER_REDIS_URL")
        for chunk in redis_texts(os.environ[var], prefix)
    ]
    assert texts, "nothing under the prefix: the search would find nothing anyway"
    return [c[:200] for c in texts if any(v.lower() in c.lower() for v in values)]


def _eventually(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _person(token: str) -> tuple[str, str, str]:
    return f"cust-{token}", f"forget.{token}@example.com", f"Zed{token}"


def _synced_person(stack: Stack, tmp_path: Path, klaviyos: list[Klaviyo]) -> tuple[Any, ...]:
    """A member with an email and a trait, synced to each account's list with two others."""
    token = uuid.uuid4().hex[:10]
    user, email, name = _person(token)
    others = [f"keep{i}.{token}@example.com" for i in range(2)]
    with session_scope() as s:
        record_identity(s, user, email, {"email": email, "first_name": name})
    segment = new_segment()
    connectors = [create_connector(k, segment) for k in klaviyos]
    cli("connectors", "update", connectors[0], "--traits", "first_name", check=True)
    recompute(segment, [user, *others], tmp_path)
    for connector_id in connectors:
        wait_idle(connector_id)
    for k in klaviyos:
        assert user in k.members()
    return user, email, name, others, segment, connectors


def test_members_forget_leaves_no_trace_and_the_next_appearance_is_new(
    stack: Stack, tmp_path: Path
) -> None:
    k1, k2 = stack.klaviyo(), stack.klaviyo()
    user, email, name, others, segment, (c1, c2) = _synced_person(stack, tmp_path, [k1, k2])
    profile_ids = [k.members()[user].id for k in (k1, k2)]
    assert k1.members()[user].attributes.get("first_name") == name  # the trait went along
    with session_scope() as s:  # Klaviyo once rejected it for the other connector
        s.execute(
            text(
                "INSERT INTO member_rejections (connector_id, user_id, reason) "
                "VALUES (:c, :u, 'refused')"
            ),
            {"c": c2, "u": user},
        )
    held = set(_columns_holding(user, email, name))
    assert {
        "identities.traits",
        "connector_members.user_id",
        "sync_batch_items.email",
        "member_rejections.user_id",
        "segment_members.user_id",
    } <= held  # the search does find the member where it is

    result = cli("members", "forget", user, "--klaviyo-delete")

    assert result.returncode == 0, result.stderr
    assert "removed from 2 Klaviyo list(s), 2 Klaviyo profile deletion(s)" in result.stdout
    assert user not in result.stdout + result.stderr
    # (a) off both lists, and Klaviyo deletes both profiles (shortly after the request)
    assert user not in k1.members() and user not in k2.members()
    assert set(k1.members()) == set(others)

    def profiles_deleted() -> None:
        assert [stack.sim.profile(p) for p in profile_ids] == [None, None]

    _eventually(profiles_deleted)
    # (b) no column of any table holds the member; the forget's own row holds nothing of it
    assert _columns_holding(user, email, name) == []
    with session_scope() as s:
        records = s.execute(text("SELECT * FROM forget_records")).mappings().all()
    assert [
        (r["source"], r["klaviyo_delete"], r["lists_removed"], r["klaviyo_deletions"], r["error"])
        for r in records
    ] == [("cli", True, 2, 2, None)]
    assert records[0]["finished_at"] is not None
    # (c) nor any Redis key or value of the stack
    assert _redis_holding(user, email, name) == []

    # (d) the next appearance in the segment is a new member: added again
    recompute(segment, [user, *others], tmp_path)
    wait_idle(c1, runs_at_least=2)
    assert latest_run(c1).added == 1
    assert user in k1.members()


def _send_forgets(*users: str) -> None:
    from celery import Celery

    producer = Celery("forget-test-producer")  # as the deletion pipeline sends them
    configure(producer, get_settings())
    try:
        for user in users:
            producer.send_task(
                "segops.forget_user",
                kwargs={"user_id": user, "klaviyo_delete": False},
                queue=SEGOPS_QUEUE,
            )
    finally:
        producer.close()


def test_the_forget_user_message_forgets_through_the_worker(stack: Stack, tmp_path: Path) -> None:
    k = stack.klaviyo()
    user, email, name, others, _, _ = _synced_person(stack, tmp_path, [k])
    _send_forgets(user)

    def forgotten() -> Any:
        with session_scope() as s:
            row = s.execute(
                text(
                    "SELECT lists_removed, klaviyo_deletions, error FROM forget_records "
                    "WHERE source = 'message' AND finished_at IS NOT NULL"
                )
            ).one_or_none()
        assert row is not None
        return tuple(row)

    assert _eventually(forgotten) == (1, 0, None)
    assert set(k.members()) == set(others)
    assert _columns_holding(user, email, name) == []

    def redis_clean() -> None:  # the message is acknowledged and its held copy released
        assert _redis_holding(user, email, name) == []

    _eventually(redis_clean)


def test_forgets_waiting_for_a_running_batch_leave_the_worker_to_others(
    stack: Stack, tmp_path: Path
) -> None:
    """As many forget messages as the worker has pool slots (2), each for a member that a
    running sync's batch has sent and not yet heard back on. Waiting inside the task would hold
    both slots for up to 600 s, and with them the steps that settle such a batch; each comes
    back later instead, having written nothing, so a third forget goes through meanwhile. Once
    the batch settles, both forget their member with nothing left open."""
    k = stack.klaviyo()
    waiting = [_synced_person(stack, tmp_path, [k]) for _ in range(2)]
    free = _synced_person(stack, tmp_path, [k])
    # the sweeper re-plans a run left planning, and re-sends a dispatched one's batches only
    # after SEGOPS_STUCK_AFTER (20 s) without progress: the deferred forgets come back 2, 6
    # and 14 s after they are sent, so they end before it unless the free one takes 12 s
    runs = [
        running_run_that_sent(p[5][0], p[0], batches=("submitted",), phase="dispatched")
        for p in waiting
    ]
    before = message_forget_records(finished=True)
    try:
        _send_forgets(*(p[0] for p in waiting))
        time.sleep(1.0)  # both taken by the worker (and put back) before the third is sent
        _send_forgets(free[0])

        def the_free_one_forgotten() -> None:
            assert len(message_forget_records(finished=True)) == len(before) + 1

        _eventually(the_free_one_forgotten, timeout=15)  # far below the 600 s of a held slot
        assert message_forget_records(finished=True)[len(before) :][0][2:] == (1, None)
        assert free[0] not in k.members()
        for user, email, name, *_ in waiting:  # nothing written for them yet
            assert user in k.members()
            assert "identities.email" in _columns_holding(user, email, name)

        with session_scope() as s:  # the batches' jobs land and their steps record it
            s.execute(
                text("UPDATE sync_batches SET status = 'done' WHERE run_id = ANY(:r)"), {"r": runs}
            )

        def all_forgotten() -> list[tuple[Any, ...]]:
            done = message_forget_records(finished=True)[len(before) :]
            assert len(done) == 3
            return [row[2:] for row in done]

        assert _eventually(all_forgotten) == [(1, None)] * 3
        assert set(k.members()) == {o for p in [*waiting, free] for o in p[3]}
        for user, email, name, *_ in [*waiting, free]:
            assert _columns_holding(user, email, name) == []

        def redis_clean() -> None:  # every deferred copy of the messages acknowledged too
            for user, email, name, *_ in [*waiting, free]:
                assert _redis_holding(user, email, name) == []

        _eventually(redis_clean)
    finally:
        drop_runs(*runs)


@pytest.mark.parametrize("bad", ["", "x" * 1001, "a\tb"])
def test_a_malformed_user_id_exits_2_and_writes_nothing(stack: Stack, bad: str) -> None:
    with session_scope() as s:
        before = s.scalar(text("SELECT count(*) FROM forget_records"))
    result = cli("members", "forget", bad)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "user id" in result.stderr
    with session_scope() as s:
        assert s.scalar(text("SELECT count(*) FROM forget_records")) == before
