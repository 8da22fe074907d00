"""Unit tests for the fleet-wide Klaviyo limiter, on fakeredis (Lua via lupa).

The limiter reads the time from a FakeClock the tests advance by hand: waits are asserted to the
microsecond and nothing sleeps, so Klaviyo's own windows (1 s, 60 s) cost no time.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import fakeredis
import pytest

from segops_sync.klaviyo import RateLimit
from segops_sync.sync.fleet.limiter import AccountLimiter, AccountResolver
from tests.fake_clock import FakeClock

EP = "POST /api/lists/{id}/relationships/profiles"
OTHER_EP = "GET /api/profiles"


@pytest.fixture
def r() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.flushall()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(r: fakeredis.FakeRedis, clock: FakeClock, **kw: float) -> AccountLimiter:
    return AccountLimiter(r, prefix=f"t:{uuid.uuid4().hex[:8]}", clock=clock, **kw)


def exactly(value: float) -> object:
    """``value`` to the microsecond: the script rounds a wait up to a whole microsecond."""
    return pytest.approx(value, abs=1e-6)


def grant_time(r: fakeredis.FakeRedis, lim: AccountLimiter, account: str, endpoint: str) -> float:
    """The time (seconds) of the newest grant, read from the limiter's own log."""
    newest = r.zrange(lim._keys(account, endpoint).log, -1, -1, withscores=True)
    return float(newest[0][1]) / 1e6


