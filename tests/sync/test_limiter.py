"""Unit tests for the fleet-wide Klaviyo limiter, on fakeredis (Lua via lupa).

Most tests compress time with ``time_scale=60``: the burst window is then 1/60 s and the steady
window 1 s, so the steady path runs in about a second.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
import uuid
from collections.abc import Iterator

import fakeredis
import pytest

from segops_sync.sync.limiter import AccountLimiter, AccountResolver, Limit

EP = "POST /api/lists/{id}/relationships/profiles"
OTHER_EP = "GET /api/profiles"


@pytest.fixture
def r() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.flushall()


def make(r: fakeredis.FakeRedis, **kw: float) -> AccountLimiter:
    return AccountLimiter(r, prefix=f"t:{uuid.uuid4().hex[:8]}", **kw)


def grant_time(r: fakeredis.FakeRedis, lim: AccountLimiter, account: str, endpoint: str) -> float:
    """Redis TIME (seconds) of the newest grant, read from the limiter's own log."""
    newest = r.zrange(lim._keys(account, endpoint).log, -1, -1, withscores=True)
    return float(newest[0][1]) / 1e6


def max_in_window(times: list[float], window: float) -> int:
    """Largest number of timestamps in any half-open window [t, t + window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def hammer(
    r: fakeredis.FakeRedis,
    lim: AccountLimiter,
    limit: Limit,
    seconds: float,
    account: str = "acct",
    endpoint: str = EP,
    claimant: str | None = None,
    even: bool = False,
) -> list[float]:
    """Ask as fast as allowed for `seconds`, sleeping each returned wait; return grant times."""
    grants: list[float] = []
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        wait = lim.acquire(account, endpoint, limit, claimant=claimant, even=even)
        if wait == 0.0:
            grants.append(grant_time(r, lim, account, endpoint))
        else:
            time.sleep(min(wait, end - now))
    return grants


def test_caps_keep_the_whole_burst_and_the_headroom_of_the_steady_limit(
    r: fakeredis.FakeRedis,
) -> None:
    """The burst's margin is time (the guarded window), the steady window's is count."""
    assert make(r).caps(Limit(10, 150)) == (10, 135)
    assert make(r).caps(Limit(75, 750)) == (75, 675)
    assert make(r).caps(Limit(1, 15)) == (1, 13)
    assert make(r, headroom=0.29).caps(Limit(100, 100)) == (100, 29)
    assert make(r, headroom=0.01).caps(Limit(1, 15)) == (1, 1)
    with pytest.raises(ValueError):
        Limit(0, 10)
    with pytest.raises(ValueError):
        make(r, headroom=1.5)
    with pytest.raises(ValueError):
        make(r, burst_guard=-0.1)
    with pytest.raises(ValueError):
        make(r, time_scale=0)


def test_burst_cap(r: fakeredis.FakeRedis) -> None:
    lim = make(r)  # real time: 1 s burst window
    results = [lim.acquire("acct", EP, Limit(10, 150)) for _ in range(20)]
    assert results[:10] == [0.0] * 10  # the whole published burst, at once
    refused = results[10:]
    # ...and then nothing until 1.05 s after the first: the guard, 50 ms for jitter.
    assert all(1.0 < w <= 1.05 for w in refused)
    # Refusals take nothing.
    assert lim.usage("acct", EP) == (10, 10)
    # Other accounts and endpoints have their own budget.
    assert lim.acquire("other", EP, Limit(10, 150)) == 0.0
    assert lim.acquire("acct", OTHER_EP, Limit(10, 150)) == 0.0


def test_a_peek_answers_like_acquire_but_takes_nothing(r: fakeredis.FakeRedis) -> None:
    lim = make(r)
    limit = Limit(10, 150)
    assert [lim.acquire("acct", EP, limit, peek=True) for _ in range(20)] == [0.0] * 20
    assert lim.usage("acct", EP) == (0, 0)  # twenty peeks, no slot taken
    assert [lim.acquire("acct", EP, limit) for _ in range(10)] == [0.0] * 10
    waits = [lim.acquire("acct", EP, limit, peek=True) for _ in range(3)]
    assert all(0 < w <= 1.05 for w in waits)
    assert lim.usage("acct", EP) == (10, 10)

    # After a 429 back-off, a peek neither takes the probe nor lets anyone past it.
    lim.penalize("acct", OTHER_EP, 0.1)
    assert 0 < lim.acquire("acct", OTHER_EP, limit, peek=True) <= 0.1
    time.sleep(0.11)
    assert lim.acquire("acct", OTHER_EP, limit, peek=True) == 0.0
    assert lim.acquire("acct", OTHER_EP, limit, claimant="a") == 0.0  # still the probe
    assert lim.acquire("acct", OTHER_EP, limit, claimant="b", peek=True) > 0.5


def test_a_pace_spreads_a_burst_over_half_its_window(r: fakeredis.FakeRedis) -> None:
    """Paced, a burst of 5 in a 0.25 s window is one grant every 0.025 s (half the published
    interval): all five within the first half of the window, never two closer than the gap,
    and no five again until the guarded window (0.2625 s) has passed."""
    lim = make(r, time_scale=4, headroom=1.0)  # burst window 0.25 s, guarded 0.2625 s
    limit = Limit(burst=5, steady=1000)
    assert lim.acquire("acct", EP, limit, even=True) == 0.0
    assert 0.01 < lim.acquire("acct", EP, limit, even=True) <= 0.025
    assert 0.01 < lim.acquire("acct", EP, limit, even=True, peek=True) <= 0.025
    grants = hammer(r, lim, limit, 1.0, endpoint=OTHER_EP, even=True)
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert min(gaps) >= 0.025 - 1e-4
    assert max_in_window(grants, 0.25 * 1.05) <= 5
    assert max_in_window(grants, 0.125) == 5  # the burst itself is kept, in half the window
    assert len(grants) >= 0.8 * 5 * 4 / 1.05  # the burst's throughput over the guarded window
    # Unpaced, the same limiter admits the whole burst at once.
    assert [lim.acquire("acct", "another", limit) for _ in range(5)] == [0.0] * 5


def test_the_guard_keeps_one_a_second_more_than_a_second_apart(
    r: fakeredis.FakeRedis,
) -> None:
    """Account lookups (1 a second): two grants 1.0 s apart, with jitter, can land in one of
    Klaviyo's seconds (that met a 429 in CI); the guard puts them 1.05 s apart."""
    lim = make(r)
    limit = Limit(burst=1, steady=15)
    assert lim.acquire("acct", EP, limit, even=True) == 0.0
    assert 1.0 < lim.acquire("acct", EP, limit, even=True) <= 1.05
    assert lim.acquire("acct", OTHER_EP, limit) == 0.0
    assert 1.0 < lim.acquire("acct", OTHER_EP, limit) <= 1.05
    bare = make(r, burst_guard=0.0)
    assert bare.acquire("acct", EP, limit) == 0.0
    assert 0.9 < bare.acquire("acct", EP, limit) <= 1.0  # no guard: the bare window


