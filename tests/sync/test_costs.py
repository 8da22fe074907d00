"""The cost model: the floor, the request counts and the synchronous cut-over, from the limits."""

from __future__ import annotations

import pytest

from segops_sync.klaviyo import Endpoint
from segops_sync.klaviyo.endpoints import L, M
from segops_sync.sync.costs import (
    Delta,
    RemovalKey,
    direct_add_limit,
    expected_requests,
    floor_limit,
    floor_seconds,
    goes_direct,
    removals_first,
    request_time,
)


def bench_members(start: int, stop: int) -> list[tuple[str, RemovalKey]]:
    return [
        (f"b{i:07d}@example.com", "email") if i % 3 else (f"cust-{i:07d}", "external_id")
        for i in range(start, stop)
    ]


def test_request_times_follow_both_fixed_windows() -> None:
    assert [request_time(k, M) for k in (0, 9, 10, 99, 149, 150)] == [0, 0, 1, 9, 14, 60]
    assert request_time(999, L) == 60 + 3  # 750 in the first minute, then 75 a second


def test_the_time_floor_of_a_first_sync_and_of_a_churn() -> None:
    # first sync of 1M: 100 jobs in 9 s at 10/s, then one job of 5 s
    assert floor_seconds(Delta(1_000_000), job_seconds=5) == 14
    assert floor_seconds(Delta(200_000), job_seconds=5) == 6
    # 10 % churn of 1M without known ids: 334 external_id lookups (GET /api/profiles) and 667
    # email lookups on the list (GET /api/lists/{id}/profiles), each endpoint at 75/s, the last
    # at 8 s; 100 DELETEs at 10/s, the last at 9 s; the adds' 10 jobs, the last at 0.9 s + 5 s
    churn = Delta.of(100_000, bench_members(0, 100_000))
    assert (churn.lookup_calls, churn.list_lookup_calls) == (334, 667)
    assert floor_seconds(churn, job_seconds=5) == 9
    # with every id known (after a read-back): no lookup, the DELETEs alone
    known = Delta.of(100_000, [(u, "id") for u, _ in bench_members(0, 100_000)])
    assert (known.lookup_calls, known.list_lookup_calls, known.removes) == (0, 0, 100_000)
    assert floor_seconds(known, job_seconds=5) == 9
    # compressed windows shrink the rate-bound part only
    assert floor_seconds(churn, job_seconds=5, time_scale=10) == pytest.approx(5.0)


def test_the_cut_over_comes_from_the_limits() -> None:
    assert direct_add_limit(0.9) == 337  # half of 675/min, what the limiter admits of 750
    assert direct_add_limit(1.0) == 375
    assert goes_direct(337) and not goes_direct(338) and not goes_direct(0)


def test_expected_requests_per_path() -> None:
    bulk = expected_requests(Delta(25_000)).by_endpoint
    # a job is not read alone (the watcher's poll lists its failed_count), and no import errors
    # are read of jobs Klaviyo reports without failures
    assert bulk == {Endpoint.CREATE_BULK_IMPORT_JOB: 3}
    failing = expected_requests(Delta(25_000), import_error_pages=2).by_endpoint
    assert failing[Endpoint.GET_BULK_IMPORT_ERRORS] == 6
    small = expected_requests(Delta.of(5, bench_members(0, 5))).by_endpoint
    assert small == {
        Endpoint.PROFILE_IMPORT: 5,
        Endpoint.ADD_LIST_PROFILES: 1,
        Endpoint.REMOVE_LIST_PROFILES: 1,
        Endpoint.GET_PROFILES: 1,  # one external_id lookup
        Endpoint.GET_LIST_MEMBERS: 1,  # one email lookup, on the list
    }
    known = expected_requests(Delta.of(0, [(u, "id") for u, _ in bench_members(0, 5)]))
    assert known.by_endpoint == {Endpoint.REMOVE_LIST_PROFILES: 1}


def test_removals_go_first_when_their_lookups_outlast_a_minute() -> None:
    # 10 lookups per removal batch of 1,000; the limiter admits 675 a minute at headroom 0.9
    assert not removals_first(0)
    assert not removals_first(67)  # 670 lookups: one minute's budget, the adds' job is longer
    assert removals_first(68)  # 680: past the minute (a 1M churn has 100 removal batches)
    assert removals_first(100)
    assert removals_first(75) and not removals_first(75, headroom=1.0)  # 750: all of 750/min


def test_the_floor_at_the_limiters_headroom_admits_that_share_of_each_minute() -> None:
    assert floor_limit(Endpoint.CREATE_BULK_IMPORT_JOB) == M
    assert floor_limit(Endpoint.CREATE_BULK_IMPORT_JOB, 0.9).steady == 135  # burst whole: 10
    assert floor_limit(Endpoint.CREATE_BULK_IMPORT_JOB, 0.9).burst == M.burst
    # 1M: 100 jobs fit the first minute's 135, burst-bound either way
    assert floor_seconds(Delta(1_000_000), job_seconds=5, headroom=0.9) == 14
    assert floor_seconds(Delta(1_000_000), job_seconds=5) == 14
    # 10M: 1,000 jobs are steady-bound; at 150/min the last goes at 369 s, at 135/min at 425 s
    published = floor_seconds(Delta(10_000_000), job_seconds=5)
    admitted = floor_seconds(Delta(10_000_000), job_seconds=5, headroom=0.9)
    assert (published, admitted) == (374, 430)
    # 1/0.9 = 1.11 over the full minutes, a little more for the last, partial one
    assert admitted / published == pytest.approx(1.11, abs=0.05)
    # a 10 % churn of 1M: its 667 list lookups fit the first minute's 675, its 100 DELETEs the
    # first minute's 135: burst-bound either way, the last DELETE at 9 s
    churn = Delta.of(100_000, bench_members(0, 100_000))
    assert floor_seconds(churn, job_seconds=5, headroom=0.9) == 9
    assert floor_seconds(Delta(10_000_000), job_seconds=5, headroom=1.0) == published
