"""What a sync costs at Klaviyo, from the tier table and the batch limits alone.

Used three ways: the planner's cut-over between the synchronous and the bulk path, the
benchmark's *floor* (the shortest time Klaviyo's published limits allow for the same work), and
the integration test that counts requests per endpoint against :func:`expected_requests`.

Klaviyo's limits are fixed windows per account and endpoint: at most ``burst`` requests in a
1 s window and ``steady`` in a 60 s window. At 100 % of the published limit, starting at t = 0,
request ``k`` (0-based) can go at ``(k // steady) * 60 + (k % steady) // burst`` seconds: the
burst window lets ``burst`` requests through each second until the minute's ``steady`` are
spent, then the next minute starts. Requests are taken as instantaneous, and so is our own work
(planning, the database): the floor is a bound nobody can beat, not an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from segops_sync.config import DEFAULT_HEADROOM, Settings
from segops_sync.klaviyo import ENDPOINT_LIMITS, Endpoint, RateLimit
from segops_sync.klaviyo.payloads import (
    MAX_FILTER_VALUES,
    MAX_IDS_PER_RELATIONSHIP_CALL,
    MAX_PROFILES_PER_JOB,
)
from segops_sync.sync.fleet.limiter import steady_cap

# -- the synchronous path's cut-over ---------------------------------------------------------
#
# A small delta's adds skip the bulk job: one POST /api/profile-import per member (L tier:
# 75/s, 750/min), then POST /api/lists/{id}/relationships/profiles with the ids (M tier).
#  * Cost in the steady window: n of profile-import's 750/min. We allow at most half of what our
#    limiter admits (headroom 0.9: 675/min), so two connectors of one account can each send a
#    small change in the same minute: n <= 675 // 2 = 337.
#  * Time: n upserts at the admitted burst (75 per 1.05 s) take n / 71 s; 337 take 4.7 s. A
#    bulk job takes at least one submission, Klaviyo's job time (5 s at the very best, minutes
#    under load) and a poll (1 s): the synchronous path is never slower below the cut-over.
#  * Requests: n + ceil(n / DIRECT_BATCH_SIZE) instead of 3 (+ polls), all on budgets the bulk
#    path does not use (profile-import) or uses lightly (relationships).
DIRECT_BATCH_SIZE = 100  # members per synchronous batch: a few batches run side by side


def admitted_steady(endpoint: Endpoint, headroom: float = DEFAULT_HEADROOM) -> int:
    """Requests of an endpoint our limiter admits in any 60 s: its headroom share of the
    published steady limit, at least 1 (as ``AccountLimiter.caps``)."""
    return steady_cap(ENDPOINT_LIMITS[endpoint], headroom)


def direct_add_limit(headroom: float = DEFAULT_HEADROOM) -> int:
    """The largest number of adds that takes the synchronous path (337 at headroom 0.9)."""
    return max(1, admitted_steady(Endpoint.PROFILE_IMPORT, headroom) // 2)


def add_cutover(settings: Settings | None = None) -> int:
    """The cut-over in force: SEGOPS_DIRECT_ADD_LIMIT when set (0 = always bulk), else the
    arithmetic above for the configured headroom."""
    if settings is None:
        return direct_add_limit()
    if settings.direct_add_limit is not None:
        return settings.direct_add_limit
    return direct_add_limit(settings.limiter_headroom)


def goes_direct(adds: int, settings: Settings | None = None) -> bool:
    return 0 < adds <= add_cutover(settings)


# -- which half of a run goes first ----------------------------------------------------------
#
# A removal batch (1,000 members) looks up at most 10 pages of 100 (GET /api/profiles for
# external_ids, GET /api/lists/{id}/profiles for emails: both L tier), none for known ids.
# When a run's lookups exceed what the limiter admits in one minute, its removals last over a
# minute and are its critical path: its adds (a job per 10,000) have slack. Worse, the lookups of
# the first minute are the budget of the second as they leave the limiter's sliding window, so
# adds competing for the CPUs early slow the removals' tail a minute later. Otherwise a job
# (Klaviyo's own time) is the longer path and adds and removals alternate.
LOOKUPS_PER_REMOVE_BATCH = MAX_IDS_PER_RELATIONSHIP_CALL // MAX_FILTER_VALUES


def removals_first(remove_batches: int, headroom: float = DEFAULT_HEADROOM) -> bool:
    """Whether a run's removal batches are queued before its adds (see above)."""
    lookups = remove_batches * LOOKUPS_PER_REMOVE_BATCH
    return lookups > admitted_steady(Endpoint.GET_PROFILES, headroom)


# -- request counts --------------------------------------------------------------------------

RemovalKey = Literal["id", "external_id", "email"]


@dataclass(frozen=True)
class Delta:
    """The work of one run, counted the way the planner cuts it."""

    adds: int
    removes: int = 0
    # Removals whose profile id the ledger lacks: external_ids are looked up account-wide
    # (GET /api/profiles), emails on the list itself (GET /api/lists/{id}/profiles).
    lookup_calls: int = 0
    list_lookup_calls: int = 0

    @classmethod
    def of(cls, adds: int, removals: Sequence[tuple[str, RemovalKey]]) -> Delta:
        """From the removed members as (user_id, what identifies them): the planner sorts them by
        user_id and cuts batches of 1,000; each batch looks up its external_ids, then its emails,
        100 values a call (one page each). A member whose id is known ("id") costs no lookup."""
        ordered = sorted(removals)
        calls = list_calls = 0
        for start in range(0, len(ordered), MAX_IDS_PER_RELATIONSHIP_CALL):
            batch = ordered[start : start + MAX_IDS_PER_RELATIONSHIP_CALL]
            calls += math.ceil(sum(1 for _, k in batch if k == "external_id") / MAX_FILTER_VALUES)
            list_calls += math.ceil(sum(1 for _, k in batch if k == "email") / MAX_FILTER_VALUES)
        return cls(adds, len(ordered), calls, list_calls)