def test_a_session_paces_the_small_tiers_and_sleeps_out_the_gap(
    r: fakeredis.FakeRedis,
) -> None:
    """M-tier endpoints (10/s) are paced, and the gap (0.05 s) is slept in-process, not
    re-queued; an L-tier endpoint (75/s) still takes its burst at once."""
    from segops_sync.klaviyo import Endpoint
    from segops_sync.sync.access import LimitedSession

    session = LimitedSession(make(r), account="acct", claimant="c")
    started = time.monotonic()
    for _ in range(3):
        session.before_request(Endpoint.CREATE_BULK_IMPORT_JOB)
    assert time.monotonic() - started >= 2 * 0.05 - 0.01
    assert session.slot_wait(Endpoint.CREATE_BULK_IMPORT_JOB) > 0.02
    started = time.monotonic()
    for _ in range(10):
        session.before_request(Endpoint.GET_PROFILES)
    assert time.monotonic() - started < 0.1


def test_steady_cap(r: fakeredis.FakeRedis) -> None:
    lim = make(r, time_scale=60, headroom=1.0)  # steady window = 1 s
    limit = Limit(burst=100, steady=30)
    start = time.monotonic()
    grants = hammer(r, lim, limit, 0.6)
    assert time.monotonic() - start < 1.0  # all within one steady window
    assert len(grants) == 30
    assert lim.usage("acct", EP)[1] == 30
    wait = lim.acquire("acct", EP, limit)
    # The wait is for the steady window (the oldest grant leaves ~1 s after it was made).
    assert 0.3 < wait <= 1.0


def test_sliding_windows_never_exceed_caps(r: fakeredis.FakeRedis) -> None:
    lim = make(r, time_scale=60, headroom=1.0)  # burst window 1/60 s, steady 1 s
    limit = Limit(burst=5, steady=20)
    grants = hammer(r, lim, limit, 2.5)
    assert max_in_window(grants, 1 / 60) == 5  # burst cap reached, never exceeded
    assert max_in_window(grants, 1.0) == 20  # steady cap reached, never exceeded
    # A fixed-window limiter would allow up to 2x around window edges; the log does not.
    # Not needlessly slow either: a window starts every second, so about 3 x 20 in 2.5 s.
    assert len(grants) >= 0.8 * 20 * 2.5


