"""Klaviyo's limiter: per account and endpoint, a fixed 1 s burst window and a 60 s steady window.

A window opens with the first request after the previous one closed. Only accepted requests are
counted: a 429 costs nothing, as with Klaviyo (an immediate retry is refused again only because
the window is still full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from segops_sync.klaviyo_sim.published import RateLimit

BURST_SECONDS = 1.0
STEADY_SECONDS = 60.0
_EPS = 1e-9  # float slack so that "exactly Retry-After later" lands in the new window


@dataclass
class _Window:
    length: float
    start: float = float("-inf")
    count: int = 0

    def roll(self, now: float) -> None:
        if now >= self.start + self.length - _EPS:
            self.start, self.count = now, 0

    def remaining_time(self, now: float) -> float:
        return max(0.0, self.start + self.length - now)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float | None  # set when refused
    steady_limit: int
    steady_remaining: int
    steady_reset: float


class FixedWindowLimiter:
    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.burst_seconds = BURST_SECONDS / time_scale
        self.steady_seconds = STEADY_SECONDS / time_scale
        self._windows: dict[tuple[str, str], tuple[_Window, _Window]] = {}

    def _pair(self, key: tuple[str, str]) -> tuple[_Window, _Window]:
        pair = self._windows.get(key)
        if pair is None:
            pair = (_Window(self.burst_seconds), _Window(self.steady_seconds))
            self._windows[key] = pair
        return pair

    def acquire(
        self, key: tuple[str, str], limit: RateLimit, now: float, *, enforce: bool = True
    ) -> Decision:
        burst, steady = self._pair(key)
        burst.roll(now)
        steady.roll(now)
        waits = []
        if burst.count >= limit.burst:
            waits.append(burst.remaining_time(now))
        if steady.count >= limit.steady:
            waits.append(steady.remaining_time(now))
        if waits and enforce:
            return Decision(
                False,
                round_up(max(waits)),
                limit.steady,
                max(0, limit.steady - steady.count),
                round_up(steady.remaining_time(now)),
            )
        burst.count += 1
        steady.count += 1
        return self._state(steady, limit, now, allowed=True)

    def peek(self, key: tuple[str, str], limit: RateLimit, now: float) -> Decision:
        _, steady = self._pair(key)
        if now >= steady.start + steady.length - _EPS:
            return Decision(True, None, limit.steady, limit.steady, round_up(steady.length))
        return self._state(steady, limit, now, allowed=True)

    @staticmethod
    def _state(steady: _Window, limit: RateLimit, now: float, *, allowed: bool) -> Decision:
        return Decision(
            allowed,
            None,
            limit.steady,
            max(0, limit.steady - steady.count),
            round_up(steady.remaining_time(now)),
        )


def round_up(seconds: float) -> float:
    """Up to the next 0.01 s, so that waiting this long is always enough."""
    return max(0.01, math.ceil(round(seconds * 100, 6)) / 100)


def format_seconds(seconds: float) -> str:
    """'3' when whole, else a decimal such as '0.35' (Klaviyo sends integers; clients parse both)."""
    value = round_up(seconds)
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}".rstrip("0")
