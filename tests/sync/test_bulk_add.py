"""The bulk path (sync/bulk_add.py) where a unit test cannot reach it: reading a finished job's
import errors when most of its members failed, on the real PostgreSQL and Redis, with the
simulator over HTTP and Klaviyo's windows compressed 20x.

A job of 10,000 profiles that Klaviyo refused has 100 pages of import errors, and the endpoint
allows 150 a minute per account (135 with the limiter's headroom). Two such jobs settling at
once share that budget: read page by page, each got about half of it before the minute ran out,
was refused its next page, and dropped what it had read to start again a step later; the same
halves came round every minute, and neither run ever ended.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from segops_sync.config import get_settings
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import MAX_PAGE_SIZE, MAX_PROFILES_PER_JOB, Endpoint
from segops_sync.klaviyo_sim import Simulator, SimulatorServer
from segops_sync.sync.batch_step import Finished
from segops_sync.sync.batches import run_batch
from segops_sync.sync.fleet.access import KlaviyoAccess
from segops_sync.sync.runs import finish_run
from tests.sync.helpers import World, make_connector, open_world, start_and_plan

TIME_SCALE = 20.0  # the steady window 3 s, the burst window 0.05 s


@pytest.fixture(scope="module")
def server(segops_env: dict[str, str]) -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(time_scale=TIME_SCALE, job_delay=0.05, indexing_delay=0.0)
    with SimulatorServer(sim) as srv:
        yield sim, srv.base_url


@pytest.fixture
def world(server: tuple[Simulator, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("SEGOPS_KLAVIYO_TIME_SCALE", str(TIME_SCALE))
    # the guard against arrival jitter at the product's absolute 50 ms (a fraction of the
    # window, which the compression shrinks: test_fleet_limits)
    monkeypatch.setenv("SEGOPS_LIMITER_BURST_GUARD", str(0.05 * TIME_SCALE))
    yield from open_world(server, monkeypatch, "bulk")


def _members_klaviyo_refuses(w: World, token: str, n: int) -> list[str]:
    """Members whose email is one profile's and external id another's in the account: a bulk
    import refuses each one ("the identifiers belong to two different profiles")."""
    users = [f"dup{i:05d}-{token}" for i in range(n)]
    emails = [f"dup{i:05d}.{token}@example.com" for i in range(n)]
    for user, email in zip(users, emails, strict=True):
        w.sim.add_profile(w.account, email=email)
        w.sim.add_profile(w.account, external_id=user)
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO identities (user_id, email, traits) "
                "SELECT u, e, '{}' FROM unnest(CAST(:u AS text[]), CAST(:e AS text[])) AS x(u, e)"
            ),
            {"u": users, "e": emails},
        )
    return users


def test_two_jobs_refused_whole_settle_though_their_errors_outrun_a_minutes_budget(
    world: World,
) -> None:
    token = uuid.uuid4().hex[:8]
    users = _members_klaviyo_refuses(world, token, 2 * MAX_PROFILES_PER_JOB)
    connector_id = make_connector(world, f"refused-{token}", users)
    run_id, plan = start_and_plan(connector_id)
    batch_ids = plan.batch_ids
    assert len(batch_ids) == 2

    finished: dict[int, float] = {}
    failures: list[BaseException] = []
    started = time.monotonic()

    def step_until_finished(batch_id: int) -> None:
        access = KlaviyoAccess(get_settings())  # a worker process of its own
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                step = run_batch(batch_id, access, get_settings())
                if isinstance(step, Finished):
                    finished[batch_id] = time.monotonic() - started
                    return
                time.sleep(min(step.countdown, 0.5))
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=step_until_finished, args=(b,)) for b in batch_ids]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert failures == []
    assert sorted(finished) == sorted(batch_ids), f"settled: {finished}"
    # Every page read once: a read dropped half-way would read its pages again (a 429, which
    # ends a read whatever its patience, may cost one job's pages).
    reads = [
        r
        for r in world.sim.requests(endpoint=Endpoint.GET_BULK_IMPORT_ERRORS)
        if r.account == world.account
    ]
    refused = sum(r.status == 429 for r in reads)
    pages = len(users) // MAX_PAGE_SIZE  # one import error per member
    assert len(reads) - refused <= pages * (1 + refused), (len(reads), refused)
    with session_scope() as s:
        finish_run(s, run_id)
        outcomes: dict[str, int] = dict(
            s.execute(
                text(
                    "SELECT outcome, count(*) FROM sync_batch_items WHERE run_id = :r "
                    "GROUP BY outcome"
                ),
                {"r": run_id},
            ).all()
        )
    assert outcomes == {"rejected": len(users)}
