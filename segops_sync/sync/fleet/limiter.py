"""Fleet-wide Klaviyo rate limiter, shared by every worker process through Redis.

Klaviyo limits each ACCOUNT per ENDPOINT with two fixed windows at once: *burst* (per 1 s) and
*steady* (per 60 s). Every private key of an account draws from the same budget, so the limiter
is keyed by the account id (see :class:`AccountResolver`), never by the API key.

Algorithm: sliding-window log
    Each (account, endpoint) has one sorted set of granted requests, scored by the Redis server
    time in microseconds (``TIME`` inside the script, so client clock skew does not matter;
    tests pass a ``clock`` of their own, which the script then takes as an argument).
    ``acquire()`` is ONE Lua script: it prunes entries older than the steady window, counts the
    entries younger than 1 s (``ZCOUNT``) and younger than 60 s (``ZCARD``), and admits the
    request only if BOTH counts are below their caps and no back-off is active. Admission adds
    one entry; refusal adds nothing and returns how long until the blocking entry leaves its
    window. The check runs at every grant instant: the last grant inside any window [a, a + W)
    saw all the others in its own (t - W, t], so no window of 1 s (or 60 s), wherever it starts,
    ever holds more than the cap, and Klaviyo's fixed windows cannot either, whatever their
    phase. (A GCRA with a 60 s tolerance would admit almost twice the steady cap in some
    sliding minute; a log is exact and costs at most ``steady`` small entries per key.)

Two windows
    One log serves both windows: the 1 s count is a range count over the same set. A request
    needs room in both; the wait returned is the later of the two moments room appears.

Margins: the steady window in count, the burst window in time
    The steady window keeps ``floor(headroom * published)`` (at least 1), 90 % by default: over
    a minute the account's other integrations draw on the same budget, and a long sync should
    leave them room. The burst window keeps the whole published count, but over a window
    ``1 + burst_guard`` times Klaviyo's (1.05 s by default): no ``burst`` grants fall within
    1.05 s of each other, so Klaviyo's 1 s windows, whatever their phase, cannot count more
    than ``burst`` unless arrivals jitter by more than 50 ms against the grants. Until
    2026-12 the burst kept 90 % of its count too; on Klaviyo's M tier (10/s) that margin was
    one request a second, and it cost a 1M first sync its opening burst and a second of its
    100 submissions (costs.py's floor sends ten at t = 0, then ten a second).

Pace
    With ``even=True`` grants are also at least half a published interval apart (0.05 s on a
    10/s endpoint, fleet-wide). The log alone admits a whole burst at one instant; its slots
    then free at one instant a window later and the fleet takes them together again, so ten
    5 MB job bodies would reach Klaviyo's edge at once, every second, and queue there: the
    queueing is arrival jitter, which the guard must absorb. Half the interval spreads a burst
    over half its window and keeps the other half of it: the first ten submissions still go
    within 0.45 s, not over the whole second. ``LimitedSession`` paces the endpoints whose
    burst is small (Klaviyo's M tier and below).

Fairness
    ``claimant`` (e.g. a connector id) names who asks. Claimants that asked recently are kept in a
    sorted set with an "active until" time: ``now + a few seconds`` on every ask, and, when
    refused, ``now + wait + a few seconds`` so a claimant that is waiting on us still counts.
    With ``n`` active claimants nobody may hold more than ``ceil(cap / n)`` of either window (a
    per-claimant log answers that), so a huge sync cannot starve a small one. A lone claimant gets
    the whole budget; ``claimant=None`` is one shared anonymous claimant. A claimant refused for
    exceeding its share is told to come back when its own entries leave the window or when
    another claimant goes idle, whichever is first, since either may let it in. "A few seconds"
    is ``ACTIVE_SECONDS`` (5 s), divided by ``time_scale`` like the windows.

Back-off from Klaviyo's answers
    ``penalize()`` (after a 429 with ``Retry-After``) and ``observe_remaining()`` (when
    ``RateLimit-Remaining`` is almost zero; Klaviyo counts traffic our log cannot see) store a
    "blocked until" server time that every ``acquire()`` on every process honours. They only ever
    extend it. "Almost zero" is at most 2 % of the published steady limit (at least 1); a missing
    reset counts as one steady window. Those durations are taken as reported (real seconds); ``time_scale`` compresses
    only our own windows, exactly as the Klaviyo simulator compresses its windows.

After a 429: one probe first
    When a ``penalize()`` back-off ends, every task that waited on it would come back at about
    the same moment, and any that went out together with a request that met a fresh 429 would
    reach Klaviyo before that 429's Retry-After. So the first request admitted after a 429
    back-off is a probe: until an answer other than 429 comes back (``observe_remaining()`` is
    called with every such answer) or ``PROBE_SECONDS`` pass, nobody else is admitted. A probe
    that meets a 429 is penalized like any other request, and the next probe waits for that.

Celery
    Celery's ``rate_limit`` is a per-worker-instance token bucket per task name: it stays as a
    local ceiling (protects one worker from spinning) but knows nothing of accounts or of other
    workers. This limiter is the fleet-wide one. Call ``acquire()`` right before each HTTP
    request; when it returns a wait, re-queue instead of sleeping::

        wait = limiter.acquire(account, endpoint, limit, claimant=connector_id)
        if wait > 0:
            raise self.retry(countdown=wait + random.uniform(0, 1))

    Each such deferral counts against the task's ``max_retries``: set it high (or ``None``) and
    keep the real error budget elsewhere. After a 429, call ``penalize()`` before retrying.
    One exception: a request that is costly to prepare (a bulk job's 5 MB body) asks first with
    ``acquire(peek=True)``, is prepared only when its slot is about a second away, and then waits
    in-process for it (``LimitedSession.patient``): re-queued, it would be prepared again.
    And a paced request (``even``) sleeps out a wait as short as the pace's gap: that wait is
    the pace itself, and a re-queue costs more than it.

Storage
    Keys are ``{prefix}:{<account>|<endpoint>}:<kind>`` (components percent-encoded; the braces
    are a Redis Cluster hash tag, so one script only touches one slot): ``log`` (all grants),
    ``c:<claimant>`` (that claimant's grants), ``active`` (claimants), ``ctl`` (hash: back-off,
    published steady, sequence). Every write re-arms a ``PEXPIRE`` so idle accounts leave nothing.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import NamedTuple, cast
from urllib.parse import quote

import redis

from segops_sync.config import DEFAULT_HEADROOM
from segops_sync.klaviyo import RateLimit
from segops_sync.klaviyo.redact import fingerprint
from segops_sync.sync.fleet.clock import Clock

__all__ = ["AccountLimiter", "AccountResolver", "spread", "steady_cap"]


def steady_cap(limit: RateLimit, headroom: float) -> int:
    """Requests the steady window admits: the headroom share of the published steady limit, at
    least 1 (Margins)."""
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
    return max(1, math.floor(headroom * limit.steady + 1e-9))


def spread(wait: float, *, cap: float) -> float:
    """A random 5-25 % of ``wait`` (of ``cap`` at most), to add to it: requests refused together
    then do not come back together, and grants packed exactly one window apart do not reach
    Klaviyo's fixed windows with only the network's jitter between them."""
    return random.uniform(0.05, 0.25) * min(wait, cap)


class _Keys(NamedTuple):
    log: str
    active: str
    ctl: str
    claimant_base: str


# Shared Lua helpers. Numbers are formatted with %.17g because Lua 5.1's default tostring keeps
# only 14 digits, which would corrupt microsecond timestamps (16 digits).
# ARGV[1] of every script is the time in microseconds, or '' (production) for the server's TIME,
# read here in the same call: an injected clock adds no round trip, and its absence none either.
_LUA_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function num(x) return string.format('%.17g', x) end
local function after(x) return '(' .. num(x) end
local function ms(us) return math.ceil(us / 1000) end
"""