def test_wait_is_accurate_for_burst_window(r: fakeredis.FakeRedis) -> None:
    lim = make(r, time_scale=4, headroom=1.0)  # burst window 0.25 s, guarded 0.2625 s
    limit = Limit(burst=3, steady=1000)
    assert [lim.acquire("acct", EP, limit) for _ in range(3)] == [0.0] * 3
    wait = lim.acquire("acct", EP, limit)
    assert 0.2 < wait <= 0.25 * 1.05
    time.sleep(wait - 0.1)  # too early: still refused, told (about) the remaining time
    early = lim.acquire("acct", EP, limit)
    assert 0 < early <= 0.1
    time.sleep(early)
    assert lim.acquire("acct", EP, limit) == 0.0


def test_wait_is_accurate_for_steady_window(r: fakeredis.FakeRedis) -> None:
    lim = make(r, time_scale=60, headroom=1.0)  # steady window 1 s
    limit = Limit(burst=1000, steady=5)
    assert [lim.acquire("acct", EP, limit) for _ in range(5)] == [0.0] * 5
    wait = lim.acquire("acct", EP, limit)
    assert 0.9 < wait <= 1.0
    time.sleep(wait)
    assert lim.acquire("acct", EP, limit) == 0.0


def test_penalize_blocks_the_whole_fleet_for_that_account_and_endpoint(
    r: fakeredis.FakeRedis,
) -> None:
    prefix = f"t:{uuid.uuid4().hex[:8]}"
    worker_a = AccountLimiter(r, prefix=prefix)
    worker_b = AccountLimiter(r, prefix=prefix)  # another process, same Redis
    limit = Limit(75, 750)
    assert worker_a.acquire("acct", EP, limit) == 0.0
    worker_a.penalize("acct", EP, 0.5)
    for worker in (worker_a, worker_b):
        for claimant in (None, "conn-1", "conn-2"):
            assert 0.4 < worker.acquire("acct", EP, limit, claimant=claimant) <= 0.5
    assert worker_b.usage("acct", EP) == (1, 1)  # refused calls took nothing
    assert worker_b.acquire("acct", OTHER_EP, limit) == 0.0
    assert worker_b.acquire("other-acct", EP, limit) == 0.0
    # Never shortened by a smaller Retry-After; extended by a larger one.
    worker_b.penalize("acct", EP, 0.1)
    assert worker_a.acquire("acct", EP, limit) > 0.3
    worker_b.penalize("acct", EP, 0.7)
    wait = worker_a.acquire("acct", EP, limit)
    assert 0.6 < wait <= 0.7
    time.sleep(wait)
    assert worker_b.acquire("acct", EP, limit) == 0.0


def test_observe_remaining_slows_down_before_a_429(r: fakeredis.FakeRedis) -> None:
    lim = make(r)
    limit = Limit(10, 150)  # threshold: 2 % of 150 = 3
    assert lim.acquire("acct", EP, limit) == 0.0
    lim.observe_remaining("acct", EP, remaining=100, reset=30)
    lim.observe_remaining("acct", EP, remaining=None, reset=30)
    assert lim.acquire("acct", EP, limit) == 0.0  # plenty left: no change
    lim.observe_remaining("acct", EP, remaining=3, reset=0.3)
    wait = lim.acquire("acct", EP, limit)
    assert 0.2 < wait <= 0.3
    assert lim.acquire("acct", OTHER_EP, limit) == 0.0
    # A later, more optimistic answer never shortens the back-off.
    lim.observe_remaining("acct", EP, remaining=0, reset=0.05)
    assert lim.acquire("acct", EP, limit) > 0.15
    time.sleep(lim.acquire("acct", EP, limit))
    assert lim.acquire("acct", EP, limit) == 0.0