def max_in_window(times: list[float], window: float) -> int:
    """Largest number of timestamps in any half-open window [t, t + window)."""
    # In whole microseconds, as the limiter keeps them: grants exactly one window apart (the
    # clock makes them so) must not merge through float rounding of epoch seconds.
    micros = sorted(round(t * 1_000_000) for t in times)
    width = round(window * 1_000_000)
    best, lo = 0, 0
    for hi, t in enumerate(micros):
        while micros[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def hammer(
    r: fakeredis.FakeRedis,
    clock: FakeClock,
    lim: AccountLimiter,
    limit: RateLimit,
    seconds: float,
    account: str = "acct",
    endpoint: str = EP,
    claimant: str | None = None,
    even: bool = False,
) -> list[float]:
    """Ask as fast as allowed for `seconds`, waiting out each returned wait; return grant times."""
    grants: list[float] = []
    end = clock.us + round(seconds * 1_000_000)
    while clock.us < end:
        wait = lim.acquire(account, endpoint, limit, claimant=claimant, even=even)
        if wait == 0.0:
            grants.append(grant_time(r, lim, account, endpoint))
        else:
            clock.advance(min(wait, (end - clock.us) / 1_000_000))
    return grants


def test_caps_keep_the_whole_burst_and_the_headroom_of_the_steady_limit(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """The burst's margin is time (the guarded window), the steady window's is count."""
    assert make(r, clock).caps(RateLimit(10, 150)) == (10, 135)
    assert make(r, clock).caps(RateLimit(75, 750)) == (75, 675)
    assert make(r, clock).caps(RateLimit(1, 15)) == (1, 13)
    assert make(r, clock, headroom=0.29).caps(RateLimit(100, 100)) == (100, 29)
    assert make(r, clock, headroom=0.01).caps(RateLimit(1, 15)) == (1, 1)
    with pytest.raises(ValueError):
        RateLimit(0, 10)
    with pytest.raises(ValueError):
        make(r, clock, headroom=1.5)
    with pytest.raises(ValueError):
        make(r, clock, burst_guard=-0.1)
    with pytest.raises(ValueError):
        make(r, clock, time_scale=0)


def test_without_a_clock_the_scripts_read_the_servers_time(r: fakeredis.FakeRedis) -> None:
    """Production passes no clock: a grant is stamped with Redis TIME, read in the script."""
    lim = AccountLimiter(r, prefix=f"t:{uuid.uuid4().hex[:8]}")
    before = r.time()
    assert lim.acquire("acct", EP, RateLimit(10, 150)) == 0.0
    after = r.time()
    stamp = grant_time(r, lim, "acct", EP)
    assert before[0] + before[1] / 1e6 <= stamp <= after[0] + after[1] / 1e6


def test_burst_cap(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = make(r, clock)  # Klaviyo's 1 s burst window
    results = [lim.acquire("acct", EP, RateLimit(10, 150)) for _ in range(20)]
    assert results[:10] == [0.0] * 10  # the whole published burst, at once
    # ...and then nothing until 1.05 s after the first: the guard, 50 ms for jitter.
    assert results[10:] == [exactly(1.05)] * 10
    # Refusals take nothing.
    assert lim.usage("acct", EP) == (10, 10)
    # Other accounts and endpoints have their own budget.
    assert lim.acquire("other", EP, RateLimit(10, 150)) == 0.0
    assert lim.acquire("acct", OTHER_EP, RateLimit(10, 150)) == 0.0


def test_a_peek_answers_like_acquire_but_takes_nothing(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    lim = make(r, clock)
    limit = RateLimit(10, 150)
    assert [lim.acquire("acct", EP, limit, peek=True) for _ in range(20)] == [0.0] * 20
    assert lim.usage("acct", EP) == (0, 0)  # twenty peeks, no slot taken
    assert [lim.acquire("acct", EP, limit) for _ in range(10)] == [0.0] * 10
    assert [lim.acquire("acct", EP, limit, peek=True) for _ in range(3)] == [exactly(1.05)] * 3
    assert lim.usage("acct", EP) == (10, 10)

    # After a 429 back-off, a peek neither takes the probe nor lets anyone past it.
    lim.penalize("acct", OTHER_EP, 0.1)
    assert lim.acquire("acct", OTHER_EP, limit, peek=True) == exactly(0.1)
    clock.advance(0.1)
    assert lim.acquire("acct", OTHER_EP, limit, peek=True) == 0.0
    assert lim.acquire("acct", OTHER_EP, limit, claimant="a") == 0.0  # still the probe
    probe_hold = lim.acquire("acct", OTHER_EP, limit, claimant="b", peek=True)
    assert probe_hold == exactly(lim.PROBE_SECONDS)


def test_a_pace_spreads_a_burst_over_half_its_window(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """Paced, a burst of 5 in a 0.25 s window is one grant every 0.025 s (half the published
    interval): all five within the first half of the window, never two closer than the gap,
    and no five again until the guarded window (0.2625 s) has passed."""
    lim = make(r, clock, time_scale=4, headroom=1.0)  # burst window 0.25 s, guarded 0.2625 s
    limit = RateLimit(burst=5, steady=1000)
    assert lim.acquire("acct", EP, limit, even=True) == 0.0
    assert lim.acquire("acct", EP, limit, even=True) == exactly(0.025)
    assert lim.acquire("acct", EP, limit, even=True, peek=True) == exactly(0.025)
    grants = hammer(r, clock, lim, limit, 1.0, endpoint=OTHER_EP, even=True)
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert min(gaps) == exactly(0.025)
    assert max_in_window(grants, 0.25 * 1.05) <= 5
    assert max_in_window(grants, 0.125) == 5  # the burst itself is kept, in half the window
    # The burst's throughput over the guarded window: five in each 0.2625 s, four windows begun.
    assert len(grants) == 4 * 5
    # Unpaced, the same limiter admits the whole burst at once.
    assert [lim.acquire("acct", "another", limit) for _ in range(5)] == [0.0] * 5


def test_the_guard_keeps_one_a_second_more_than_a_second_apart(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """Account lookups (1 a second): two grants 1.0 s apart, with jitter, can land in one of
    Klaviyo's seconds (that met a 429 in CI); the guard puts them 1.05 s apart."""
    lim = make(r, clock)
    limit = RateLimit(burst=1, steady=15)
    assert lim.acquire("acct", EP, limit, even=True) == 0.0
    assert lim.acquire("acct", EP, limit, even=True) == exactly(1.05)
    assert lim.acquire("acct", OTHER_EP, limit) == 0.0
    assert lim.acquire("acct", OTHER_EP, limit) == exactly(1.05)
    bare = make(r, clock, burst_guard=0.0)
    assert bare.acquire("acct", EP, limit) == 0.0
    assert bare.acquire("acct", EP, limit) == exactly(1.0)  # no guard: the bare window


def test_a_session_paces_the_small_tiers_and_sleeps_out_the_gap(
    r: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M-tier endpoints (10/s) are paced, and the gap (0.05 s) is slept in-process, not
    re-queued; an L-tier endpoint (75/s) still takes its burst at once."""
    from segops_sync.klaviyo import Endpoint
    from segops_sync.sync.fleet import access

    slept: list[float] = []

    def sleep(duration: float) -> None:
        slept.append(duration)
        clock.advance(duration)

    # The session's own waits run on the same clock as the limiter's.
    monkeypatch.setattr(access, "time", SimpleNamespace(monotonic=clock.seconds, sleep=sleep))
    session = access.LimitedSession(make(r, clock), account="acct", claimant="c")
    for _ in range(3):
        session.before_request(Endpoint.CREATE_BULK_IMPORT_JOB)
    assert slept == [exactly(0.05)] * 2
    assert session.slot_wait(Endpoint.CREATE_BULK_IMPORT_JOB) == exactly(0.05)
    for _ in range(10):
        session.before_request(Endpoint.GET_PROFILES)
    assert len(slept) == 2  # the L tier's burst: nothing slept


def test_steady_cap(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = make(r, clock, headroom=1.0)  # steady window 60 s
    limit = RateLimit(burst=100, steady=30)
    grants = hammer(r, clock, lim, limit, 36.0)
    assert len(grants) == 30 and set(grants) == {grants[0]}  # the steady cap, at once
    assert lim.usage("acct", EP)[1] == 30
    # The wait is for the steady window: the oldest grant leaves 60 s after it was made.
    assert lim.acquire("acct", EP, limit) == exactly(60.0 - 36.0)


def test_sliding_windows_never_exceed_caps(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = make(r, clock, headroom=1.0)  # burst window 1.05 s (guarded), steady 60 s
    limit = RateLimit(burst=5, steady=20)
    grants = hammer(r, clock, lim, limit, 150.0)
    assert max_in_window(grants, 1.05) == 5  # burst cap reached, never exceeded
    assert max_in_window(grants, 60.0) == 20  # steady cap reached, never exceeded
    # A fixed-window limiter would allow up to 2x around window edges; the log does not.
    # Not needlessly slow either: a steady window begins at 0, 60 and 120 s, 20 grants each.
    assert len(grants) == 3 * 20


def test_wait_is_accurate_for_burst_window(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = make(r, clock, time_scale=4, headroom=1.0)  # burst window 0.25 s, guarded 0.2625 s
    limit = RateLimit(burst=3, steady=1000)
    assert [lim.acquire("acct", EP, limit) for _ in range(3)] == [0.0] * 3
    assert lim.acquire("acct", EP, limit) == exactly(0.25 * 1.05)
    clock.advance(0.2)  # too early: still refused, told the remaining time
    early = lim.acquire("acct", EP, limit)
    assert early == exactly(0.0625)
    clock.advance(early)
    assert lim.acquire("acct", EP, limit) == 0.0


def test_wait_is_accurate_for_steady_window(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = make(r, clock, headroom=1.0)  # steady window 60 s
    limit = RateLimit(burst=1000, steady=5)
    assert [lim.acquire("acct", EP, limit) for _ in range(5)] == [0.0] * 5
    clock.advance(10.0)
    wait = lim.acquire("acct", EP, limit)
    assert wait == exactly(50.0)
    clock.advance(wait)
    assert lim.acquire("acct", EP, limit) == 0.0


def test_penalize_blocks_the_whole_fleet_for_that_account_and_endpoint(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    prefix = f"t:{uuid.uuid4().hex[:8]}"
    worker_a = AccountLimiter(r, prefix=prefix, clock=clock)
    worker_b = AccountLimiter(r, prefix=prefix, clock=clock)  # another process, same Redis
    limit = RateLimit(75, 750)
    assert worker_a.acquire("acct", EP, limit) == 0.0
    worker_a.penalize("acct", EP, 0.5)
    for worker in (worker_a, worker_b):
        for claimant in (None, "conn-1", "conn-2"):
            assert worker.acquire("acct", EP, limit, claimant=claimant) == exactly(0.5)
    assert worker_b.usage("acct", EP) == (1, 1)  # refused calls took nothing
    assert worker_b.acquire("acct", OTHER_EP, limit) == 0.0
    assert worker_b.acquire("other-acct", EP, limit) == 0.0
    # Never shortened by a smaller Retry-After; extended by a larger one.
    clock.advance(0.1)
    worker_b.penalize("acct", EP, 0.1)
    assert worker_a.acquire("acct", EP, limit) == exactly(0.4)
    worker_b.penalize("acct", EP, 0.7)
    wait = worker_a.acquire("acct", EP, limit)
    assert wait == exactly(0.7)
    clock.advance(wait)
    assert worker_b.acquire("acct", EP, limit) == 0.0


def test_observe_remaining_slows_down_before_a_429(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    lim = make(r, clock)
    limit = RateLimit(10, 150)  # threshold: 2 % of 150 = 3
    assert lim.acquire("acct", EP, limit) == 0.0
    lim.observe_remaining("acct", EP, remaining=100, reset=30)
    lim.observe_remaining("acct", EP, remaining=None, reset=30)
    assert lim.acquire("acct", EP, limit) == 0.0  # plenty left: no change
    lim.observe_remaining("acct", EP, remaining=3, reset=0.3)
    assert lim.acquire("acct", EP, limit) == exactly(0.3)
    assert lim.acquire("acct", OTHER_EP, limit) == 0.0
    # A later, more optimistic answer never shortens the back-off.
    clock.advance(0.1)
    lim.observe_remaining("acct", EP, remaining=0, reset=0.05)
    assert lim.acquire("acct", EP, limit) == exactly(0.2)
    clock.advance(0.2)
    assert lim.acquire("acct", EP, limit) == 0.0


def test_after_a_429_back_off_one_probe_goes_first(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    prefix = f"t:{uuid.uuid4().hex[:8]}"
    worker_a = AccountLimiter(r, prefix=prefix, clock=clock)
    worker_b = AccountLimiter(r, prefix=prefix, clock=clock)  # another process, same Redis
    limit = RateLimit(75, 750)
    worker_a.penalize("acct", EP, 0.2)
    clock.advance(0.2)
    assert worker_a.acquire("acct", EP, limit) == 0.0  # the probe
    # The rest of the fleet waits for the probe's answer, not for the windows.
    assert worker_b.acquire("acct", EP, limit, claimant="c2") == exactly(worker_a.PROBE_SECONDS)
    assert worker_b.acquire("acct", OTHER_EP, limit) == 0.0
    worker_a.observe_remaining("acct", EP, remaining=None, reset=None)  # an answer, not a 429
    assert worker_b.acquire("acct", EP, limit, claimant="c2") == 0.0
    assert worker_a.acquire("acct", EP, limit) == 0.0

    # A probe that meets a 429 is penalized; the next probe goes after that back-off.
    worker_a.penalize("acct", EP, 0.2)
    clock.advance(0.2)
    assert worker_b.acquire("acct", EP, limit) == 0.0
    worker_b.penalize("acct", EP, 0.3)
    assert worker_a.acquire("acct", EP, limit) == exactly(0.3)
    clock.advance(0.3)
    assert worker_a.acquire("acct", EP, limit) == 0.0
    assert worker_b.acquire("acct", EP, limit) == exactly(worker_a.PROBE_SECONDS)

    # A probe whose answer never comes holds the others PROBE_SECONDS at most.
    worker_a.PROBE_SECONDS = 0.2
    worker_a.penalize("acct", EP, 0.1)
    clock.advance(0.1)
    assert worker_a.acquire("acct", EP, limit) == 0.0
    wait = worker_b.acquire("acct", EP, limit)
    assert wait == exactly(0.2)
    clock.advance(wait)
    assert worker_b.acquire("acct", EP, limit) == 0.0  # the next probe


def test_fairness_small_claimant_gets_its_share(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = make(r, clock, headroom=1.0)  # steady window 60 s, activity grace 5 s
    limit = RateLimit(burst=100, steady=40)
    window = 60.0
    # Alone, the big claimant gets the whole budget.
    solo: list[float] = []
    while lim.acquire("acct", EP, limit, claimant="big") == 0.0:
        solo.append(grant_time(r, lim, "acct", EP))
    assert len(solo) == 40

    # Now both ask, each coming back when told; the small one must not be starved by the big
    # one's backlog.
    grants: dict[str, list[float]] = {"big": [], "small": []}
    next_at = {"big": clock.us, "small": clock.us}
    end = clock.us + round(2.2 * window * 1_000_000)
    while clock.us < end:
        for who in ("big", "small"):
            if next_at[who] > clock.us:
                continue
            wait = lim.acquire("acct", EP, limit, claimant=who)
            if wait == 0.0:
                grants[who].append(grant_time(r, lim, "acct", EP))
            else:
                next_at[who] = clock.us + round(wait * 1_000_000)
        soonest = min(*next_at.values(), end)
        if soonest > clock.us:
            clock.advance((soonest - clock.us) / 1_000_000)

    share = math.ceil(40 / 2)
    # Hard guarantee: once both are active, each new grant leaves its claimant at most
    # `share` grants in the sliding window ending at that grant.
    for who, mine in grants.items():
        everything = sorted(solo + mine) if who == "big" else sorted(mine)
        for t in mine:
            held = sum(1 for u in everything if t - window < u <= t)
            assert held <= share, (who, held)
    all_times = solo + grants["big"] + grants["small"]
    assert max_in_window(all_times, window) <= 40
    # The small one got its share of each steady window once the big one's solo run left it.
    assert len(grants["small"]) == 2 * share, grants
    assert len(grants["big"]) == 2 * share, grants

    # When the small one goes quiet, the big one gets the whole budget back.
    later = hammer(r, clock, lim, limit, 2.3 * window, claimant="big")
    tail = [t for t in later if t > later[-1] - window]  # the steady window ending at the last
    assert len(tail) == 40


def test_claimant_none_and_a_lone_named_claimant_get_the_whole_budget(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    lim = make(r, clock)
    limit = RateLimit(10, 150)
    assert sum(lim.acquire("a1", EP, limit) == 0.0 for _ in range(12)) == 10
    assert sum(lim.acquire("a2", EP, limit, claimant="conn-9") == 0.0 for _ in range(12)) == 10


def test_keys_expire_on_their_own(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """Every key carries a TTL of its window (Redis's own expiry, in Redis's time: this test
    reads TTLs and never waits one out)."""
    lim = make(r, clock, time_scale=60)  # steady window 1 s, activity grace 1/12 s
    limit = RateLimit(10, 150)
    for claimant in ("x", "y", None):
        lim.acquire("acct", EP, limit, claimant=claimant)
    keys = list(r.scan_iter(f"{lim.prefix}:*"))
    assert len(keys) == 6  # log, active, ctl, and one log per claimant
    assert all(0 < r.pttl(k) <= 1002 for k in keys)
    assert 0 < r.pttl(lim._keys("acct", EP).active) <= 5000 / 60 + 1
    lim.penalize("acct", EP, 30)
    assert r.pttl(lim._keys("acct", EP).ctl) > 29_000  # the back-off outlives the window


def test_account_resolver_fetches_once_when_processes_miss_together(
    r: fakeredis.FakeRedis,
) -> None:
    """A connector's first batches start side by side: one GET /api/accounts for the key, the
    others wait for its answer (a CI run saw two processes fetch the same key). A fetch that
    fails frees the lease at once: the next caller fetches without waiting it out."""
    api_key = "pk_" + uuid.uuid4().hex
    calls: list[int] = []

    def slow_fetch() -> str:
        calls.append(1)
        time.sleep(0.3)
        return "ACCT9"

    answers: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(AccountResolver(r).resolve(api_key, slow_fetch))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert answers == ["ACCT9"] * 4 and len(calls) == 1

    def broken() -> str:
        raise RuntimeError("klaviyo down")

    other = "pk_" + uuid.uuid4().hex
    with pytest.raises(RuntimeError):
        AccountResolver(r).resolve(other, broken)
    assert r.keys("*:fetching") == []  # the lease is freed: nobody waits it out
    assert AccountResolver(r).resolve(other, lambda: "ACCT9") == "ACCT9"


def test_account_resolver_looks_again_after_taking_the_lease(r: fakeredis.FakeRedis) -> None:
    """The holder before us cached its answer and freed the lease between our miss and our
    SET NX: we hold a lease for a key already answered, and must not look it up again (a CI run
    counted three lookups for two keys)."""
    api_key = "pk_" + uuid.uuid4().hex
    resolver = AccountResolver(r)

    class OtherHolderFinishes(fakeredis.FakeRedis):
        """Our first read misses; at that instant the other process caches and frees."""

        raced = False

        def get(self, name: str) -> bytes | str | None:  # type: ignore[override]
            answer = super().get(name)
            if not self.raced:
                self.raced = True
                super().set(name, "ACCT7")
            return answer

    racing = OtherHolderFinishes(server=r.connection_pool.connection_kwargs["server"])
    racing_resolver = AccountResolver(racing, prefix=resolver.prefix)

    def must_not_fetch() -> str:
        raise AssertionError("looked up a key that was already answered")

    assert racing_resolver.resolve(api_key, must_not_fetch) == "ACCT7"
    assert r.keys("*:fetching") == []  # the lease was freed


def test_account_resolver_caches_and_never_stores_the_key(r: fakeredis.FakeRedis) -> None:
    api_key = "pk_" + uuid.uuid4().hex + uuid.uuid4().hex[:2]
    calls: list[str] = []

    def fetch() -> str:
        calls.append("GET /api/accounts")
        return "ACCT123"

    resolver = AccountResolver(r, ttl_seconds=3600)
    assert resolver.resolve(api_key, fetch) == "ACCT123"
    assert resolver.resolve(api_key, fetch) == "ACCT123"
    # Another process: a new resolver reads the shared cache.
    assert AccountResolver(r, ttl_seconds=3600).resolve(api_key, fetch) == "ACCT123"
    assert len(calls) == 1
    # A second key of the same account is learnt once too, and then shares the account id.
    other_key = "pk_" + uuid.uuid4().hex
    assert resolver.resolve(other_key, fetch) == "ACCT123"
    assert len(calls) == 2

    # A failing fetch caches nothing and does not leak the key.
    def broken() -> str:
        raise RuntimeError("klaviyo down")

    with pytest.raises(RuntimeError) as err:
        resolver.resolve("pk_broken", broken)
    assert "pk_broken" not in str(err.value)

    # Scan every key and value in Redis: the key (and its plain sha256) are nowhere.
    needles = [
        s.encode()
        for k in (api_key, other_key, "pk_broken")
        for s in (k, hashlib.sha256(k.encode()).hexdigest())
    ]
    keys = list(r.scan_iter("*"))
    assert len(keys) == 2
    for key in keys:
        kind = r.type(key)
        assert kind == b"string"
        value = r.get(key)
        assert value == b"ACCT123"
        assert 0 < r.ttl(key) <= 3600
        for needle in needles:
            assert needle not in key
