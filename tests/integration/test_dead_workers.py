"""A dead worker costs seconds, not an hour, on Redis and on RabbitMQ, without beat.

Every worker here runs with the production defaults (visibility timeout 1 h, sweeper after 15
min, 10 s heartbeats, ...) and without beat: what recovers the work is the heartbeat scan of
``sync/fleet/liveness.py`` (Redis) or the broker giving a dead consumer's messages back (RabbitMQ),
never the sweeper nor Redis's visibility timeout.

* ``test_kill9_new_worker_finishes_within_60s``: a worker killed with SIGKILL mid-way through a
  20,000-member sync, once while its Klaviyo bulk jobs are pending (they finish in Klaviyo while
  no worker lives) and once while batches are being written; a new worker closes the run, with
  the list exact, within 60 s of being ready. On Redis, the dead worker's original messages
  are then given back (as after the visibility timeout) and change nothing.
* ``test_chaos_four_kills_during_100k_sync``: four kills 2-5 s apart during a 100,000-member
  sync, a new worker each time; exact within 60 s of the last start, no run left running, and
  each member sent to Klaviyo at most once plus once per kill (5; measured: 2 or 3).
* ``test_poison_pill_batch_fails_its_run_and_the_worker_lives``: a batch that kills its pool
  process at every delivery is given up after ``SEGOPS_WORKER_LOST_BUDGET`` deliveries; its run
  fails with a message for a person; the worker lives on and other connectors keep syncing.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from segops_sync.config import Settings
from segops_sync.klaviyo_sim import Simulator
from tests.conftest import BROKERS, isolated_env
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    wait_idle,
)
from tests.integration.test_crash_recovery import (
    Stack,
    _assert_all_runs_closed,
    _assert_list_exact,
    _assert_run,
    _batches,
    _describe,
    _members,
    _runs,
    _wait_for,
    stack,
)

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("broker", BROKERS, indirect=True)]

RECOVERY_BOUND = 60.0
# Four kills leave up to ten 10,000-profile batches to rebuild after the last worker starts, on
# 2 cores: measured 15-50 s, so 60 s left a loaded CI host little room. Without recovery
# (no beat, a 1 h visibility timeout, a 15 min stuck_after) the run never closes, so the bound
# still tells a recovering sync from one that is not.
CHAOS_RECOVERY_BOUND = 120.0
# The session's tuned settings undone: what an operator runs with.
PRODUCTION = {
    f"SEGOPS_{name.upper()}": str(Settings.model_fields[name].default)
    for name in (
        "job_poll_interval",
        "retry_base_delay",
        "indexing_wait",
        "stuck_after",
        "sweep_interval",
        "visibility_timeout",
        "heartbeat_ttl",
        "liveness_scan_interval",
        "worker_lost_budget",
    )
}


@pytest.fixture
def iso_env(
    segops_env: dict[str, str], pg_server_url: str, broker: str
) -> Iterator[dict[str, str]]:
    with isolated_env(segops_env, pg_server_url, "dead", broker=broker) as env:
        yield env


def _add_batches(run_id: str) -> list[tuple[str, int, str, int]]:
    return [b for b in _batches(run_id) if b[0] == "add"]


def _open_run_with_jobs(connector_id: str, *, all_submitted: bool) -> str | None:
    runs = _runs(connector_id)
    if len(runs) < 2 or runs[-1].status != "running":
        return None
    adds = _add_batches(runs[-1].id)
    submitted = [jobs for *_, jobs in adds if jobs]
    if adds and (len(submitted) == len(adds) if all_submitted else submitted):
        return runs[-1].id
    return None


def _max_sends(k: Klaviyo, members: list[str]) -> int:
    counts = k.sim.submitted_counts(k.account)
    unsent = [m for m in members if m not in counts]
    assert not unsent, f"{len(unsent)} members never sent, e.g. {unsent[:3]}"
    return max(counts[m] for m in members)


@pytest.mark.parametrize("moment", ["jobs-pending", "writing"])
def test_kill9_new_worker_finishes_within_60s(
    iso_env: dict[str, str], tmp_path: Path, broker: str, moment: str
) -> None:
    sim = Simulator(job_delay=1.0, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim, **PRODUCTION) as st:
        k = st.klaviyo
        first = st.start_worker(beat=False)
        segment = new_segment()
        connector_id = create_connector(k, segment)
        before = _members(f"k9{moment[0]}", 2_000)
        recompute(segment, before, tmp_path)
        wait_idle(connector_id, timeout=60)

        # 20,000 members: 1,200 stay, 800 leave, 18,800 join (two import jobs, one removal).
        leavers = set(before[400:800] + before[1_600:])
        after = [m for m in before if m not in leavers] + _members(f"k9{moment[0]}n", 18_800)
        if moment == "jobs-pending":
            sim.job_delay = 8.0
        else:
            sim.set_faults(latency=0.3)  # requests in flight when the kill lands
        recompute(segment, after, tmp_path)
        run_id = _wait_for(
            "the moment to kill",
            lambda: _open_run_with_jobs(connector_id, all_submitted=moment == "jobs-pending"),
            90,
        )
        if moment == "writing":
            time.sleep(random.uniform(0.0, 0.4))
        first.kill9()
        at_kill = _batches(run_id)
        assert latest_run(connector_id).status == "running"
        assert any(status in ("pending", "submitted") for _, _, status, _ in at_kill), at_kill
        sim.set_faults()
        if moment == "jobs-pending":  # the jobs finish in Klaviyo while no worker lives
            jobs = [j for j in _job_ids(run_id)]
            _wait_for("Klaviyo to finish the jobs", lambda: _all_complete(sim, jobs), 30)

        second = st.start_worker(beat=False)
        ready = time.monotonic()
        wait_idle(connector_id, runs_at_least=2, timeout=RECOVERY_BOUND)
        recovery = time.monotonic() - ready
        _assert_all_runs_closed(connector_id)
        _assert_list_exact(k, after)
        _assert_run(latest_run(connector_id), added=18_800, removed=800)
        sends = _max_sends(k, after)
        if moment == "jobs-pending":  # every job was on record: nobody is sent again
            assert sends == 1, f"a member was sent {sends} times"
        else:
            assert sends <= 2, f"a member was sent {sends} times"
        assert "made no progress" not in second.log(), "the sweeper did it, not liveness"
        if broker == "redis":
            assert "re-sent" in second.log(), "no dead worker's task was re-sent"
        if broker == "redis" and moment == "jobs-pending":
            _late_redelivery_changes_nothing(st, k, connector_id, after, [second])
        print(
            f"RECOVERY broker={broker} moment={moment} seconds={recovery:.1f} "
            f"max_sends={sends} at_kill={at_kill} runs={_describe(connector_id)}"
        )


def _late_redelivery_changes_nothing(
    st: Stack, k: Klaviyo, connector_id: str, members: list[str], workers: list[WorkerProcess]
) -> None:
    """Redis gives the dead worker's original messages back after the visibility timeout (an
    hour; here a worker started with 5 s restores them at once): they must change nothing."""
    sends, runs = k.sim.submitted_counts(k.account), len(_runs(connector_id))

    def batches_done() -> int:
        return sum(
            len(re.findall(r"segops\.add_batch\[[^]]+\] succeeded", w.log())) for w in workers
        )

    before = batches_done()
    workers.append(st.start_worker(beat=False, SEGOPS_VISIBILITY_TIMEOUT="5"))
    _wait_for("the original batch messages to come back", lambda: batches_done() >= before + 2, 30)
    time.sleep(2)
    _assert_all_runs_closed(connector_id)
    _assert_list_exact(k, members)
    assert len(_runs(connector_id)) == runs, _describe(connector_id)
    assert k.sim.submitted_counts(k.account) == sends, "a redelivered batch sent members again"


def _job_ids(run_id: str) -> list[str]:
    from sqlalchemy import select

    from segops_sync.db.models import SyncBatch
    from segops_sync.db.session import session_scope

    with session_scope() as s:
        rows = s.scalars(select(SyncBatch.job_ids).where(SyncBatch.run_id == run_id)).all()
    return [j for jobs in rows for j in jobs]


def _all_complete(sim: Simulator, jobs: list[str]) -> bool:
    return all(sim.job_status(j) == "complete" for j in jobs)


def test_chaos_four_kills_during_100k_sync(
    iso_env: dict[str, str], tmp_path: Path, broker: str
) -> None:
    sim = Simulator(job_delay=3.0, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim, **PRODUCTION) as st:
        k = st.klaviyo
        worker = st.start_worker(beat=False)
        segment = new_segment()
        connector_id = create_connector(k, segment)
        members = _members("chaos", 100_000)
        recompute(segment, members, tmp_path)
        # Kills land while batches talk to Klaviyo (a kill during planning is the easy case).
        _wait_for("the run to dispatch its batches", lambda: _dispatched(connector_id), 120)
        kills: list[str] = []
        for _ in range(4):
            time.sleep(random.uniform(2.0, 5.0))
            run = latest_run(connector_id)
            kills.append(
                f"{run.status}/{run.phase}:{sum(b[2] == 'done' for b in _batches(run.id))}"
            )
            worker.kill9()
            worker = st.start_worker(beat=False)
        last_start = time.monotonic()
        wait_idle(connector_id, timeout=CHAOS_RECOVERY_BOUND)
        recovery = time.monotonic() - last_start
        _assert_all_runs_closed(connector_id)
        _assert_list_exact(k, members)
        _assert_run(latest_run(connector_id), added=100_000, removed=0)
        sends = _max_sends(k, members)
        twice = sum(1 for n in k.sim.submitted_counts(k.account).values() if n > 1)
        # A member is sent again only when a kill lands between Klaviyo accepting its job and
        # us recording the job id (up to ~1 s for a 10,000-profile job under load): at most
        # once per kill, so 1 + 4 = 5 at worst. Measured: 2 or 3 (a batch caught by two kills).
        assert sends <= 1 + len(kills), f"a member was sent {sends} times ({twice} more than once)"
        print(
            f"CHAOS broker={broker} seconds_after_last_start={recovery:.1f} max_sends={sends} "
            f"members_sent_twice={twice} kills_at={kills} runs={_describe(connector_id)}"
        )


def _dispatched(connector_id: str) -> bool:
    runs = _runs(connector_id)
    return bool(runs) and runs[-1].phase != "planning"


def test_poison_pill_batch_fails_its_run_and_the_worker_lives(
    iso_env: dict[str, str], tmp_path: Path, broker: str
) -> None:
    sim = Simulator(job_delay=0.5, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim, **PRODUCTION) as st:
        healthy = st.klaviyo
        poisoned = Klaviyo.new(sim, healthy.base_url)
        worker = st.start_worker(
            beat=False,
            extra_args=["-I", "tests.integration.poison"],
            SEGOPS_TEST_POISON_LIST=poisoned.list_id,
            SEGOPS_DIRECT_ADD_LIMIT="0",  # the fault is in bulk imports: small syncs use them too
        )
        bad_segment, good_segment = new_segment(), new_segment()
        bad = create_connector(poisoned, bad_segment)
        good = create_connector(healthy, good_segment)
        recompute(bad_segment, _members("pp", 50), tmp_path)
        good_members = _members("ok", 50)
        recompute(good_segment, good_members, tmp_path)

        connector = wait_idle(bad, timeout=120)
        budget = Settings.model_fields["worker_lost_budget"].default
        assert connector.status == "error"
        assert connector.last_error and (
            f"killed its worker process {budget} times in a row" in connector.last_error
        ), connector.last_error
        assert f"segops-sync connectors resync {bad}" in connector.last_error
        run = latest_run(bad)
        assert run.status == "failed" and run.error == connector.last_error
        assert worker.log().count("signal 9") >= budget, "the pool process was not killed"
        assert worker.proc is not None and worker.proc.poll() is None, "the worker died"

        wait_idle(good, timeout=60)
        _assert_list_exact(healthy, good_members)
        more = good_members + _members("ok2", 20)  # and it keeps syncing afterwards
        recompute(good_segment, more, tmp_path)
        wait_idle(good, runs_at_least=2, timeout=60)
        _assert_list_exact(healthy, more)
        assert worker.proc.poll() is None
        print(f"POISON broker={broker}: {connector.last_error}")