# KEYS: 1 log, 2 claimant log, 3 active claimants, 4 control hash
# ARGV: 1 now (see the prelude), 2 burst cap, 3 steady cap, 4 burst window (us),
#       5 steady window (us), 6 activity grace (us), 7 claimant, 8 published steady limit,
#       9 probe hold (us), 10 '1' to peek: answer as for a request, but take no slot (and no
#       probe), 11 least gap between two grants (us; 0: none)
# Returns 0 when granted (or, peeking, when a request would be), else the wait in microseconds
# (>= 1).
_ACQUIRE_LUA = (
    _LUA_PRELUDE
    + """
local cap1, cap60 = tonumber(ARGV[2]), tonumber(ARGV[3])
local w1, w60, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local me = ARGV[7]
local log, mine, active, ctl = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

-- Time until the k-th oldest entry of key newer than lo leaves its window of length w.
local function leaves(key, lo, k, w)
  local r = redis.call('ZRANGEBYSCORE', key, after(lo), '+inf',
                       'WITHSCORES', 'LIMIT', num(k - 1), 1)
  return tonumber(r[2]) + w - now
end

redis.call('ZREMRANGEBYSCORE', log, '-inf', num(now - w60))
redis.call('ZREMRANGEBYSCORE', mine, '-inf', num(now - w60))
redis.call('ZREMRANGEBYSCORE', active, '-inf', num(now))

local wait = 0
local blocked = tonumber(redis.call('HGET', ctl, 'until') or '0')
if blocked > now then wait = blocked - now end

local g1 = redis.call('ZCOUNT', log, after(now - w1), '+inf')
local g60 = redis.call('ZCARD', log)
if g1 >= cap1 then wait = math.max(wait, leaves(log, now - w1, g1 - cap1 + 1, w1)) end
if g60 >= cap60 then wait = math.max(wait, leaves(log, now - w60, g60 - cap60 + 1, w60)) end
local gap = tonumber(ARGV[11])
if gap > 0 then
  local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  if newest[2] then wait = math.max(wait, tonumber(newest[2]) + gap - now) end
end

local held = tonumber(redis.call('ZSCORE', active, me) or '0')
if held < now + grace then
  held = now + grace
  redis.call('ZADD', active, num(held), me)
end
local n = redis.call('ZCARD', active)
if n > 1 then
  local s1, s60 = math.ceil(cap1 / n), math.ceil(cap60 / n)
  local c1 = redis.call('ZCOUNT', mine, after(now - w1), '+inf')
  local c60 = redis.call('ZCARD', mine)
  local fair = 0
  if c1 >= s1 then fair = leaves(mine, now - w1, c1 - s1 + 1, w1) end
  if c60 >= s60 then fair = math.max(fair, leaves(mine, now - w60, c60 - s60 + 1, w60)) end
  if fair > 0 then
    -- The share grows as soon as another claimant goes idle: re-check no later than that.
    local first = redis.call('ZRANGE', active, 0, 1, 'WITHSCORES')
    local i = 1
    if first[1] == me then i = 3 end
    if first[i + 1] then fair = math.min(fair, tonumber(first[i + 1]) - now) end
    wait = math.max(wait, fair)
  end
end

-- After a 429 back-off, one probe goes first; the others wait for its answer.
local probe = false
if wait == 0 then
  local holder = tonumber(redis.call('HGET', ctl, 'probe') or '-1')
  if holder > now then wait = holder - now elseif holder >= 0 then probe = true end
end

redis.call('HSET', ctl, 'steady', ARGV[8])
redis.call('PEXPIRE', ctl, num(math.max(ms(w60), ms(blocked - now)) + 1))

if wait > 0 then
  -- A waiting claimant stays active, or a hammering one would grab everything meanwhile.
  if now + wait + grace > held then redis.call('ZADD', active, num(now + wait + grace), me) end
  local last = redis.call('ZRANGE', active, -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', active, num(ms(tonumber(last[2]) - now) + 1))
  return math.max(1, math.ceil(wait))
end

local last = redis.call('ZRANGE', active, -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', active, num(ms(tonumber(last[2]) - now) + 1))
if ARGV[10] == '1' then return 0 end
if probe then redis.call('HSET', ctl, 'probe', num(now + tonumber(ARGV[9]))) end
local member = num(now) .. '-' .. redis.call('HINCRBY', ctl, 'seq', 1)
redis.call('ZADD', log, num(now), member)
redis.call('ZADD', mine, num(now), member)
redis.call('PEXPIRE', log, num(ms(w60) + 1))
redis.call('PEXPIRE', mine, num(ms(w60) + 1))
return 0
"""
)

