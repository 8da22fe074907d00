"""The one retry policy (sync/retry.py): cap, growth, jitter bounds, Retry-After first.

No sleeping: the waits are computed, never waited out, and the random draw is pinned to its
bounds to check them exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import cast

import pytest

from segops_sync.config import Settings
from segops_sync.sync import retry
from segops_sync.sync.fleet.access import LimitedSession


def _settings(base: float = 1.0, visibility_timeout: int = 3600) -> Settings:
    return Settings(retry_base_delay=base, visibility_timeout=visibility_timeout)


Draw = Callable[[float, float], float]


def _pin(monkeypatch: pytest.MonkeyPatch, draw: Draw) -> None:
    monkeypatch.setattr(random, "uniform", draw)


def _lowest(lo: float, hi: float) -> float:
    return lo


def _highest(lo: float, hi: float) -> float:
    return hi


def test_backoff_doubles_from_the_base_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, _highest)
    settings = _settings(base=1.5)
    assert [retry.backoff(n, settings) for n in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]


def test_backoff_never_exceeds_five_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, _highest)
    settings = _settings(base=1.0)
    assert retry.MAX_DELAY == 300.0
    assert retry.backoff(9, settings) == 256.0
    assert retry.backoff(10, settings) == 300.0
    # however many failures in a row: no overflow, still the cap
    assert retry.backoff(5000, settings) == 300.0


def test_backoff_draws_from_the_upper_half_of_its_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(base=2.0)
    _pin(monkeypatch, _lowest)
    assert retry.backoff(3, settings) == 4.0  # half of 8
    assert retry.backoff(20, settings) == 150.0  # half of the cap
    monkeypatch.undo()
    for attempt in range(1, 15):
        ceiling = min(300.0, 2.0 * 2 ** (attempt - 1))
        for _ in range(50):
            assert ceiling / 2 <= retry.backoff(attempt, settings) <= ceiling


def test_a_lower_cap_wins_and_alerts_stay_below_the_visibility_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pin(monkeypatch, _highest)
    assert retry.countdown_cap(_settings()) == 300.0
    short = _settings(visibility_timeout=100)
    assert retry.countdown_cap(short) == 50.0
    assert retry.backoff(12, short, cap=retry.countdown_cap(short)) == 50.0


def test_jitter_adds_five_to_twenty_five_percent_of_at_most_four_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pin(monkeypatch, _lowest)
    assert retry.jitter(2.0) == pytest.approx(0.1)
    assert retry.jitter(60.0) == pytest.approx(0.05 * 4.0)
    _pin(monkeypatch, _highest)
    assert retry.jitter(2.0) == pytest.approx(0.5)
    assert retry.jitter(60.0) == pytest.approx(1.0)  # a second at most, however long the wait
    # a wait of nothing is still spread, over a little
    assert retry.jitter(0.0) == pytest.approx(0.25 * 0.2)
    monkeypatch.undo()
    for wait in (0.0, 0.3, 7.0, 300.0):
        assert 0 < retry.jitter(wait) <= 1.0


def test_a_wait_asked_for_is_taken_as_is_before_any_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pin(monkeypatch, _highest)
    settings = _settings(base=1.0)
    assert retry.wait_or_backoff(7.0, 5, settings) == 7.0  # Retry-After, not 16 s of backoff
    assert retry.wait_or_backoff(0.0, 5, settings) == 0.0
    assert retry.wait_or_backoff(None, 5, settings) == 16.0


def test_celery_infrastructure_retries_cap_at_a_minute() -> None:
    from segops_sync.tasks import MAX_COUNTDOWN, SegopsTask

    assert SegopsTask.retry_backoff_max == retry.INFRA_BACKOFF_MAX == 60
    assert MAX_COUNTDOWN == retry.MAX_DELAY


# -- the read-back follows the table (sync/outcomes.py) and this policy -----------------------


def _failing(*failures: BaseException) -> Callable[[], str]:
    left = list(failures)

    def call() -> str:
        if left:
            raise left.pop(0)
        return "read"

    return call


def test_the_read_back_waits_out_a_429_and_retries_transient_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from segops_sync.klaviyo import RateLimited, TransientError
    from segops_sync.sync.fleet.access import Throttled
    from segops_sync.sync.verify import _with_waits

    _pin(monkeypatch, _lowest)
    slept: list[float] = []
    call = _failing(
        Throttled(0.5, "GET /api/lists"),
        RateLimited("slow down", retry_after=7.0),
        TransientError("502", status=502),
        TransientError("502", status=502),
    )
    told: list[float] = []
    limited = cast(LimitedSession, SimpleNamespace(rate_limited=told.append))
    assert _with_waits(call, limited, _settings(base=1.0), slept.append, "AbC123") == "read"
    # the limiter's 0.5 s and Retry-After's 7 s, each with the least spread; then 0.5 s, 1 s
    assert slept == pytest.approx([0.5 + 0.05 * 0.5, 7.0 + 0.05 * 4.0, 0.5, 1.0])
    assert told == [7.0]  # the fleet hears of the 429 (not of our own limiter), unspread


def test_the_read_back_gives_up_past_the_transient_budget_and_lets_a_dead_key_through() -> None:
    from segops_sync.klaviyo import CredentialsRejected, NotFound, TransientError
    from segops_sync.sync.verify import VerifyError, _with_waits

    settings = Settings(retry_base_delay=0.01, transient_retry_budget=2)
    slept: list[float] = []
    broken = _failing(*(TransientError("503", status=503) for _ in range(3)))
    with pytest.raises(VerifyError, match="503"):
        _with_waits(broken, None, settings, slept.append, "AbC123")
    assert len(slept) == 2
    for permanent in (CredentialsRejected("revoked", status=401), NotFound("no list", status=404)):
        with pytest.raises(type(permanent)):
            _with_waits(_failing(permanent), None, settings, slept.append, "AbC123")
    assert len(slept) == 2  # nothing waited for those
