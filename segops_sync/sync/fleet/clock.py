"""Where the limiter and the job watcher read the time.

Production passes no clock: each reads Redis ``TIME`` in the script or pipeline that uses it,
so every process agrees on one time and no round trip is added. Tests pass a clock they
advance by hand, and assert exact waits without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable

# Microseconds since the epoch.
Clock = Callable[[], int]

__all__ = ["Clock"]