# KEYS: 1 control hash. ARGV: 1 now (see the prelude), 2 seconds to block, 3 remaining ('' = a
# 429: block unconditionally, then probe; '-' = an answer without a remaining count), 4 threshold
# as a share of the published steady limit. Returns 1 if the back-off was extended.
_BLOCK_LUA = (
    _LUA_PRELUDE
    + """
local ctl = KEYS[1]
if ARGV[3] == '' then
  redis.call('HSET', ctl, 'probe', '0')
else
  -- Klaviyo answered with something other than 429: the probe, if any, has done its job.
  redis.call('HDEL', ctl, 'probe')
  if ARGV[3] == '-' then return 0 end
  local steady = tonumber(redis.call('HGET', ctl, 'steady') or '0')
  local threshold = math.max(1, math.floor(steady * tonumber(ARGV[4])))
  if tonumber(ARGV[3]) > threshold then return 0 end
end
local untl = now + tonumber(ARGV[2]) * 1000000
local cur = tonumber(redis.call('HGET', ctl, 'until') or '0')
local extended = 0
if untl > cur then
  redis.call('HSET', ctl, 'until', num(untl))
  cur, extended = untl, 1
end
local ttl = ms(cur - now) + 1
-- After a 429 the probe state outlives the back-off: the first request after it is the probe.
if ARGV[3] == '' then ttl = ttl + 60000 end
if redis.call('PTTL', ctl) < ttl then redis.call('PEXPIRE', ctl, num(ttl)) end
return extended
"""
)

