"""Pause mid-sync and resume, on the real stack, on Redis and on RabbitMQ as the broker.

A first sync of 300 members takes the synchronous path in three batches of 100; a worker with
one pool process runs them one after the other, and the simulator's latency makes each last
a few seconds. Paused once the first batch is done, the run stops at a batch boundary and ends
``cancelled``: the batch then running stops before its list write and the last one at its
start, so the Klaviyo list holds the first batch alone, exactly the ledger's confirmed
members. A recompute while paused starts nothing; resuming runs one sync that completes the list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from segops_sync.config import get_settings
from segops_sync.connectors import create_connector as create
from segops_sync.db.models import Connector, LedgerEntry, SyncBatch, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator
from segops_sync.states import ConnectorStatus
from tests.conftest import BROKERS, isolated_env
from tests.integration.helpers import (
    cli,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    run_count,
    wait_idle,
)
from tests.integration.test_crash_recovery import _assert_list_exact, _members, _wait_for, stack

pytestmark = pytest.mark.slow

MEMBERS = 300  # three synchronous batches of 100 (under the 337 cut-over)
BATCH = 100
LATENCY = 0.03  # per request: a batch's 100 upserts take over 3 s


@pytest.fixture
def iso_env(
    segops_env: dict[str, str], pg_server_url: str, broker: str
) -> Iterator[dict[str, str]]:
    with isolated_env(segops_env, pg_server_url, "pause", broker=broker) as env:
        yield env


def _run_with_a_batch_done(connector_id: str) -> str | None:
    with session_scope() as s:
        return s.scalar(
            select(SyncRun.id)
            .join(SyncBatch, SyncBatch.run_id == SyncRun.id)
            .where(
                SyncRun.connector_id == connector_id,
                SyncRun.status == "running",
                SyncBatch.status == "done",
            )
            .limit(1)
        )


def _confirmed(connector_id: str) -> set[str]:
    with session_scope() as s:
        return set(
            s.scalars(
                select(LedgerEntry.user_id).where(
                    LedgerEntry.connector_id == connector_id, LedgerEntry.confirmed
                )
            )
        )


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_pause_mid_sync_keeps_the_ledger_exact_and_resume_catches_up(
    iso_env: dict[str, str], tmp_path: Path, broker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from segops_sync.cli import main

    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim) as st:
        k = st.klaviyo
        st.start_worker(extra_args=["--concurrency", "1"])
        segment = new_segment()
        connector_id = create_connector(k, segment)
        members = _members("pz", MEMBERS)
        sim.set_faults(latency=LATENCY)
        recompute(segment, members, tmp_path)
        run_id = _wait_for("a first batch done", lambda: _run_with_a_batch_done(connector_id), 60)

        # in this process: a new one would take seconds to start on a loaded machine
        assert main(["connectors", "pause", connector_id]) == 0
        assert f"sync {run_id} stops at its next batch boundary" in capsys.readouterr().out
        wait_idle(connector_id, timeout=60)
        run = latest_run(connector_id)
        assert (run.id, run.status, run.trigger) == (run_id, "cancelled", "recompute"), run.error
        confirmed = _confirmed(connector_id)
        assert set(k.members()) == confirmed  # the ledger is exactly what Klaviyo has
        # the batch running when the pause landed stopped before its list write (its upserts
        # take seconds), the last one at its start: only the first batch reached the list
        assert len(confirmed) == BATCH, "the pause did not stop the sync at a batch boundary"
        assert run.added == len(confirmed)
        with session_scope() as s:
            connector = s.get_one(Connector, connector_id)
            assert (connector.status, connector.last_error) == ("paused", None)

        sim.set_faults()
        recompute(segment, members, tmp_path)  # ignored while paused
        _wait_for(
            "the recompute ignored",
            lambda: f"connector {connector_id}: recompute trigger -> paused" in st.worker_log(),
            30,
        )
        assert run_count(connector_id) == 1

        resumed = cli("connectors", "resume", connector_id, check=True)
        assert "catches up" in resumed.stdout
        wait_idle(connector_id, runs_at_least=2, timeout=60)
        run = latest_run(connector_id)
        assert (run.trigger, run.status, run.added) == (
            "resume",
            "succeeded",
            MEMBERS - len(confirmed),
        ), run.error
        assert run_count(connector_id) == 2
        _assert_list_exact(k, members)
        assert _confirmed(connector_id) == set(members)


def test_bad_pause_and_resume_exit_2_and_change_nothing(
    segops_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI in this process (the unknown id, in a fresh one, is in test_cli_input.py)."""
    from segops_sync.cli import main

    ids = []
    for status in (ConnectorStatus.INACTIVE, ConnectorStatus.ACTIVE):
        with session_scope() as s:
            connector, _ = create(
                s,
                get_settings(),
                segment_id=new_segment(),
                list_id="PaU5e1",
                api_key="pk_pause0000000000",
                verify=False,
            )
            connector.status = status
            ids.append(connector.id)
    inactive, active = ids

    def refused(*args: str) -> str:
        assert main(["connectors", *args]) == 2
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert out.out == "" and len(lines) == 1, out
        return lines[0]

    assert "is inactive" in refused("pause", inactive)
    assert "is not paused" in refused("resume", active)
    assert main(["connectors", "pause", active]) == 0
    assert "is paused; recomputes are ignored" in capsys.readouterr().out
    assert "is paused: resume it first" in refused("resync", active)
    assert "is paused: resume it instead" in refused("activate", active)
    with session_scope() as s:
        statuses = [s.get_one(Connector, c).status for c in ids]
        runs = s.scalar(
            select(func.count()).select_from(SyncRun).where(SyncRun.connector_id == active)
        )
    assert (statuses, runs) == (["inactive", "paused"], 0)
