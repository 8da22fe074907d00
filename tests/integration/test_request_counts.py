"""The request count per endpoint matches the cost formula, at a small scale.

10,000 members on the real stack (a worker process, PostgreSQL, Redis) with Klaviyo's windows
compressed 10x in the simulator and in the limiter. A first sync, a 10 % churn and a change of
5 out + 5 in, and a churn after a read-back of the list (no lookups: every profile id known),
must each send exactly what ``sync/costs.py`` says (bulk jobs, lookups, DELETEs,
profile-imports, list writes), with no 429, and the job watcher's polls must stay within their
stated share of the list endpoint's budget. Counts only: no wall-clock time is asserted.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from segops_sync.klaviyo import ENDPOINT_LIMITS, Endpoint
from segops_sync.klaviyo_sim import Simulator
from segops_sync.sync.costs import Delta, RemovalKey, expected_requests, goes_direct
from segops_sync.sync.fleet.watcher import POLL_SHARE
from segops_sync.sync.inputs.identity import is_email
from tests.integration.helpers import (
    Klaviyo,
    cli,
    create_connector,
    latest_run,
    recompute,
    simulated_fleet,
    wait_idle,
)

TIME_SCALE = 10.0  # burst window 0.1 s, steady window 6 s
JOB_DELAY = 1.0
POLL_INTERVAL = 0.1  # = the watcher's spacing at this time scale: polls at their full share
SIZE = 10_000
# Setup traffic, not the sync's: which account a key is (once per key), the connector's check.
SETUP = {Endpoint.GET_ACCOUNTS, Endpoint.GET_LIST}


@dataclass
class Stack:
    sim: Simulator
    base_url: str


@pytest.fixture(scope="module")
def stack(
    segops_env: dict[str, str], pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    sim = Simulator(time_scale=TIME_SCALE, job_delay=JOB_DELAY, indexing_delay=0.0)
    workdir = tmp_path_factory.mktemp("counts")
    poll = {"SEGOPS_JOB_POLL_INTERVAL": str(POLL_INTERVAL)}
    with simulated_fleet(
        sim, segops_env, pg_server_url, workdir, "counts", overrides=poll
    ) as base_url:
        yield Stack(sim, base_url)


def members(start: int, stop: int) -> list[str]:
    """Two thirds email user_ids, one third opaque ones (external_id profiles), as the bench."""
    return [f"c{i:06d}@example.com" if i % 3 else f"cust-{i:06d}" for i in range(start, stop)]


def key(user_id: str) -> RemovalKey:
    return "email" if is_email(user_id) else "external_id"


def sync(
    stack: Stack, k: Klaviyo, connector_id: str, segment: str, now: list[str], tmp: Path, runs: int
) -> Counter[Endpoint]:
    """Recompute, wait for the run, and count what it sent to Klaviyo."""
    before = len(stack.sim.requests())
    recompute(segment, now, tmp)
    wait_idle(connector_id, runs_at_least=runs, timeout=300)
    sent = [r for r in stack.sim.requests()[before:] if r.account == k.account]
    assert [r for r in sent if r.status == 429] == []
    assert set(k.members()) == set(now)
    return Counter(r.endpoint for r in sent if r.endpoint is not None)


def check(sent: Counter[Endpoint], delta: Delta, *, direct: bool) -> None:
    expected = expected_requests(delta, direct=direct).by_endpoint
    counted = {
        e: n for e, n in sent.items() if e not in SETUP and e != Endpoint.LIST_BULK_IMPORT_JOBS
    }
    assert counted == expected
    # the job watcher polls only while a bulk job runs
    assert (sent[Endpoint.LIST_BULK_IMPORT_JOBS] > 0) == (not direct and delta.adds > 0)


def test_requests_per_endpoint_match_the_formula(stack: Stack, tmp_path: Path) -> None:
    k = Klaviyo.new(stack.sim, stack.base_url)
    segment = f"counts-{uuid.uuid4().hex[:6]}"
    connector_id = create_connector(k, segment)

    first = members(0, SIZE)
    sent = sync(stack, k, connector_id, segment, first, tmp_path, runs=1)
    assert not goes_direct(SIZE)
    check(sent, Delta(adds=SIZE), direct=False)
    assert sent[Endpoint.CREATE_BULK_IMPORT_JOB] == 1 and sent[Endpoint.GET_BULK_IMPORT_JOB] == 0

    churn = SIZE // 10
    churned = members(churn, SIZE + churn)
    sent = sync(stack, k, connector_id, segment, churned, tmp_path, runs=2)
    delta = Delta.of(churn, [(m, key(m)) for m in first[:churn]])
    assert not goes_direct(churn)
    check(sent, delta, direct=False)
    # 1,000 leavers, one DELETE: 334 external_ids (4 lookups of <= 100, account-wide) and 666
    # emails (7, on the list)
    assert sent[Endpoint.REMOVE_LIST_PROFILES] == 1
    assert (sent[Endpoint.GET_PROFILES], sent[Endpoint.GET_LIST_MEMBERS]) == (4, 7)

    small = churned[5:] + members(SIZE + churn, SIZE + churn + 5)
    sent = sync(stack, k, connector_id, segment, small, tmp_path, runs=3)
    delta = Delta.of(5, [(m, key(m)) for m in churned[:5]])
    assert goes_direct(5)
    check(sent, delta, direct=True)
    assert sent[Endpoint.PROFILE_IMPORT] == 5 and sent[Endpoint.ADD_LIST_PROFILES] == 1
    assert sent[Endpoint.CREATE_BULK_IMPORT_JOB] == 0

    # Whatever the number of jobs, the watcher's polls stay within their share of the list
    # endpoint's budget in every (compressed) minute, and within its burst.
    limit = ENDPOINT_LIMITS[Endpoint.LIST_BULK_IMPORT_JOBS]
    steady = stack.sim.max_rate(k.account, Endpoint.LIST_BULK_IMPORT_JOBS, stack.sim.steady_window)
    burst = stack.sim.max_rate(k.account, Endpoint.LIST_BULK_IMPORT_JOBS, stack.sim.burst_window)
    assert steady <= math.ceil(POLL_SHARE * limit.steady) + 1
    assert burst <= 2
    latest = latest_run(connector_id)
    assert (latest.status, latest.added, latest.removed) == ("succeeded", 5, 5)

    # After one read-back the ledger knows every member's profile id: a churn sends its
    # DELETEs alone, no lookup.
    assert cli("connectors", "verify", connector_id).returncode == 0
    fresh = SIZE + churn + 5
    known = small[churn:] + members(fresh, fresh + churn)
    sent = sync(stack, k, connector_id, segment, known, tmp_path, runs=4)
    check(sent, Delta.of(churn, [(m, "id") for m in small[:churn]]), direct=False)
    assert sent[Endpoint.GET_PROFILES] == sent[Endpoint.GET_LIST_MEMBERS] == 0
    assert sent[Endpoint.REMOVE_LIST_PROFILES] == 1