# KEYS: 1 log. ARGV: 1 now (see the prelude), 2 burst window (us), 3 steady window (us).
_USAGE_LUA = (
    _LUA_PRELUDE
    + """
return {
  redis.call('ZCOUNT', KEYS[1], after(now - tonumber(ARGV[2])), '+inf'),
  redis.call('ZCOUNT', KEYS[1], after(now - tonumber(ARGV[3])), '+inf'),
}
"""
)


class Throttled(Exception):
    """No rate-limit slot is free: try again after ``wait`` seconds. Not an error. (Raised by
    ``access.LimitedSession``, which most callers import it from.)"""

    def __init__(self, wait: float, endpoint: str) -> None:
        super().__init__(f"throttled on {endpoint} for {wait:.2f}s")
        self.wait = wait
        self.endpoint = endpoint


class AccountLimiter:
    """Distributed per-(account, endpoint) limiter over Klaviyo's burst and steady windows."""

    # A claimant counts as active this long after its last ask (scaled by time_scale).
    ACTIVE_SECONDS = 5.0
    # RateLimit-Remaining at or below this share of the steady limit (at least 1) means "stop".
    REMAINING_SHARE = 0.02
    # After a 429 back-off, the probe holds the others this long at most (real seconds: it waits
    # for one answer, which time_scale does not compress).
    PROBE_SECONDS = 1.0
    _ANONYMOUS = "(anonymous)"

    def __init__(
        self,
        redis: redis.Redis,
        *,
        headroom: float = DEFAULT_HEADROOM,
        burst_guard: float = 0.05,
        time_scale: float = 1.0,
        prefix: str = "segops:rl",
        clock: Clock | None = None,
    ) -> None:
        """``clock``: where the scripts read the time; None (production) for Redis ``TIME``."""
        if not (0.0 < headroom <= 1.0):
            raise ValueError(f"headroom must be in (0, 1], got {headroom!r}")
        if not (0.0 <= burst_guard <= 1.0):
            raise ValueError(f"burst_guard must be in [0, 1], got {burst_guard!r}")
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a positive finite number, got {time_scale!r}")
        self._redis = redis
        self._clock = clock
        self.headroom = headroom
        self.burst_guard = burst_guard
        self.time_scale = time_scale
        self.prefix = prefix
        self.burst_window = 1.0 / time_scale
        self.steady_window = 60.0 / time_scale
        self._w1_us = 1_000_000.0 / time_scale
        # The burst log's window: Klaviyo's, stretched by the guard (Margins).
        self._w1_guarded_us = self._w1_us * (1.0 + burst_guard)
        # The burst window as the log keeps it (seconds): the longest a slot within the
        # minute's budget can take to free.
        self.guarded_burst_window = self._w1_guarded_us / 1_000_000
        self._w60_us = 60_000_000.0 / time_scale
        self._grace_us = self.ACTIVE_SECONDS * 1_000_000.0 / time_scale
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._block = redis.register_script(_BLOCK_LUA)
        self._usage = redis.register_script(_USAGE_LUA)

    def caps(self, limit: RateLimit) -> tuple[int, int]:
        """The (burst, steady) numbers this limiter admits: the whole burst (over the guarded
        window) and the headroom share of the steady limit, at least 1 (Margins)."""
        return limit.burst, steady_cap(limit, self.headroom)

    def acquire(
        self,
        account: str,
        endpoint: str,
        limit: RateLimit,
        *,
        claimant: str | None = None,
        peek: bool = False,
        even: bool = False,
    ) -> float:
        """Take one slot and return 0.0, or take nothing and return seconds to wait (> 0).

        ``peek``: take nothing either way; 0.0 says a request now would be admitted. For work
        that is costly to prepare and worthless if refused (a 5 MB job body): a peek that
        waits marks the claimant active, as a refusal does, and the request itself still calls
        ``acquire()`` (another process may have taken the slot meanwhile).

        ``even``: grants at least half a published interval apart, fleet-wide (see Pace)."""
        keys = self._keys(account, endpoint)
        who = self._ANONYMOUS if claimant is None else claimant
        cap1, cap60 = self.caps(limit)
        wait_us = self._acquire(
            keys=[keys.log, keys.claimant_base + quote(who, safe=""), keys.active, keys.ctl],
            args=[
                self._now_arg(),
                cap1,
                cap60,
                repr(self._w1_guarded_us),
                repr(self._w60_us),
                repr(self._grace_us),
                who,
                limit.steady,
                repr(self.PROBE_SECONDS * 1_000_000.0),
                "1" if peek else "0",
                repr(self._w1_us / (2 * cap1)) if even else "0",
            ],
        )
        return int(wait_us) / 1_000_000

    def penalize(self, account: str, endpoint: str, retry_after: float) -> None:
        """Make every acquire() for (account, endpoint), fleet-wide, wait until now+retry_after."""
        if math.isnan(retry_after) or math.isinf(retry_after):
            raise ValueError(f"retry_after must be finite, got {retry_after!r}")
        if retry_after <= 0:
            return
        self._block(
            keys=[self._keys(account, endpoint).ctl],
            args=[self._now_arg(), repr(float(retry_after)), ""],
        )

    def observe_remaining(
        self, account: str, endpoint: str, remaining: int | None, reset: float | None
    ) -> None:
        """Klaviyo answered (not with a 429): ends the probe after a 429 back-off, and backs off
        until the steady window resets when Klaviyo says the budget is nearly gone."""
        if reset is None or not math.isfinite(reset):
            # No reset given: Klaviyo's fixed steady window turns over within one window length.
            reset = self.steady_window
        known = remaining is not None and reset > 0
        self._block(
            keys=[self._keys(account, endpoint).ctl],
            args=[
                self._now_arg(),
                repr(float(max(reset, 0.0))),
                int(remaining) if known and remaining is not None else "-",
                repr(self.REMAINING_SHARE),
            ],
        )

    def usage(self, account: str, endpoint: str) -> tuple[int, int]:
        """Requests granted in the current sliding burst (guarded) and steady windows."""
        n1, n60 = self._usage(
            keys=[self._keys(account, endpoint).log],
            args=[self._now_arg(), repr(self._w1_guarded_us), repr(self._w60_us)],
        )
        return int(n1), int(n60)

    def grants(self, account: str, endpoint: str) -> list[float]:
        """Server times (seconds) of the grants still in the steady window, oldest first: what
        the limiter admitted, as opposed to when the requests reached Klaviyo."""
        log = self._keys(account, endpoint).log
        entries = cast(list[tuple[bytes, float]], self._redis.zrange(log, 0, -1, withscores=True))
        return [score / 1e6 for _, score in entries]

    def _now_arg(self) -> int | str:
        """The scripts' ARGV[1]: the clock's time, or '' for the server's TIME."""
        return "" if self._clock is None else self._clock()

    def _keys(self, account: str, endpoint: str) -> _Keys:
        if not account or not endpoint:
            raise ValueError("account and endpoint must be non-empty")
        # Percent-encoding keeps '|', '{' and '}' out of the hash tag, so keys cannot collide.
        base = f"{self.prefix}:{{{quote(account, safe='')}|{quote(endpoint, safe='')}}}:"
        return _Keys(
            log=base + "log", active=base + "active", ctl=base + "ctl", claimant_base=base + "c:"
        )


