"""Bulk import jobs watched together: one poll per Klaviyo account answers for all of them.

Klaviyo's ``GET /api/profile-bulk-import-jobs`` lists an account's jobs 100 a page and filters by
``status`` only (``any``/``equals``; not by id). So the watcher asks for the *unfinished* ones,
``filter=any(status,["queued","processing"])&page[size]=100``, and reads the absence of a job it
watches as "finished" (complete, cancelled, or gone). The batch that owns such a job then reads
it once (``GET …/{id}``: the final status and ``failed_count``) and its import errors, exactly as
before: the ledger still changes only on what Klaviyo confirmed about each finished job.

Coordination, all in Redis, per account:

``gate``
    ``SET NX PX``: whoever sets it polls, and nobody polls again until it expires. It holds
    ``polling`` during the poll (a lease of 5 s; waiters come back in a moment, not a whole
    interval later), then ``polled`` until the next poll is due (after a 429, until its
    Retry-After). A poller that dies leaves a lease that expires.
``watch``
    sorted set job id -> when it was registered (Redis server time, µs). A poll that *started*
    after a job was registered and did not list it proves the job left the unfinished states;
    a job registered during a poll waits for the next one.
``finished``
    hash of job ids the last polls found finished; the owning batch clears its jobs when it has
    settled them.

Budget: the gate lasts ``max(interval, pages * spacing)`` where ``spacing`` keeps the list
endpoint within ``POLL_SHARE`` of its steady (per-minute) budget however many pages a poll needs.
With Klaviyo's M tier (150/min) and ``POLL_SHARE`` 0.4 that is at most 60 list requests a minute
per account (one a second), whatever the number of jobs; each finished job then costs one
``GET …/{id}`` and its import-error pages, as before. Every request still goes through the
fleet-wide limiter, so a poll can be deferred (``Throttled``) but never exceeds a limit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import redis

from segops_sync.klaviyo import ENDPOINT_LIMITS, Endpoint, KlaviyoClient, RateLimited
from segops_sync.klaviyo.payloads import MAX_PAGE_SIZE

log = logging.getLogger(__name__)

UNFINISHED = ("queued", "processing")
# The share of the list endpoint's steady budget the watcher may take, per account.
POLL_SHARE = 0.4
# Keys of an idle account disappear after this long (seconds).
KEY_TTL = 86_400
# How long a poll may hold the gate before another process may take it (milliseconds).
POLL_LEASE_MS = 5_000
# How soon a waiter looks again while someone else's poll is under way (seconds).
POLL_IN_PROGRESS_WAIT = 0.05


@dataclass(frozen=True)
class JobsView:
    """What a batch learns about its jobs: which finished, and when to look again."""

    finished: list[str]
    running: list[str]
    wait: float  # seconds until the next poll's answer is expected (0 when nothing runs)
    polled: bool  # this call did the account's poll


class JobWatcher:
    """One per process; the state lives in Redis, so any worker's poll serves every batch."""

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        interval: float,
        time_scale: float = 1.0,
        prefix: str = "segops:jobs",
        share: float = POLL_SHARE,
    ) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError("interval must be a positive number of seconds")
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self._redis = redis_client
        self.interval = interval
        self.prefix = prefix
        limit = ENDPOINT_LIMITS[Endpoint.LIST_BULK_IMPORT_JOBS]
        # Seconds per page that keep polling within `share` of the steady budget.
        self.spacing = 60.0 / (share * limit.steady) / time_scale

    # -- keys ----------------------------------------------------------------------------

    def _key(self, account: str, kind: str) -> str:
        return f"{self.prefix}:{{{quote(account, safe='')}}}:{kind}"

    def _now_us(self) -> int:
        seconds, micros = self._redis.time()
        return int(seconds) * 1_000_000 + int(micros)

    # -- what batches call -----------------------------------------------------------------

    def register(self, account: str, job_ids: Iterable[str]) -> None:
        """A job was just submitted (Klaviyo answered 202): watch it from now on."""
        ids = list(job_ids)
        if not ids:
            return
        now = self._now_us()
        watch = self._key(account, "watch")
        pipe = self._redis.pipeline()
        pipe.zadd(watch, dict.fromkeys(ids, now), nx=True)
        pipe.expire(watch, KEY_TTL)
        pipe.execute()

    def still_running(self, account: str, job_id: str) -> None:
        """A job the poll took for finished is not (a page shifted under the poll): watch it
        again, as if submitted now."""
        pipe = self._redis.pipeline()
        pipe.hdel(self._key(account, "finished"), job_id)
        pipe.zadd(self._key(account, "watch"), {job_id: self._now_us()})
        pipe.execute()

    def remember_final(self, account: str, job_id: str, failed_count: int) -> None:
        """The owning batch read this finished job: complete, with ``failed_count`` failures.
        Kept until the batch settles it, so a batch deferred between the job's read and its
        import errors (a limiter wait when ten jobs finish in one poll) does not read it again."""
        self._redis.hset(self._key(account, "finished"), job_id, f"complete:{failed_count}")

    def final(self, account: str, job_id: str) -> int | None:
        """``failed_count`` of a finished job its batch already read as complete, else None."""
        value = self._redis.hget(self._key(account, "finished"), job_id)
        text = value.decode() if isinstance(value, bytes) else value
        if text is None or not text.startswith("complete:"):
            return None
        return int(text.split(":", 1)[1])

    def forget(self, account: str, job_ids: Iterable[str]) -> None:
        """The batch settled these jobs (or will resend their members)."""
        ids = list(job_ids)
        if not ids:
            return
        pipe = self._redis.pipeline()
        pipe.zrem(self._key(account, "watch"), *ids)
        pipe.hdel(self._key(account, "finished"), *ids)
        pipe.execute()

    def view(self, account: str, job_ids: Sequence[str], client: KlaviyoClient) -> JobsView:
        """Which of these jobs finished. Polls Klaviyo when the account's poll is due and no
        other process is at it; otherwise reads what the last poll wrote."""
        if not job_ids:
            return JobsView([], [], 0.0, polled=False)
        watch = self._key(account, "watch")
        known = self._redis.pipeline()
        for job_id in job_ids:
            known.zscore(watch, job_id)
        unknown = [j for j, score in zip(job_ids, known.execute(), strict=True) if score is None]
        finished_now = set(self._finished(account, job_ids))
        # Not watched and not finished: a batch resumed after a crash or a Redis restart.
        self.register(account, [j for j in unknown if j not in finished_now])

        polled = False
        gate = self._key(account, "gate")
        gate_ms = max(1, math.ceil(self.interval * 1000))
        # The lease covers the poll itself (a short interval must not let a second poller in
        # while the first still waits for its answer); a poller that dies frees it in 5 s.
        if not finished_now.issuperset(job_ids) and self._redis.set(
            gate, "polling", nx=True, px=max(gate_ms, POLL_LEASE_MS)
        ):
            polled = True
            try:
                pages = self._poll(account, client)
            except RateLimited as exc:
                # Nobody polls again before Klaviyo's Retry-After: the fleet-wide back-off only
                # starts once this batch has handled the 429, which another could beat.
                hold = exc.retry_after if exc.retry_after is not None else self.interval
                self._redis.set(gate, "polled", px=max(1, math.ceil(hold * 1000)))
                raise
            except BaseException:
                # Nobody learnt anything: let the next batch poll without waiting a full gate.
                self._redis.delete(gate)
                raise
            hold_ms = max(gate_ms, math.ceil(pages * self.spacing * 1000))
            self._redis.set(gate, "polled", px=hold_ms)
            finished_now = set(self._finished(account, job_ids))

        finished = [j for j in job_ids if j in finished_now]
        running = [j for j in job_ids if j not in finished_now]
        wait = 0.0
        if running:
            state, ttl_ms = self._gate_state(gate)
            # Come back just after the gate opens: the first one back polls for everyone.
            wait = POLL_IN_PROGRESS_WAIT if state == "polling" else max(ttl_ms, 0) / 1000 + 0.01
        return JobsView(finished, running, wait, polled)

    # -- the poll -------------------------------------------------------------------------

    def _poll(self, account: str, client: KlaviyoClient) -> int:
        """One poll of the account's unfinished jobs; returns the number of pages it read."""
        started = self._now_us()
        listed = [job.id for job in client.iter_bulk_import_jobs(UNFINISHED)]
        pages = max(1, math.ceil(len(listed) / MAX_PAGE_SIZE))
        watch = self._key(account, "watch")
        candidates = [
            j.decode() if isinstance(j, bytes) else str(j)
            for j in self._redis.zrangebyscore(watch, "-inf", f"({started}")
        ]
        still = set(listed)
        done = [j for j in candidates if j not in still]
        if done:
            finished = self._key(account, "finished")
            pipe = self._redis.pipeline()
            pipe.hset(finished, mapping=dict.fromkeys(done, "1"))
            pipe.expire(finished, KEY_TTL)
            pipe.zrem(watch, *done)
            pipe.execute()
        log.debug(
            "account %s: %d jobs unfinished, %d of ours finished", account, len(still), len(done)
        )
        return pages

    def _finished(self, account: str, job_ids: Sequence[str]) -> list[str]:
        values: list[Any] = self._redis.hmget(self._key(account, "finished"), list(job_ids))
        return [j for j, v in zip(job_ids, values, strict=True) if v is not None]

    def _gate_state(self, gate: str) -> tuple[str | None, int]:
        pipe = self._redis.pipeline()
        pipe.get(gate)
        pipe.pttl(gate)
        value, ttl = pipe.execute()
        state = value.decode() if isinstance(value, bytes) else value
        return state, int(ttl)


@dataclass(frozen=True)
class AccountJobs:
    """The watcher bound to one account and one client: what a batch holds."""

    watcher: JobWatcher
    account: str
    client: KlaviyoClient

    def register(self, job_ids: Iterable[str]) -> None:
        self.watcher.register(self.account, job_ids)

    def view(self, job_ids: Sequence[str]) -> JobsView:
        return self.watcher.view(self.account, job_ids, self.client)

    def still_running(self, job_id: str) -> None:
        self.watcher.still_running(self.account, job_id)

    def remember_final(self, job_id: str, failed_count: int) -> None:
        self.watcher.remember_final(self.account, job_id, failed_count)

    def final(self, job_id: str) -> int | None:
        return self.watcher.final(self.account, job_id)

    def forget(self, job_ids: Iterable[str]) -> None:
        self.watcher.forget(self.account, job_ids)