def test_after_a_429_back_off_one_probe_goes_first(r: fakeredis.FakeRedis) -> None:
    prefix = f"t:{uuid.uuid4().hex[:8]}"
    worker_a = AccountLimiter(r, prefix=prefix)
    worker_b = AccountLimiter(r, prefix=prefix)  # another process, same Redis
    limit = Limit(75, 750)
    worker_a.penalize("acct", EP, 0.2)
    time.sleep(0.21)
    assert worker_a.acquire("acct", EP, limit) == 0.0  # the probe
    # The rest of the fleet waits for the probe's answer, not for the windows.
    assert 0.9 < worker_b.acquire("acct", EP, limit, claimant="c2") <= 1.0
    assert worker_b.acquire("acct", OTHER_EP, limit) == 0.0
    worker_a.observe_remaining("acct", EP, remaining=None, reset=None)  # an answer, not a 429
    assert worker_b.acquire("acct", EP, limit, claimant="c2") == 0.0
    assert worker_a.acquire("acct", EP, limit) == 0.0

    # A probe that meets a 429 is penalized; the next probe goes after that back-off.
    worker_a.penalize("acct", EP, 0.2)
    time.sleep(0.21)
    assert worker_b.acquire("acct", EP, limit) == 0.0
    worker_b.penalize("acct", EP, 0.3)
    assert 0.2 < worker_a.acquire("acct", EP, limit) <= 0.3
    time.sleep(0.31)
    assert worker_a.acquire("acct", EP, limit) == 0.0
    assert worker_b.acquire("acct", EP, limit) > 0.5

    # A probe whose answer never comes holds the others PROBE_SECONDS at most.
    worker_a.PROBE_SECONDS = 0.2
    worker_a.penalize("acct", EP, 0.1)
    time.sleep(0.11)
    assert worker_a.acquire("acct", EP, limit) == 0.0
    wait = worker_b.acquire("acct", EP, limit)
    assert 0.1 < wait <= 0.2
    time.sleep(wait)
    assert worker_b.acquire("acct", EP, limit) == 0.0  # the next probe


def test_fairness_small_claimant_gets_its_share(r: fakeredis.FakeRedis) -> None:
    lim = make(r, time_scale=120, headroom=1.0)  # steady window 0.5 s, activity grace 1/24 s
    limit = Limit(burst=100, steady=40)
    window = 0.5
    # Alone, the big claimant gets the whole budget: asked until the first refusal (not for a
    # fixed wall time, which a loaded CI machine filled with 33 grants of fakeredis's Lua).
    solo: list[float] = []
    while lim.acquire("acct", EP, limit, claimant="big") == 0.0:
        solo.append(grant_time(r, lim, "acct", EP))
    assert len(solo) == 40 and solo[-1] - solo[0] < window

    # Now both ask; the small one must not be starved by the big one's backlog.
    grants: dict[str, list[float]] = {"big": [], "small": []}
    next_at = {"big": 0.0, "small": 0.0}
    end = time.monotonic() + 2.2 * window
    while (now := time.monotonic()) < end:
        for who in ("big", "small"):
            if next_at[who] > now:
                continue
            wait = lim.acquire("acct", EP, limit, claimant=who)
            if wait == 0.0:
                grants[who].append(grant_time(r, lim, "acct", EP))
            else:
                next_at[who] = now + wait
        time.sleep(max(0.0, min(next_at.values()) - time.monotonic()))

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
    # The small one got a real share: about one share per steady window once A's solo run ends.
    assert len(grants["small"]) >= 0.8 * 2 * share, grants
    assert len(grants["small"]) >= 0.4 * (len(grants["small"]) + len(grants["big"]))

    # When the small one goes quiet, the big one gets the whole budget back.
    later = hammer(r, lim, limit, 2.3 * window, claimant="big")
    tail = [t for t in later if t >= later[-1] - window]
    assert len(tail) >= 0.8 * 40


def test_claimant_none_and_a_lone_named_claimant_get_the_whole_budget(
    r: fakeredis.FakeRedis,
) -> None:
    lim = make(r)
    limit = Limit(10, 150)
    assert sum(lim.acquire("a1", EP, limit) == 0.0 for _ in range(12)) == 10
    assert sum(lim.acquire("a2", EP, limit, claimant="conn-9") == 0.0 for _ in range(12)) == 10


def test_keys_expire_on_their_own(r: fakeredis.FakeRedis) -> None:
    lim = make(r, time_scale=60)  # steady window 1 s
    limit = Limit(10, 150)
    for claimant in ("x", "y", None):
        lim.acquire("acct", EP, limit, claimant=claimant)
    keys = list(r.scan_iter(f"{lim.prefix}:*"))
    assert len(keys) == 6  # log, active, ctl, and one log per claimant
    assert all(0 < r.pttl(k) <= 1002 for k in keys)
    lim.penalize("acct", EP, 30)
    assert r.pttl(lim._keys("acct", EP).ctl) > 29_000  # the back-off outlives the window
    lim2 = make(r, time_scale=60)
    lim2.acquire("acct", EP, limit)
    time.sleep(1.1)
    assert list(r.scan_iter(f"{lim2.prefix}:*")) == []


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
    begun = time.monotonic()
    assert AccountResolver(r).resolve(other, lambda: "ACCT9") == "ACCT9"
    assert time.monotonic() - begun < 1.0


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