class AccountResolver:
    """Learn the Klaviyo account behind an API key once, cache it in Redis, so all keys of one
    account share one budget.

    The cache key is an HMAC-SHA256 fingerprint of the API key; the key itself is never stored
    in Redis, logged, or put in an exception message.
    """

    # How long one process's fetch holds the others back, and how often they look meanwhile.
    FETCH_LEASE_SECONDS = 10.0
    FETCH_WAIT_SECONDS = 0.05

    def __init__(
        self, redis: redis.Redis, *, prefix: str = "segops:acct", ttl_seconds: int = 86400
    ) -> None:
        if ttl_seconds < 1:
            raise ValueError("ttl_seconds must be >= 1")
        self._redis = redis
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds

    def resolve(self, api_key: str, fetch: Callable[[], str]) -> str:
        """Return the account id for api_key, calling fetch() (GET /api/accounts) only on a miss.

        Single flight: when several processes miss together (a connector's first batches start
        side by side), one fetches under a short Redis lease and the others wait for its answer
        (``FETCH_LEASE_SECONDS`` at most, then fetch themselves), so a key costs one call to the
        fleet-wide accounts budget, not one per process. A fetch that fails frees the lease."""
        if not api_key:
            raise ValueError("api_key must be non-empty")
        cache_key = f"{self.prefix}:{fingerprint(api_key)}"
        lease = cache_key + ":fetching"
        deadline = time.monotonic() + self.FETCH_LEASE_SECONDS
        while True:
            cached = self._redis.get(cache_key)
            if cached is not None:
                return cached.decode() if isinstance(cached, bytes) else str(cached)
            mine = bool(
                self._redis.set(lease, "1", nx=True, px=int(self.FETCH_LEASE_SECONDS * 1000))
            )
            if mine:
                # The last holder may have cached the answer and freed the lease between our
                # read and our SET: look again, or the key costs a second lookup.
                cached = self._redis.get(cache_key)
                if cached is not None:
                    self._redis.delete(lease)
                    return cached.decode() if isinstance(cached, bytes) else str(cached)
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(self.FETCH_WAIT_SECONDS)
        try:
            account = fetch()
            if not isinstance(account, str) or not account:
                raise ValueError("fetch() must return a non-empty account id")
            self._redis.set(cache_key, account, ex=self.ttl_seconds)
        finally:
            if mine:
                self._redis.delete(lease)
        return account