@dataclass
class Requests:
    by_endpoint: dict[Endpoint, int] = field(default_factory=dict)

    def add(self, endpoint: Endpoint, n: int) -> None:
        if n:
            self.by_endpoint[endpoint] = self.by_endpoint.get(endpoint, 0) + n


def expected_requests(
    delta: Delta,
    *,
    direct: bool | None = None,
    import_error_pages: int = 0,
) -> Requests:
    """Requests a run needs per endpoint, job polls excluded (they depend on time).

    A finished job is not read on its own: the watcher's poll lists it with its
    ``failed_count``. ``import_error_pages`` is per job (0 when no member fails: a job Klaviyo
    reports without failures is not asked for its import errors).
    """
    out = Requests()
    if direct is None:
        direct = goes_direct(delta.adds)
    if delta.adds and direct:
        out.add(Endpoint.PROFILE_IMPORT, delta.adds)
        out.add(Endpoint.ADD_LIST_PROFILES, math.ceil(delta.adds / DIRECT_BATCH_SIZE))
    elif delta.adds:
        jobs = math.ceil(delta.adds / MAX_PROFILES_PER_JOB)
        out.add(Endpoint.CREATE_BULK_IMPORT_JOB, jobs)
        out.add(Endpoint.GET_BULK_IMPORT_ERRORS, jobs * import_error_pages)
    if delta.removes:
        out.add(
            Endpoint.REMOVE_LIST_PROFILES, math.ceil(delta.removes / MAX_IDS_PER_RELATIONSHIP_CALL)
        )
        out.add(Endpoint.GET_PROFILES, delta.lookup_calls)
        out.add(Endpoint.GET_LIST_MEMBERS, delta.list_lookup_calls)
    return out


# -- the floor -------------------------------------------------------------------------------


def request_time(k: int, limit: RateLimit) -> float:
    """When request k (0-based) can go at 100 % of the published limit, starting at 0."""
    if k < 0:
        return 0.0
    return float((k // limit.steady) * 60 + (k % limit.steady) // limit.burst)


def floor_limit(endpoint: Endpoint, headroom: float | None = None) -> RateLimit:
    """The limit a floor is computed at: Klaviyo's published one (``headroom`` None), or what
    our limiter admits at ``headroom``: that share of the steady limit, the burst whole."""
    published = ENDPOINT_LIMITS[endpoint]
    if headroom is None:
        return published
    return RateLimit(burst=published.burst, steady=steady_cap(published, headroom))


def last_request_time(n: int, endpoint: Endpoint, headroom: float | None = None) -> float:
    return request_time(n - 1, floor_limit(endpoint, headroom)) if n > 0 else 0.0


def floor_seconds(
    delta: Delta,
    *,
    job_seconds: float,
    direct: bool | None = None,
    time_scale: float = 1.0,
    headroom: float | None = None,
) -> float:
    """The shortest time Klaviyo's published limits allow for this delta (``headroom`` None), or
    the limits our limiter admits at ``headroom`` (:func:`floor_limit`): the floor a run can
    reach when the limiter is the only bound. The limiter's burst guard is left out of both.

    Adds (bulk): the last job is submitted at the burst rate, then runs ``job_seconds``; the
    poll that lists it finished (and its import errors, after failures) fit the same instant.
    Adds (synchronous): the last upsert, then the relationship write. Removals: the last lookup
    (L tier), then its DELETE; DELETEs themselves are spaced by the M tier. Adds and removals
    run side by side. ``time_scale`` compresses Klaviyo's windows (the simulator's); the job
    time is real seconds already. Headroom costs nothing while a run fits the first minute's
    steady budget (a 1M first sync: both floors 14 s) and up to 1/headroom beyond it.
    """
    if direct is None:
        direct = goes_direct(delta.adds)
    adds = 0.0
    if delta.adds and direct:
        adds = max(
            last_request_time(delta.adds, Endpoint.PROFILE_IMPORT, headroom),
            last_request_time(
                math.ceil(delta.adds / DIRECT_BATCH_SIZE), Endpoint.ADD_LIST_PROFILES, headroom
            ),
        )
    elif delta.adds:
        jobs = math.ceil(delta.adds / MAX_PROFILES_PER_JOB)
        adds = (
            last_request_time(jobs, Endpoint.CREATE_BULK_IMPORT_JOB, headroom) / time_scale
            + job_seconds
        )
    removes = 0.0
    if delta.removes:
        deletes = math.ceil(delta.removes / MAX_IDS_PER_RELATIONSHIP_CALL)
        removes = max(
            last_request_time(delta.lookup_calls, Endpoint.GET_PROFILES, headroom),
            last_request_time(delta.list_lookup_calls, Endpoint.GET_LIST_MEMBERS, headroom),
            last_request_time(deletes, Endpoint.REMOVE_LIST_PROFILES, headroom),
        )
    if direct and delta.adds:
        adds /= time_scale
    return max(adds, removes / time_scale)


__all__ = [
    "DIRECT_BATCH_SIZE",
    "Delta",
    "RemovalKey",
    "Requests",
    "add_cutover",
    "direct_add_limit",
    "expected_requests",
    "floor_limit",
    "floor_seconds",
    "goes_direct",
    "last_request_time",
    "request_time",
]
