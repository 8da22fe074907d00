"""sync/fleet/liveness.py on fakeredis: heartbeats, held tasks, the scan, batch locks, poison pills.

fakeredis expires keys by a FakeClock the tests advance by hand: TTLs run out when a test says
so, never because the machine was slow, and nothing sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import fakeredis
import pytest

from segops_sync.sync.fleet import liveness, locks
from segops_sync.sync.fleet.liveness import Held, Keys
from segops_sync.sync.fleet.locks import refresh_once, refreshed_lock
from tests.fake_clock import FakeClock, expire_fakeredis_keys_by


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    expire_fakeredis_keys_by(clock, monkeypatch)
    return clock


@pytest.fixture
def r(clock: FakeClock) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


KEYS = Keys.for_prefix("t-")


def _held(task_id: str, node: str, batch: int = 1) -> Held:
    return Held(task_id, node, "segops.add_batch", [batch], {})


def test_keys_live_under_the_environment_prefix() -> None:
    assert KEYS.heartbeat("n1") == "t-segops:live:hb:n1"
    assert KEYS.held == "t-segops:live:held"
    assert KEYS.batch_lock(7).startswith("t-segops:live:")


def test_node_ids_differ_per_start_of_the_same_host() -> None:
    a, b = liveness.new_node_id("celery@h"), liveness.new_node_id("celery@h")
    assert a != b and a.startswith("celery@h/") and "|" not in liveness.new_node_id("a|b")


def test_heartbeat_expires_after_its_ttl(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    liveness.beat(r, KEYS, "n1", ttl=0.3)
    assert liveness.alive(r, KEYS, ["n1", "n2"]) == {"n1"}
    clock.advance(0.29)
    assert liveness.alive(r, KEYS, ["n1"]) == {"n1"}
    clock.advance(0.02)
    assert liveness.alive(r, KEYS, ["n1"]) == set()


def test_scan_resends_what_dead_nodes_held_and_leaves_live_nodes_alone(
    r: fakeredis.FakeRedis,
) -> None:
    liveness.beat(r, KEYS, "alive", ttl=10)
    for item in (_held("t1", "dead", 1), _held("t2", "dead", 2), _held("t3", "alive", 3)):
        liveness.hold(r, KEYS, item)
    resent: list[Held] = []
    result = liveness.scan(r, KEYS, "me", resent.append, broker_gives_back=False)
    assert result.scanned and result.resent == 2
    assert sorted(h.args[0] for h in resent) == [1, 2]
    assert [h.task_id for h in liveness.held_by(r, KEYS)] == ["t3"]
    # claimed once: a second scan finds nothing more
    assert liveness.scan(r, KEYS, "me", resent.append, broker_gives_back=False).resent == 0
    assert len(resent) == 2


def test_on_rabbitmq_the_scan_only_forgets(r: fakeredis.FakeRedis) -> None:
    liveness.hold(r, KEYS, _held("t1", "dead"))
    resent: list[Held] = []
    result = liveness.scan(r, KEYS, "me", resent.append, broker_gives_back=True)
    assert [h.task_id for h in result.orphans] == ["t1"] and resent == []
    assert liveness.held_by(r, KEYS) == []


def test_one_scanner_at_a_time(r: fakeredis.FakeRedis) -> None:
    liveness.hold(r, KEYS, _held("t1", "dead"))
    r.set(KEYS.scan_lock, "other|x", px=10_000)
    result = liveness.scan(r, KEYS, "me", lambda h: None, broker_gives_back=False)
    assert not result.scanned and liveness.held_by(r, KEYS)


def test_a_message_received_again_since_the_read_is_not_claimed(r: fakeredis.FakeRedis) -> None:
    liveness.hold(r, KEYS, _held("t1", "dead"))
    real = liveness.held_by

    def racing(client: fakeredis.FakeRedis, keys: Keys) -> list[Held]:
        entries = real(client, keys)
        liveness.beat(client, keys, "new", ttl=10)
        liveness.hold(client, keys, _held("t1", "new"))  # a live node received it meanwhile
        return entries

    liveness.held_by = racing  # type: ignore[assignment]
    try:
        assert liveness.claim_orphans(r, KEYS) == []
    finally:
        liveness.held_by = real  # type: ignore[assignment]
    assert [h.node for h in liveness.held_by(r, KEYS)] == ["new"]


def test_release_and_forget(r: fakeredis.FakeRedis) -> None:
    liveness.beat(r, KEYS, "n1", ttl=10)
    liveness.hold(r, KEYS, _held("t1", "n1"))
    liveness.hold(r, KEYS, _held("t2", "n1"))
    liveness.hold(r, KEYS, _held("t3", "n2"))
    liveness.release(r, KEYS, "t1")
    liveness.forget_node(r, KEYS, "n1")
    assert [h.task_id for h in liveness.held_by(r, KEYS)] == ["t3"]
    assert liveness.alive(r, KEYS, ["n1"]) == set()


def test_one_copy_of_a_batch_runs_at_a_time(r: fakeredis.FakeRedis) -> None:
    liveness.beat(r, KEYS, "n1", ttl=10)
    liveness.beat(r, KEYS, "n2", ttl=10)
    a, b = liveness.batch_holder("n1"), liveness.batch_holder("n2")
    assert liveness.enter_batch(r, KEYS, 5, a, worker_lost_budget=3).outcome == "run"
    assert liveness.enter_batch(r, KEYS, 5, b, worker_lost_budget=3).outcome == "busy"
    assert liveness.enter_batch(r, KEYS, 6, b, worker_lost_budget=3).outcome == "run"
    liveness.leave_batch(r, KEYS, 5, a)
    assert liveness.enter_batch(r, KEYS, 5, b, worker_lost_budget=3).outcome == "run"


def test_a_dead_nodes_batch_lock_is_taken_over(r: fakeredis.FakeRedis) -> None:
    liveness.beat(r, KEYS, "n2", ttl=10)
    dead = liveness.batch_holder("dead-node")
    assert liveness.enter_batch(r, KEYS, 5, dead, worker_lost_budget=3).outcome == "run"
    mine = liveness.batch_holder("n2")
    entry = liveness.enter_batch(r, KEYS, 5, mine, worker_lost_budget=3)
    assert (entry.outcome, entry.crashes) == ("run", 1)  # the dead one never left


def test_a_dead_pool_childs_lock_is_taken_over_by_its_node(r: fakeredis.FakeRedis) -> None:
    liveness.beat(r, KEYS, "n1", ttl=10)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    gone = f"n1|{int(child.stdout)}|abcd"  # a pool child of n1 that was killed mid-step
    r.set(KEYS.batch_lock(9), gone)
    assert (
        liveness.enter_batch(r, KEYS, 9, liveness.batch_holder("n1"), worker_lost_budget=3).outcome
        == "run"
    )
    # a live sibling process of the same node still excludes
    r.set(KEYS.batch_lock(10), f"n1|{os.getppid()}|abcd")
    assert (
        liveness.enter_batch(r, KEYS, 10, liveness.batch_holder("n1"), worker_lost_budget=3).outcome
        == "busy"
    )


def test_a_poison_pill_is_given_up_after_the_budget(r: fakeredis.FakeRedis) -> None:
    liveness.beat(r, KEYS, "n1", ttl=10)
    outcomes: list[tuple[str, int]] = []
    for _ in range(4):  # each delivery dies with its process: nobody leaves the batch
        entry = liveness.enter_batch(
            r, KEYS, 3, f"n1|999999999|{len(outcomes)}", worker_lost_budget=3
        )
        outcomes.append((entry.outcome, entry.crashes))
    assert outcomes == [("run", 0), ("run", 1), ("run", 2), ("poisoned", 3)]


def test_steps_that_end_normally_never_count_as_crashes(r: fakeredis.FakeRedis) -> None:
    liveness.beat(r, KEYS, "n1", ttl=10)
    for _ in range(10):  # a batch polling its job: many deliveries, none of them lost
        holder = liveness.batch_holder("n1")
        assert liveness.enter_batch(r, KEYS, 4, holder, worker_lost_budget=2).crashes == 0
        liveness.leave_batch(r, KEYS, 4, holder)


def test_an_oversized_message_is_not_recorded(r: fakeredis.FakeRedis) -> None:
    huge = Held("t1", "n1", "segops.recompute_finished", [], {"segment_id": "x" * 100_000})
    assert not liveness.hold(r, KEYS, huge)
    assert liveness.held_by(r, KEYS) == []


# -- a Redis that lost its data: the marker ------------------------------------------------------


def _node(
    r: fakeredis.FakeRedis, on_lost: list[list[int]], *, fail: bool = False
) -> liveness.NodeLiveness:
    def data_lost(lost: list[int]) -> None:
        if fail:
            raise ConnectionError("PostgreSQL away")
        on_lost.append(lost)

    return liveness.NodeLiveness(
        r,
        KEYS,
        "n1",
        lambda _: None,
        ttl=10,
        scan_interval=5,
        broker_gives_back=False,
        markers=[r],
        on_data_lost=data_lost,
    )


def test_a_vanished_marker_resends_the_open_runs_once(r: fakeredis.FakeRedis) -> None:
    lost: list[list[int]] = []
    node, other = _node(r, lost), _node(r, lost)
    assert node.check_markers() == [0]  # first start: nothing marked yet
    assert other.check_markers() == [] and node.check_markers() == []
    assert r.get(KEYS.marker) == b"ok"
    r.flushall()  # Redis lost its data
    assert other.check_markers() == [0] and node.check_markers() == []
    assert lost == [[0], [0]]


def test_a_failed_recovery_is_tried_again_at_the_next_scan(r: fakeredis.FakeRedis) -> None:
    lost: list[list[int]] = []
    assert _node(r, lost, fail=True).check_markers() == []
    assert r.get(KEYS.marker) is None  # the lease was given back
    assert _node(r, lost).check_markers() == [0] and lost == [[0]]


def test_a_refreshed_lock_outlives_its_ttl_and_is_released(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    # The TTL is long next to the test: the holder's own thread never ticks here; the test
    # runs the refresh steps it would run, a third of the TTL apart.
    with refreshed_lock(r, "t-lock", ttl=60) as held:
        assert held
        value = r.get("t-lock")
        assert isinstance(value, bytes)
        token = value.decode()
        for _ in range(9):  # three TTLs
            clock.advance(20)
            assert refresh_once(r, "t-lock", token, ttl=60)
        with refreshed_lock(r, "t-lock", ttl=60) as second:
            assert not second
    assert r.get("t-lock") is None


def test_a_lock_left_unrefreshed_for_its_ttl_is_free_again(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    with refreshed_lock(r, "t-lock", ttl=60) as held:
        assert held
        clock.advance(59.9)
        with refreshed_lock(r, "t-lock", ttl=60) as second:
            assert not second
        clock.advance(0.2)  # its holder stopped refreshing (a dead process): the TTL ran out
        with refreshed_lock(r, "t-lock", ttl=60) as third:
            assert third


def test_a_dead_holders_lock_expires(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    r.set("t-lock", "someone-dead", px=200)
    clock.advance(0.3)
    with refreshed_lock(r, "t-lock", ttl=0.3) as held:
        assert held


def test_a_lost_lock_is_not_refreshed_and_stops_its_keeper(r: fakeredis.FakeRedis) -> None:
    r.set("t-lock", "someone-else", px=60_000)  # Redis lost ours, another holder took it
    assert not refresh_once(r, "t-lock", "our-token", ttl=600)
    assert 0 < r.pttl("t-lock") <= 60_000


def test_the_holders_thread_runs_the_refresh_steps(
    r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks: list[str] = []
    three = threading.Event()

    def counted(*args: object, **kwargs: float) -> bool:
        ticks.append(str(args[1]))
        if len(ticks) >= 3:
            three.set()
        return True

    monkeypatch.setattr(locks, "refresh_once", counted)
    with refreshed_lock(r, "t-lock", ttl=0.03) as held:
        assert held
        assert three.wait(timeout=30), "the holder's thread never refreshed the lock"
    assert set(ticks) == {"t-lock"}


def test_a_held_task_keeps_the_queue_it_came_from() -> None:
    """A small run's batch is re-sent to the small-run lane, not to its task's route."""
    held = Held("t1", "n1", "segops.add_batch", [7], {}, "segops.klaviyo.small")
    assert Held.decode("t1", held.encode()) == held
    # records written without a queue still decode, with none (the route decides)
    old = '{"args":[7],"kwargs":{},"name":"segops.add_batch","node":"n1"}'
    assert Held.decode("t1", old) == Held("t1", "n1", "segops.add_batch", [7], {})
