"""A Klaviyo client for one connector, wired to the fleet-wide rate limiter.

Every HTTP request first takes a slot from the per-account, per-endpoint limiter in Redis;
when none is free the request is not sent and ``Throttled`` tells the caller how long to wait
(a Celery task then re-queues itself instead of sleeping). 429s and a low
``RateLimit-Remaining`` are reported back, so every worker slows down, not just this one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import redis

from segops_sync.config import Settings
from segops_sync.klaviyo import (
    ENDPOINT_LIMITS,
    Endpoint,
    KlaviyoClient,
    PermissionDenied,
    RateLimitHeaders,
    fingerprint,
)
from segops_sync.klaviyo.endpoints import endpoint_for
from segops_sync.observability import metrics
from segops_sync.sync.fleet.limiter import AccountLimiter, AccountResolver, spread
from segops_sync.sync.fleet.limiter import Throttled as Throttled  # where callers import it
from segops_sync.sync.fleet.watcher import AccountJobs, JobWatcher, Patience

# The budget that GET /api/accounts calls draw on, whichever account they turn out to be.
ACCOUNT_LOOKUPS = "(account lookups)"


@dataclass
class LimitedSession:
    """Hooks for one client: remembers the last endpoint so a 429 can be charged to it."""

    limiter: AccountLimiter
    account: str
    claimant: str
    last_endpoint: Endpoint | None = field(default=None)
    # A refused request waits in this process up to this long in all before it is Throttled.
    patience: float = 0.0

    def before_request(self, endpoint: Endpoint) -> None:
        self.last_endpoint = endpoint
        even = _paced(endpoint)
        # A wait shorter than the pace's gap is the pace itself: slept, never re-queued.
        deadline = time.monotonic() + max(self.patience, PACED_PATIENCE if even else 0.0)
        while True:
            wait = self._ask(endpoint, peek=False)
            if wait <= 0:
                return
            if time.monotonic() + wait > deadline:
                raise Throttled(wait, endpoint.value)
            # Unpaced, not to the microsecond the slot frees: a whole burst refused together
            # would otherwise come back together. Paced grants are a gap apart already, and the
            # guarded window is the margin for jitter; more would only slow the pace (a spread
            # on paced grants makes the 0.111 s gap 0.118 s: 100 submissions 0.7 s later).
            time.sleep(wait if even else wait + spread(wait, cap=1.0))

    @contextmanager
    def patient(self, seconds: float) -> Iterator[None]:
        """Requests made inside wait in-process for a slot up to ``seconds``, rather than being
        re-queued: for a request that is costly to prepare (a 5 MB job body built from 10,000
        rows), a second of a pool process is cheaper than building it again."""
        before, self.patience = self.patience, seconds
        try:
            yield
        finally:
            self.patience = before

    def slot_wait(self, endpoint: Endpoint) -> float:
        """Seconds until the limiter would admit a request to ``endpoint`` (0.0: now), taking
        no slot: look before preparing a request that is costly to build."""
        return self._ask(endpoint, peek=True)

    def _ask(self, endpoint: Endpoint, *, peek: bool) -> float:
        wait = self.limiter.acquire(
            self.account,
            endpoint.value,
            ENDPOINT_LIMITS[endpoint],
            claimant=self.claimant,
            peek=peek,
            even=_paced(endpoint),
        )
        if wait > 0:
            metrics.add_limiter_wait(endpoint.value, wait)
        return wait

    def after_response(self, endpoint: Endpoint, headers: RateLimitHeaders) -> None:
        # Every answer but a 429: also ends the probe that follows a 429 back-off.
        self.limiter.observe_remaining(
            self.account, endpoint.value, headers.remaining, headers.reset
        )

    def rate_limited(self, retry_after: float) -> None:
        if self.last_endpoint is not None:
            self.limiter.penalize(self.account, self.last_endpoint.value, retry_after)


# Endpoints whose burst is at most this (Klaviyo's M tier, 10/s, and below) get paced grants
# (limiter.py, "Pace"): their bodies are the largest, and a burst of them at one instant queues
# at Klaviyo's edge.
PACED_BURST = 10
# A paced request waits in-process up to this long (the M tier's gap is 0.05 s).
PACED_PATIENCE = 0.25
# A watcher poll's page waits in-process up to this many guarded burst windows.
POLL_PAGE_PATIENCE = 1.05


def poll_patience(session: LimitedSession) -> Patience:
    """A poll's pages wait in-process up to a burst window and its guard (and a little): within
    its budget a poll is never refused mid-way (watcher.py)."""
    seconds = session.limiter.guarded_burst_window * POLL_PAGE_PATIENCE
    return lambda: session.patient(seconds)


def _paced(endpoint: Endpoint) -> bool:
    return ENDPOINT_LIMITS[endpoint].burst <= PACED_BURST


class KlaviyoAccess:
    """Builds limited clients; one per process, shared by the tasks it runs."""

    def __init__(self, settings: Settings, redis_client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis_client or redis.Redis.from_url(
            settings.limiter_url,
            socket_timeout=10,
            socket_connect_timeout=10,
            health_check_interval=30,
        )
        prefix = settings.redis_key_prefix
        self.limiter = AccountLimiter(
            self.redis,
            headroom=settings.limiter_headroom,
            burst_guard=settings.limiter_burst_guard,
            time_scale=settings.klaviyo_time_scale,
            prefix=f"{prefix}segops:rl",
        )
        self.resolver = AccountResolver(self.redis, prefix=f"{prefix}segops:acct")
        self.watcher = JobWatcher(
            self.redis,
            interval=settings.job_poll_interval,
            time_scale=settings.klaviyo_time_scale,
            prefix=f"{prefix}segops:jobs",
            give_up=settings.job_give_up,
        )

    def account_of(self, api_key: str) -> str:
        """Which Klaviyo account a key belongs to: keys of one account share one budget."""

        own_budget = f"key:{fingerprint(api_key)[:16]}"

        def fetch() -> str:
            # Before the answer we cannot know whose budget to charge, so every lookup of the
            # fleet shares one (XS tier: 1/s, 15/min). Answers are cached for a day.
            session = LimitedSession(self.limiter, account=ACCOUNT_LOOKUPS, claimant="resolve")
            with self._client(api_key, session) as client:
                try:
                    return client.get_account_id()
                except PermissionDenied:
                    # The seed's key setup grants Lists and Profiles only; without
                    # accounts:read each key gets a budget of its own.
                    return own_budget

        return self.resolver.resolve(api_key, fetch)

    def client(self, api_key: str, claimant: str) -> tuple[KlaviyoClient, LimitedSession]:
        session = LimitedSession(self.limiter, account=self.account_of(api_key), claimant=claimant)
        return self._client(api_key, session), session

    def jobs(self, client: KlaviyoClient, session: LimitedSession) -> AccountJobs:
        """The account's bulk-job watcher, polling (when due) with this client."""
        return AccountJobs(self.watcher, session.account, client, poll_patience(session))

    def _client(self, api_key: str, session: LimitedSession) -> KlaviyoClient:
        return KlaviyoClient(
            api_key,
            self.settings.klaviyo_base_url,
            before_request=session.before_request,
            after_response=session.after_response,
            event_hooks={"response": [_count_answer]},
        )


def _count_answer(response: httpx.Response) -> None:
    """Every Klaviyo answer, 429s included, labelled with its endpoint template (never a URL
    with ids or filter values)."""
    endpoint = endpoint_for(response.request.method, response.request.url.path)
    metrics.count_klaviyo_answer(endpoint.value if endpoint else "other", response.status_code)
