"""Issue 4, "Must show": a fleet of workers keeps one Klaviyo account under its limits.

Three ``celery worker`` processes (two pool processes each, beat on one) share the fleet-wide
limiter in Redis and sync into the Klaviyo simulator, which enforces Klaviyo's per-account,
per-endpoint burst (1 s) and steady (60 s) fixed windows, compressed by ``TIME_SCALE``; the
workers compress their limiter windows the same way (``SEGOPS_KLAVIYO_TIME_SCALE``).

This module runs in a database and a Redis key prefix of its own, with a simulator of its own:
no other worker of the session (the suite's shared one) can take its tasks or sweep its runs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from segops_sync.db.models import SyncRun
from segops_sync.klaviyo import ENDPOINT_LIMITS, Endpoint
from segops_sync.klaviyo.simulator import Simulator, SimulatorServer
from tests.conftest import BACKEND_DB, BROKER_DB, LIMITER_DB, _reset_settings
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    wait_idle,
)

# Klaviyo's windows compressed 4x: burst 0.25 s, steady 15 s. Low enough that the steady
# windows bind (M tier: 150 per 15 s), high enough to keep the file within a few minutes.
TIME_SCALE = 4.0
WORKERS = 3
CONCURRENCY = 2


@dataclass
class Fleet:
    sim: Simulator
    base_url: str
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    def klaviyo(self) -> Klaviyo:
        """A fresh account with one key and one list."""
        return Klaviyo.new(self.sim, self.base_url)

    def second_connection(self, k: Klaviyo, name: str) -> Klaviyo:
        """Another key and another list of the same account: both draw on one budget."""
        return Klaviyo(
            self.sim,
            self.base_url,
            k.account,
            self.sim.create_key(k.account),
            self.sim.create_list(k.account, name),
        )

    def worker_errors(self) -> str:
        lines = [
            f"[{i}] {ln}"
            for i, w in enumerate(self.workers)
            for ln in w.log().splitlines()
            if "ERROR" in ln or "Traceback" in ln or "Error:" in ln
        ]
        return "\n".join(lines[-40:])


@pytest.fixture(scope="module")
def fleet(
    segops_env: dict[str, str], pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    from segops_sync.db.migrate import upgrade

    sim = Simulator(time_scale=TIME_SCALE, job_delay=0.5, indexing_delay=0.0)
    server = SimulatorServer(sim)
    server.start()

    db_name = f"segops_fleet_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    db_url = make_url(pg_server_url).set(database=db_name).render_as_string(hide_password=False)
    prefix = f"segops-fleet-{uuid.uuid4().hex[:8]}:"
    env = {
        **segops_env,
        "SEGOPS_DATABASE_URL": db_url,
        "SEGOPS_REDIS_KEY_PREFIX": prefix,
        "SEGOPS_KLAVIYO_BASE_URL": server.base_url,
        "SEGOPS_KLAVIYO_TIME_SCALE": str(TIME_SCALE),
        # Batches may wait a whole compressed steady window (15 s) for a slot: not stuck.
        "SEGOPS_STUCK_AFTER": "90",
        "SEGOPS_VISIBILITY_TIMEOUT": "120",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _reset_settings()
    upgrade(db_url)

    fleet = Fleet(sim, server.base_url, env)
    workdir = tmp_path_factory.mktemp("fleet")
    try:
        for i in range(WORKERS):
            proc = WorkerProcess(env, workdir, concurrency=CONCURRENCY, beat=i == 0)
            fleet.workers.append(proc)
            proc.start()
        yield fleet
    finally:
        for proc in fleet.workers:
            proc.stop()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_settings()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
        redis_url = env["SEGOPS_BROKER_URL"].rsplit("/", 1)[0]
        for db in (BROKER_DB, BACKEND_DB, LIMITER_DB):
            client = redis.Redis.from_url(f"{redis_url}/{db}")
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)


@pytest.fixture
def fleet_log_on_failure(request: pytest.FixtureRequest, fleet: Fleet) -> Iterator[Fleet]:
    yield fleet
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("\n--- fleet worker errors (last 40) ---\n" + fleet.worker_errors())


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class EndpointFigures:
    endpoint: Endpoint
    requests: int
    max_burst: int
    max_steady: int

    @property
    def burst_limit(self) -> int:
        return ENDPOINT_LIMITS[self.endpoint].burst

    @property
    def steady_limit(self) -> int:
        return ENDPOINT_LIMITS[self.endpoint].steady

    def within(self) -> bool:
        return self.max_burst <= self.burst_limit and self.max_steady <= self.steady_limit


@dataclass
class Figures:
    requests: int
    count_429: int
    early: int
    endpoints: list[EndpointFigures]

    @property
    def share_429(self) -> float:
        return self.count_429 / self.requests if self.requests else 0.0

    def table(self, title: str) -> str:
        lines = [
            f"== {title}: {self.requests} requests, {self.count_429} x 429 "
            f"({self.share_429:.2%}), {self.early} before Retry-After",
            f"   {'endpoint':52} {'reqs':>6} {'max/1s':>7} {'limit':>5} {'max/60s':>8} {'limit':>5}",
        ]
        for e in self.endpoints:
            lines.append(
                f"   {e.endpoint.value:52} {e.requests:6d} {e.max_burst:7d} {e.burst_limit:5d} "
                f"{e.max_steady:8d} {e.steady_limit:5d}"
            )
        lines.append("   (windows are Klaviyo's, compressed by the time scale)")
        return "\n".join(lines)


def measure(sim: Simulator, account: str) -> Figures:
    mine = [r for r in sim.requests() if r.account == account]
    endpoints = sorted({r.endpoint for r in mine if r.endpoint is not None}, key=str)
    return Figures(
        requests=len(mine),
        count_429=sum(1 for r in mine if r.status == 429),
        early=sum(1 for r in mine if r.early_retry),
        endpoints=[
            EndpointFigures(
                e,
                sum(1 for r in mine if r.endpoint == e),
                sim.max_rate(account, e, sim.burst_window),
                sim.max_rate(account, e, sim.steady_window),
            )
            for e in endpoints
        ],
    )


# -- the segment -------------------------------------------------------------------------------


def members(prefix: str, start: int, stop: int) -> list[str]:
    """Two thirds email user_ids, one third opaque ids (synced as external_id)."""
    return [
        f"{prefix}-{i}@example.com" if i % 3 else f"{prefix}-u{i}" for i in range(start, stop)
    ]


def assert_list_is(k: Klaviyo, expected: list[str]) -> None:
    on_list = set(k.members())
    want = set(expected)
    assert on_list == want, (
        f"{len(want - on_list)} missing (e.g. {sorted(want - on_list)[:3]}), "
        f"{len(on_list - want)} extra (e.g. {sorted(on_list - want)[:3]})"
    )


def run_seconds(run: SyncRun) -> float:
    assert run.finished_at is not None
    return (run.finished_at - run.started_at).total_seconds()


# -- 1. three workers, two connectors, one account --------------------------------------------


@pytest.mark.slow
def test_two_connectors_one_account_stay_within_limits(
    fleet_log_on_failure: Fleet, tmp_path: Path
) -> None:
    fleet = fleet_log_on_failure
    first = fleet.klaviyo()
    second = fleet.second_connection(first, "Second")
    segment = new_segment()
    tag = uuid.uuid4().hex[:6]
    a = create_connector(first, segment)
    b = create_connector(second, segment)

    # A first sync of 30,000: three bulk import jobs per connector.
    everyone = members(tag, 0, 30_000)
    recompute(segment, everyone, tmp_path)
    for cid in (a, b):
        connector = wait_idle(cid, timeout=180)
        assert connector.status == "active", connector.last_error
    assert_list_is(first, everyone)
    assert_list_is(second, everyone)
    first_runs = [latest_run(a), latest_run(b)]

    # A churn: 12,000 leave (40 % of the list, under the mass-removal guard), 12,000 join.
    # Removals need profile ids: 120 lookups of 100 per connector, then 12 DELETEs of 1,000.
    churned = members(tag, 12_000, 42_000)
    recompute(segment, churned, tmp_path)
    for cid in (a, b):
        connector = wait_idle(cid, runs_at_least=2, timeout=240)
        assert connector.status == "active", connector.last_error
    assert_list_is(first, churned)
    assert_list_is(second, churned)
    churn_runs = [latest_run(a), latest_run(b)]
    for run in churn_runs:
        assert (run.status, run.added, run.removed, run.pending) == ("succeeded", 12_000, 12_000, 0)

    figures = measure(fleet.sim, first.account)
    print()
    print(figures.table(f"two connectors, one account, time scale {TIME_SCALE:g}"))
    print(
        "   first sync of 30,000: "
        + ", ".join(f"{run_seconds(r):.1f} s" for r in first_runs)
        + "; churn of 12,000 out + 12,000 in: "
        + ", ".join(f"{run_seconds(r):.1f} s" for r in churn_runs)
    )
    assert figures.early == 0, "a request went out before its Retry-After"
    assert figures.share_429 <= 0.01
    over = [e.endpoint.value for e in figures.endpoints if not e.within()]
    assert over == [], f"over Klaviyo's limit on {over}"
    lookups = next(e for e in figures.endpoints if e.endpoint == Endpoint.GET_PROFILES)
    assert lookups.requests >= 240
