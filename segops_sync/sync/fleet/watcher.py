"""Bulk import jobs watched together: one poll per Klaviyo account answers for all of them.

Klaviyo's ``GET /api/profile-bulk-import-jobs`` lists an account's jobs 100 a page, filters by
``status`` only (``any``/``equals``; not by id) and sorts by ``created_at``. So the watcher asks
for jobs in every state, newest first (``filter=any(status,[...])&sort=-created_at``), and
reads each job it watches off the list: a ``complete`` one with its ``failed_count``, which is
all its batch needs to settle it (and to skip the import errors when it is 0). Paging stops once
every watched job was seen or the list has gone past the oldest of them (``created_at`` as
Klaviyo answered it when the job was submitted), so a poll reads the jobs created since the
oldest one still watched: one page for a hundred jobs in flight, whatever the account's history.

A watched job the poll could not find and a cancelled one are marked finished without a final
count; the owning batch then reads it alone (``GET …/{id}``) and resends its members if Klaviyo
lost it. The ledger still changes only on what Klaviyo confirmed about each finished job.

A poll is one read: its pages wait in-process for the limiter (the caller's ``patient``, a
burst window), since a poll the limiter refused mid-way learnt nothing and starts again from
the newest page. It reads at most ``MAX_POLL_PAGES`` pages of jobs in every state. Without
either, a poll longer than a burst (10 pages) was refused at its eleventh page, every time:
after a Redis restart (jobs re-registered without their ``created_at``, so no place to stop)
with one job Klaviyo lost, a run waited for luck or forever (bench/HISTORY.md, 2026-12-08).
The poll keeps the ``created_at`` of each watched job it meets without one, so one poll after a
restart restores where paging stops. Jobs still not met after the last page lie deeper (more
than 3,000 jobs of the account are newer): the poll then lists the account's unfinished jobs
only (at most ``MAX_POLL_PAGES`` pages too); those met there still run and stay watched, the
others (finished, gone, overdue, or running past that listing's last page) are handed to their
batches like lost ones: a read of its own, which watches one still running again. While such a
deep job runs, every poll reads 30 pages or more, and the gate then holds it for as long as the
poll share asks (30 s and more): the account's batches hear of finished jobs that much later.
Pages are counted by request (Klaviyo may serve fewer than 100 jobs a page).

Coordination, all in Redis, per account:

``gate``
    ``SET NX PX``: whoever sets it polls, and nobody polls again until it expires. It holds
    ``polling:<token>:<pages asked for>`` during the poll (a lease of 5 s, renewed before each
    page's request; waiters come back in a moment, later the more pages the poll has read, not
    a whole interval later), then ``polled`` until the next poll is due (after a 429, until its
    Retry-After; after a page the limiter refused, until the slot it named). A poller that dies
    leaves a lease that expires; one that ends deletes or sets the gate unless another poll has
    taken it meanwhile.
``watch``
    sorted set job id -> when it was registered (Redis server time, µs). Only jobs registered
    before a poll *started* are looked for; a job registered during a poll waits for the next.
``created``
    hash job id -> Klaviyo's ``created_at`` (µs since the epoch), where the paging stops.
``finished``
    hash job id -> ``complete:<failed_count>``, or ``1`` for "finished, read it yourself"; the
    owning batch clears its jobs when it has settled them.

``took``
    how long the account's last finished jobs took, by Klaviyo's own ``created_at`` and
    ``completed_at`` (µs): when the newest watched job is expected to end.

Budget: the gate lasts ``max(interval, pages * spacing)`` where ``spacing`` keeps the list
endpoint within ``POLL_SHARE`` of its steady (per-minute) budget however many pages a poll needs.
With Klaviyo's M tier (150/min) and ``POLL_SHARE`` 0.4 that is at most 60 list requests a minute
per account (one a second), whatever the number of jobs; a finished job costs no request of its
own unless it reports failures (its import-error pages) or the poll could not find it. Every
request still goes through the fleet-wide limiter, so a poll can be deferred (``Throttled``) but
never exceeds a limit.

The run's end: when the newest watched job is expected to end before the interval is out (it
was registered ``took`` ago, less the time left), the next poll comes right after that instead,
though never sooner than ``EARLY_SHARE`` (0.6: 0.67 s apart) allows. On the fixed grid the last
job of a run was noticed up to a whole interval after it ended (0.5 s on average: a tenth of a
10,000-member sync). The gap only ever shortens, so a finished job is still noticed within one
interval, and polling never takes more than 60 % of the list endpoint's budget (40 % but for
the one early poll at the end of a run).
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import redis

from segops_sync.klaviyo import (
    ENDPOINT_LIMITS,
    UNFINISHED_JOB_STATES,
    Endpoint,
    JobStatus,
    KlaviyoClient,
    RateLimited,
)
from segops_sync.sync.fleet.clock import Clock
from segops_sync.sync.fleet.limiter import Throttled

log = logging.getLogger(__name__)

# Inside it, the client's requests wait in-process for the limiter (LimitedSession.patient).
Patience = Callable[[], contextlib.AbstractContextManager[None]]

# The poll lists jobs in every state: a watched job is read off the list whatever it became.
JOB_STATES = tuple(JobStatus)
# The share of the list endpoint's steady budget the watcher may take, per account.
POLL_SHARE = 0.4
# Keys of an idle account disappear after this long (seconds).
KEY_TTL = 86_400
# How long a poll may hold the gate before another process may take it (milliseconds).
POLL_LEASE_MS = 5_000
# How soon a waiter looks again while someone else's poll is under way (seconds), for each
# page that poll has read so far, and one.
POLL_IN_PROGRESS_WAIT = 0.05
# The share of that budget an early poll (at the newest job's expected end) may not exceed.
EARLY_SHARE = 0.6
# An early poll comes this long after the job's expected end (milliseconds).
EARLY_MARGIN_MS = 50
# The most pages one listing of a poll reads (100 jobs a page): 3,000 jobs, three times a 10M
# first sync's; a poll of two listings stays below the 135 a minute the limiter admits of the
# endpoint, 3 s each at its burst.
MAX_POLL_PAGES = 30
# Sets the gate to a new value (with a lease) or deletes it (no value), unless another poll
# holds it (its own value is ``polling:<token>:`` and the pages read). A gate whose lease lapsed
# with nobody taking it is taken back: the poll's hold still applies.
_OWN_GATE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


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
        give_up: float | None = None,
        clock: Clock | None = None,
        max_pages: int = MAX_POLL_PAGES,
    ) -> None:
        """``clock``: where the watcher reads the time; None (production) for Redis ``TIME``."""
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self.max_pages = max_pages
        self._own_gate = redis_client.register_script(_OWN_GATE)
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError("interval must be a positive number of seconds")
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self._redis = redis_client
        self._clock = clock
        self.interval = interval
        self.prefix = prefix
        # A job unfinished this long after Klaviyo created it is handed to its batch (seconds).
        self.give_up = give_up
        limit = ENDPOINT_LIMITS[Endpoint.LIST_BULK_IMPORT_JOBS]
        # Seconds per page that keep polling within `share` of the steady budget.
        self.spacing = 60.0 / (share * limit.steady) / time_scale
        self.early_spacing = 60.0 / (max(share, EARLY_SHARE) * limit.steady) / time_scale

    # -- keys ----------------------------------------------------------------------------

    def _key(self, account: str, kind: str) -> str:
        return f"{self.prefix}:{{{quote(account, safe='')}}}:{kind}"

    def _now_us(self) -> int:
        return self._clock() if self._clock is not None else _time_us(self._redis.time())

    # -- what batches call -----------------------------------------------------------------

    def register(
        self,
        account: str,
        job_ids: Iterable[str],
        created_at: Mapping[str, datetime | None] | None = None,
    ) -> None:
        """A job was just submitted (Klaviyo answered 202): watch it from now on. ``created_at``
        (as Klaviyo answered) lets a poll stop paging once it is past the job."""
        ids = list(job_ids)
        if not ids:
            return
        now = self._now_us()
        watch = self._key(account, "watch")
        created: dict[Any, Any] = {  # (redis-py's mapping types are invariant)
            j: _epoch_us(at) for j, at in (created_at or {}).items() if j in ids and at is not None
        }
        pipe = self._redis.pipeline()
        pipe.zadd(watch, dict.fromkeys(ids, now), nx=True)
        pipe.expire(watch, KEY_TTL)
        if created:
            pipe.hset(self._key(account, "created"), mapping=created)
            pipe.expire(self._key(account, "created"), KEY_TTL)
        pipe.execute()

    def still_running(self, account: str, job_id: str, created_at: datetime | None = None) -> None:
        """A job the poll took for finished is not (a page shifted under the poll, or it lay
        past the poll's last page): watch it again, as if submitted now. ``created_at``, as the
        batch's own read of the job answered, tells the next poll where to stop."""
        pipe = self._redis.pipeline()
        pipe.hdel(self._key(account, "finished"), job_id)
        pipe.zadd(self._key(account, "watch"), {job_id: self._now_us()})
        if created_at is not None:
            pipe.hset(self._key(account, "created"), job_id, _epoch_us(created_at))
            pipe.expire(self._key(account, "created"), KEY_TTL)
        pipe.execute()

    def remember_final(self, account: str, job_id: str, failed_count: int) -> None:
        """The owning batch read this finished job (one the poll could not find): complete, with
        ``failed_count`` failures. Kept until the batch settles it, so a batch deferred between
        the job's read and its import errors does not read it again."""
        self._redis.hset(self._key(account, "finished"), job_id, f"complete:{failed_count}")

    def final(self, account: str, job_id: str) -> int | None:
        """``failed_count`` of a finished job the poll (or its batch) saw complete, else None."""
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
        pipe.hdel(self._key(account, "created"), *ids)
        pipe.execute()

    def view(
        self,
        account: str,
        job_ids: Sequence[str],
        client: KlaviyoClient,
        patient: Patience | None = None,
    ) -> JobsView:
        """Which of these jobs finished. Polls Klaviyo when the account's poll is due and no
        other process is at it; otherwise reads what the last poll wrote. ``patient``: the
        poll's requests wait in-process for the client's limiter inside it."""
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
        mine = f"polling:{uuid.uuid4().hex}:"
        if not finished_now.issuperset(job_ids) and self._redis.set(
            gate, f"{mine}0", nx=True, px=max(gate_ms, POLL_LEASE_MS)
        ):
            polled = True

            def read_page(pages: int) -> None:
                """Renews the lease before each page's request (a poll may take seconds now)
                and tells waiters how far it got."""
                self._own_gate(keys=[gate], args=[mine, f"{mine}{pages}", POLL_LEASE_MS])

            try:
                with patient() if patient else contextlib.nullcontext():
                    pages = self._poll(account, client, read_page)
            except RateLimited as exc:
                # Nobody polls again before Klaviyo's Retry-After: the fleet-wide back-off only
                # starts once this batch has handled the 429, which another could beat.
                hold = exc.retry_after if exc.retry_after is not None else self.interval
                self._redis.set(gate, "polled", px=max(1, math.ceil(hold * 1000)))
                raise
            except Throttled as exc:
                # The limiter refused a page even after waiting: nobody polls before the slot
                # it names (polling at once would spend the same pages again).
                hold_ms = max(1, math.ceil(exc.wait * 1000))
                self._own_gate(keys=[gate], args=[mine, "polled", hold_ms])
                raise
            except BaseException:
                # Nobody learnt anything: let the next batch poll without waiting a full gate
                # (unless the lease lapsed and another poll is under way).
                self._own_gate(keys=[gate], args=[mine, "", 0])
                raise
            hold_ms = max(gate_ms, math.ceil(pages * self.spacing * 1000))
            due_ms = self._newest_due_ms(account)
            if due_ms is not None:
                early_ms = max(math.ceil(pages * self.early_spacing * 1000), due_ms)
                hold_ms = min(hold_ms, early_ms + EARLY_MARGIN_MS)
            # (A poll whose lease lapsed leaves the gate to the poll that took it.)
            self._own_gate(keys=[gate], args=[mine, "polled", hold_ms])
            finished_now = set(self._finished(account, job_ids))

        finished = [j for j in job_ids if j in finished_now]
        running = [j for j in job_ids if j not in finished_now]
        wait = 0.0
        if running:
            state, ttl_ms = self._gate_state(gate)
            if state is not None and state.startswith("polling:"):
                # A poll under way: back in a moment, later the longer it has been reading.
                count = state.rsplit(":", 1)[1]
                pages_read = int(count) if count.isdigit() else 0
                lease = max(ttl_ms / 1000, POLL_IN_PROGRESS_WAIT)
                wait = min(POLL_IN_PROGRESS_WAIT * (1 + pages_read), lease)
            else:  # just after the gate opens: the first one back polls for everyone
                wait = max(ttl_ms, 0) / 1000 + 0.01
        return JobsView(finished, running, wait, polled)

    # -- the poll -------------------------------------------------------------------------

    def _poll(self, account: str, client: KlaviyoClient, read_page: Callable[[int], None]) -> int:
        """One poll of the account's jobs, newest first; returns the number of pages it read.
        ``read_page`` is told the pages asked for so far, before each page's request."""
        started = self._now_us()
        watch = self._key(account, "watch")
        candidates = [
            j.decode() if isinstance(j, bytes) else str(j)
            for j in self._redis.zrangebyscore(watch, "-inf", f"({started}")
        ]
        if not candidates:
            return 0  # every watched job was registered after this poll began: none to find yet
        raw: list[Any] = self._redis.hmget(self._key(account, "created"), candidates)
        undated = {j for j, v in zip(candidates, raw, strict=True) if v is None}
        # Without every candidate's created_at, paging stops only when all are met (or at the
        # last page).
        oldest = None if undated else min(int(v) for v in raw)
        wanted = set(candidates)
        verdicts: dict[Any, Any] = {}  # job id -> what the batch learns (redis hash values)
        dated: dict[Any, Any] = {}  # job id -> created_at (µs) learnt off the list
        took: list[int] = []  # how long the jobs seen complete took, by Klaviyo's clock (µs)
        listed = 0
        pages = _Pages(self.max_pages, read_page)
        listing = client.iter_bulk_import_jobs(
            JOB_STATES, newest_first=True, before_page=pages.next_page
        )
        for job in listing:
            listed += 1
            if job.id in wanted:
                wanted.discard(job.id)
                if job.id in undated and job.created_at:
                    dated[job.id] = _epoch_us(job.created_at)
                if job.status == JobStatus.COMPLETE:
                    verdicts[job.id] = f"complete:{job.failed_count}"
                    if job.created_at and job.completed_at:
                        took.append(_epoch_us(job.completed_at) - _epoch_us(job.created_at))
                elif job.status not in UNFINISHED_JOB_STATES:
                    verdicts[job.id] = "1"  # cancelled: its batch reads it and resends
                elif self.give_up is not None and job_overdue(
                    job.created_at, self.give_up, started
                ):
                    verdicts[job.id] = "1"  # never finishing: its batch gives it up
                if not wanted:
                    break
            if oldest is not None and job.created_at and _epoch_us(job.created_at) < oldest:
                break  # older than every job we watch: the ones not met are gone
        if wanted and pages.ended_early:
            # Deeper than the last page: those still unfinished stay watched, the others are
            # read by their batches (finished, or gone).
            deep, unmet = len(wanted), set(wanted)
            unfinished = _Pages(self.max_pages, read_page, pages.read)
            listing = client.iter_bulk_import_jobs(
                UNFINISHED_JOB_STATES, newest_first=True, before_page=unfinished.next_page
            )
            for job in listing:
                if job.id in unmet:
                    unmet.discard(job.id)
                    if job.id in undated and job.created_at:
                        dated[job.id] = _epoch_us(job.created_at)
                    if self.give_up is None or not job_overdue(
                        job.created_at, self.give_up, started
                    ):
                        wanted.discard(job.id)  # still running: stays watched
                    if not unmet:
                        break
            log.info(
                "account %s: %d watched jobs older than the newest %d listed, %d of them "
                "still running",
                account,
                deep,
                listed,
                deep - len(wanted),
            )
            pages = unfinished
        # Not met on the way (gone, expired, lost; deeper and not found running, or overdue):
        # its batch's own read will say which.
        verdicts.update(dict.fromkeys(wanted, "1"))
        if took:  # the slowest of this poll's: an early poll too soon is a poll wasted
            self._redis.set(self._key(account, "took"), max(0, max(took)), ex=KEY_TTL)
        if dated:
            pipe = self._redis.pipeline()
            pipe.hset(self._key(account, "created"), mapping=dated)
            pipe.expire(self._key(account, "created"), KEY_TTL)
            pipe.execute()
        if verdicts:
            finished = self._key(account, "finished")
            pipe = self._redis.pipeline()
            pipe.hset(finished, mapping=verdicts)
            pipe.expire(finished, KEY_TTL)
            pipe.zrem(watch, *verdicts)
            pipe.execute()
        log.debug("account %s: %d jobs listed, %d of ours finished", account, listed, len(verdicts))
        return max(1, pages.read)

    def _newest_due_ms(self, account: str) -> int | None:
        """Milliseconds until the newest watched job is expected to end: None when nothing is
        watched, no job's duration is known yet, or it is already overdue (it took longer than
        the last ones: the interval's grid is as good a guess as any)."""
        pipe = self._redis.pipeline()
        pipe.zrange(self._key(account, "watch"), -1, -1, withscores=True)
        pipe.get(self._key(account, "took"))
        if self._clock is None:
            pipe.time()  # in the same round trip, not another one
        newest, took, *server_time = pipe.execute()
        if not newest or took is None:
            return None
        now = self._clock() if self._clock is not None else _time_us(server_time[0])
        due_us = float(newest[0][1]) + int(took) - now
        return math.ceil(due_us / 1000) if due_us >= 0 else None

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


class _Pages:
    """The pages of one listing of a poll: asked before each page's request (``next_page``),
    it counts them, tells ``read_page`` (which renews the poll's lease) and ends the listing
    after ``limit`` pages of its own."""

    def __init__(self, limit: int, read_page: Callable[[int], None], before: int = 0) -> None:
        self.limit = limit
        self.read_page = read_page
        self.read = before  # counting the pages an earlier listing of the same poll read
        self.own = 0
        self.ended_early = False  # stopped at the limit, with a next page to read

    def next_page(self) -> bool:
        if self.own == self.limit:
            self.ended_early = True
            return False
        self.own += 1
        self.read += 1
        self.read_page(self.read)
        return True


@dataclass(frozen=True)
class AccountJobs:
    """The watcher bound to one account and one client: what a batch holds."""

    watcher: JobWatcher
    account: str
    client: KlaviyoClient
    patient: Patience | None = None  # the client's limiter told to wait in-process

    def register(
        self, job_ids: Iterable[str], created_at: Mapping[str, datetime | None] | None = None
    ) -> None:
        self.watcher.register(self.account, job_ids, created_at)

    def view(self, job_ids: Sequence[str]) -> JobsView:
        return self.watcher.view(self.account, job_ids, self.client, self.patient)

    def still_running(self, job_id: str, created_at: datetime | None = None) -> None:
        self.watcher.still_running(self.account, job_id, created_at)

    def remember_final(self, job_id: str, failed_count: int) -> None:
        self.watcher.remember_final(self.account, job_id, failed_count)

    def final(self, job_id: str) -> int | None:
        return self.watcher.final(self.account, job_id)

    def forget(self, job_ids: Iterable[str]) -> None:
        self.watcher.forget(self.account, job_ids)


def job_overdue(created_at: datetime | None, give_up: float, now_us: int) -> bool:
    """A job still unfinished ``give_up`` seconds after Klaviyo created it is taken as lost
    (``SEGOPS_JOB_GIVE_UP``): its batch sends its members again rather than wait forever."""
    return created_at is not None and now_us - _epoch_us(created_at) > give_up * 1_000_000


def _time_us(reply: tuple[Any, Any]) -> int:
    """Redis ``TIME`` (seconds, microseconds) as microseconds."""
    seconds, micros = reply
    return int(seconds) * 1_000_000 + int(micros)


def _epoch_us(at: datetime) -> int:
    """Microseconds since the epoch; a time without a zone is taken as UTC (Klaviyo's)."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return round(aware.timestamp() * 1_000_000)
