"""A clock tests move by hand, for the limiter and the job watcher (segops_sync.sync.fleet.clock),
and for fakeredis's key expiry."""

from __future__ import annotations

from types import SimpleNamespace

import fakeredis._socket._base
import pytest

# 2026-12-01 00:00 UTC: an epoch time like Redis TIME's, so times compare with Klaviyo's stamps.
START_US = 1_796_083_200_000_000


class FakeClock:
    """Microseconds since the epoch; time passes only when a test calls ``advance``."""

    def __init__(self, start_us: int = START_US) -> None:
        self.us = start_us

    def __call__(self) -> int:
        return self.us

    def seconds(self) -> float:
        return self.us / 1_000_000

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.us += round(seconds * 1_000_000)


def expire_fakeredis_keys_by(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make fakeredis read ``clock``: its TTLs (PX, PEXPIRE) run out only as the test advances
    it. fakeredis expires keys by its own module's ``time.time()``, read at every command."""
    monkeypatch.setattr(fakeredis._socket._base, "time", SimpleNamespace(time=clock.seconds))
