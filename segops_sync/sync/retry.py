"""The one retry policy: how long to wait before trying a failed thing again.

It serves
- Klaviyo's transient failures (5xx, timeouts, dropped connections) of a batch
  (``batch_step.transient``) and of a read-back (``verify``): :func:`backoff`;
- waits someone asked for, a 429's ``Retry-After`` or the fleet limiter's refusal
  (``outcomes.Action.WAIT``): :func:`wait_or_backoff`, plus :func:`jitter` on top;
- alerts to a receiver that is down (``alerts``): :func:`backoff` under :func:`countdown_cap`;
- infrastructure errors (PostgreSQL, Redis) of any task: Celery's autoretry on the task base,
  capped at :data:`INFRA_BACKOFF_MAX`.

Backoff doubles from ``settings.retry_base_delay`` and is capped at :data:`MAX_DELAY`, five
minutes: long enough that a failing Klaviyo is not hammered, short enough that a run resumes
soon after it recovers, and far below the broker's visibility timeout (an hour), past which
Redis would deliver a waiting task a second time.

Jitter is done one way: a backoff is drawn from the upper half of its ceiling, so failures that
happened together do not return together; a wait someone asked for is never shortened, it gets
a small spread added instead (:func:`jitter`). Celery's own autoretry draws its countdown from
zero to the ceiling (``retry_jitter``): that one is Celery's.
"""

from __future__ import annotations

import random

from segops_sync.config import Settings
from segops_sync.sync.fleet.limiter import spread

# Every backoff, and every countdown a batch task asks for, is at most this (seconds).
MAX_DELAY = 300.0
# Celery's autoretry of infrastructure errors (the task base's ``retry_backoff_max``): after a
# database or Redis outage every waiting task comes back within a minute of the recovery.
INFRA_BACKOFF_MAX = 60
# The spread added to a wait is 5-25 % of at most this: a second at most. A churn's lookups wait
# ~45 s for the limiter's minute to roll, and 5-25 % of that spread their return over 11 s where
# the limiter had slots from the first second; the limiter itself orders those who come back
# together.
JITTER_BASE_CAP = 4.0
# Even a wait of nothing is spread over a little: a fleet refused at once must not return at once.
JITTER_BASE_MIN = 0.2
# 2**64 times any base is past every cap; a larger exponent would only overflow the float.
_MAX_EXPONENT = 64


def backoff(attempt: int, settings: Settings, *, cap: float = MAX_DELAY) -> float:
    """Seconds to wait after the ``attempt``-th failure in a row (the first is 1): a random
    point in the upper half of ``retry_base_delay * 2**(attempt-1)``, that ceiling capped."""
    ceiling = min(cap, settings.retry_base_delay * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return random.uniform(ceiling / 2, ceiling)


def jitter(wait: float) -> float:
    """The spread to add to a wait someone asked for, so that those refused together do not
    come back together (5-25 % of the wait, of :data:`JITTER_BASE_CAP` at most)."""
    return spread(max(wait, JITTER_BASE_MIN), cap=JITTER_BASE_CAP)


def wait_or_backoff(asked: float | None, attempt: int, settings: Settings) -> float:
    """The wait Klaviyo (``Retry-After``) or the limiter asked for, else :func:`backoff`.
    Without jitter: this is what the fleet limiter is told; add :func:`jitter` to sleep."""
    return asked if asked is not None else backoff(attempt, settings)


def countdown_cap(settings: Settings) -> float:
    """The longest countdown a task may ask for: :data:`MAX_DELAY`, and below half the
    visibility timeout, or Redis delivers the waiting task a second time."""
    return min(MAX_DELAY, settings.visibility_timeout / 2)
