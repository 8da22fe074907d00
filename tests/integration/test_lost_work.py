"""Nothing waits forever, on the real stack.

* ``test_redis_flushed_mid_sync_recovered_through_the_marker``: the Redis the stack uses (a
  redis-server of the test's own) is flushed (FLUSHALL) while a 40,000-member sync has bulk
  jobs in flight: on Redis as the broker that loses queued and unacknowledged messages, chord
  counters, heartbeats and the limiter; on RabbitMQ, the result backend's chord state and the
  limiter. The sweeper is out of reach (``SEGOPS_STUCK_AFTER`` an hour): the worker node finds
  its marker gone and re-sends every open run PostgreSQL knows; the list ends exact and the log
  says the run was re-sent through that path, never through the sweeper.
* ``test_bulk_job_never_finishing_is_given_up``: Klaviyo keeps one import job "processing"
  forever; after ``SEGOPS_JOB_GIVE_UP`` its members are sent again and the list ends exact.
* ``test_one_read_back_per_connector``: two verifications of one connector at once: one reads
  the list back, the other skips (the simulator counts one read's pages, not two).

The two-minute bound on a Redis loss holds by design, not by a timed assertion: a node checks
its markers at every liveness scan (``SEGOPS_LIVENESS_SCAN_INTERVAL``, 5 s by default), and the
re-send is the sweeper's own re-dispatch, published at once.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from segops_sync.config import get_settings
from segops_sync.embedded import EmbeddedRedis, free_port
from segops_sync.klaviyo import Endpoint
from segops_sync.klaviyo_sim import Simulator
from segops_sync.sync.fleet.access import KlaviyoAccess
from segops_sync.sync.verify import Comparison, verify_for_beat
from tests.conftest import BROKERS, isolated_env
from tests.integration.helpers import (
    create_connector,
    latest_run,
    new_segment,
    recompute,
    wait_idle,
)
from tests.integration.test_crash_recovery import (
    _assert_all_runs_closed,
    _assert_list_exact,
    _assert_run,
    _batches,
    _in_flight_run,
    _members,
    _wait_for,
    stack,
)

pytestmark = pytest.mark.slow

# Out of the sweeper's reach for the length of a test: only the marker path can recover.
NO_SWEEPER = {"SEGOPS_STUCK_AFTER": "3600"}


@pytest.fixture
def iso_env(
    segops_env: dict[str, str], pg_server_url: str, broker: str
) -> Iterator[dict[str, str]]:
    with isolated_env(segops_env, pg_server_url, "lost", broker=broker) as env:
        yield env


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own: FLUSHALL on it is a real loss of everything."""
    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port()).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "redis", ignore_errors=True)


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_redis_flushed_mid_sync_recovered_through_the_marker(
    iso_env: dict[str, str], own_redis: EmbeddedRedis, broker: str, tmp_path: Path
) -> None:
    on_redis = {"SEGOPS_RESULT_BACKEND": f"{own_redis.url}/1", **NO_SWEEPER}
    if broker == "redis":
        on_redis |= {
            "SEGOPS_BROKER_URL": f"{own_redis.url}/0",
            "SEGOPS_LIMITER_REDIS_URL": f"{own_redis.url}/2",
        }
    sim = Simulator(job_delay=6.0, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim, **on_redis) as st:
        k = st.klaviyo
        st.start_worker()
        segment = new_segment()
        connector_id = create_connector(k, segment)
        members = _members("lost", 40_000)
        sim.set_faults(latency=0.05)
        recompute(segment, members, tmp_path)
        run_id = _wait_for("import jobs in flight", lambda: _in_flight_run(connector_id, 1), 90)

        redis.Redis.from_url(own_redis.url).flushall()
        at_flush = _batches(run_id)
        assert any(s in ("pending", "submitted") for _, _, s, _ in at_flush), at_flush
        sim.job_delay = 1.0

        wait_idle(connector_id, timeout=240)
        _assert_all_runs_closed(connector_id)
        _assert_list_exact(k, members)
        _assert_run(latest_run(connector_id), added=40_000, removed=0)
        log = st.worker_log()
        assert f"run {run_id} re-sent after Redis lost its data" in log, st.worker_errors()
        assert "made no progress" not in log  # not the sweeper's doing


def test_bulk_job_never_finishing_is_given_up(iso_env: dict[str, str], tmp_path: Path) -> None:
    sim = Simulator(job_delay=0.5, indexing_delay=0.0)
    # 10 s: the resent job (0.5 s) must be seen complete before it too is given up
    give_up = {"SEGOPS_JOB_GIVE_UP": "10", "SEGOPS_DIRECT_ADD_LIMIT": "0"}
    with stack(iso_env, tmp_path, sim, **give_up, **NO_SWEEPER) as st:
        k = st.klaviyo
        st.start_worker()
        segment = new_segment()
        connector_id = create_connector(k, segment)
        members = _members("stall", 3_000)
        sim.stall_next_jobs(1)  # Klaviyo never finishes the sync's job
        recompute(segment, members, tmp_path)

        wait_idle(connector_id, timeout=120)
        _assert_all_runs_closed(connector_id)
        _assert_list_exact(k, members)
        _assert_run(latest_run(connector_id), added=3_000, removed=0)
        # Two jobs: the one Klaviyo still calls "processing", and the resend that completed.
        created = sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB, status=202)
        assert len(created) == 2, [r.path for r in created]
        assert sim.unapplied_jobs() == 1
        assert "unfinished 10s after it was created: taken as lost" in st.worker_log()


def test_one_read_back_per_connector(iso_env: dict[str, str], tmp_path: Path) -> None:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim, **NO_SWEEPER) as st:
        st.start_worker()
        segment = new_segment()
        connector_id = create_connector(st.klaviyo, segment)
        recompute(segment, _members("rb", 1_000), tmp_path)
        wait_idle(connector_id, timeout=60)
        settings = get_settings()

        def pages() -> int:
            return len(sim.requests(endpoint=Endpoint.GET_LIST_MEMBERS))

        def verify() -> Comparison | None:
            return verify_for_beat(connector_id, KlaviyoAccess(settings), settings)

        alone_before = pages()
        assert verify() is not None
        one_read = pages() - alone_before  # the pages of one read-back of this list
        assert one_read >= 5

        sim.set_faults(latency=0.3)  # the first read-back is still going when the second asks
        results: dict[str, Comparison | None] = {}
        before = pages()
        first = threading.Thread(target=lambda: results.update(first=verify()))
        first.start()
        _wait_for("the first read-back under way", lambda: pages() > before, 30)
        results["second"] = verify()  # the redelivered task, say, an hour later
        first.join(timeout=120)

        assert results["second"] is None
        found = results["first"]
        assert found is not None and found.matches, found
        assert pages() - before == one_read
