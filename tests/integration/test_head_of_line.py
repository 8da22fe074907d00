"""A small change never waits behind a big run's batches, on Redis and on RabbitMQ.

Connector A's first sync queues many bulk batches on ``segops.klaviyo``; a worker with one
pool process takes them one by one, and the simulator's slow jobs keep the run open. While
they wait, connector B (another account) and connector C (A's account, another list) each get
a 5-out/5-in change. Their batches take the small-run lane (sync/lanes.py), so a worker takes
them before A's last batch: both changes are on their lists while A's run is still running.
FIFO behind A's batches, every one of A's batches would have been taken first.

Kombu's Redis transport rotates the queues it polls; RabbitMQ, when the worker's prefetch slot
frees, offers it to the channel's waiting queues in a random order (rabbit_limiter's
notify_queues). There the small changes' steps (recompute, plan, batches, on two queues) are
taken by chance against A's batches, so A queues enough batches that all of them winning is
out of reach: a simulation of those draws put it under 1 in 10,000 with 40 batches, and at
several in 100 with 16 (CI once saw it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select

from segops_sync.celery import SEGOPS_QUEUE, configure
from segops_sync.config import get_settings
from segops_sync.db.models import SyncBatch, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator
from segops_sync.sync.inputs.membership import replace_membership
from tests.conftest import BROKERS, isolated_env
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    wait_idle,
)
from tests.integration.test_crash_recovery import _members, _runs, _wait_for, stack

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("broker", BROKERS, indirect=True)]

BIG_BATCHES = 40  # A's first sync: 40 bulk batches of 10,000


@pytest.fixture
def iso_env(
    segops_env: dict[str, str], pg_server_url: str, broker: str
) -> Iterator[dict[str, str]]:
    with isolated_env(segops_env, pg_server_url, "hol", broker=broker) as env:
        yield env


def _first_attempts(run_id: str) -> list[datetime | None]:
    with session_scope() as s:
        return list(s.scalars(select(SyncBatch.first_attempt_at).where(SyncBatch.run_id == run_id)))


def _offsets(times: Sequence[datetime | None], start: datetime) -> list[float]:
    """The times taken, in seconds after ``start``: a failure's timeline."""
    return [round((at - start).total_seconds(), 2) for at in sorted(filter(None, times))]


def _dispatched_run(connector_id: str) -> str | None:
    runs = _runs(connector_id)
    if runs and runs[-1].phase != "planning" and _first_attempts(runs[-1].id):
        return runs[-1].id
    return None


def _write_members(segment: str, members: list[str], tmp_path: Path) -> None:
    """The segment's new membership, without its recompute message (sent later)."""
    path = tmp_path / f"{segment}-next.txt"
    path.write_text("".join(f"{m}\n" for m in members))
    with session_scope() as s:
        replace_membership(s, segment, str(path))


def _publish_recomputes(segments: list[str]) -> None:
    """The recompute service's messages, back to back, as soon as A's batches are queued."""
    producer = Celery("hol-test-producer")
    configure(producer, get_settings())
    try:
        for segment in segments:
            producer.send_task(
                "segops.recompute_finished",
                kwargs={"segment_id": segment, "recompute_id": f"r-{segment}"},
                queue=SEGOPS_QUEUE,
            )
    finally:
        producer.close()


def _list_of(k: Klaviyo, list_id: str) -> set[str]:
    return {p.external_id or p.email or p.id for p in k.sim.list_members(list_id)}


def test_small_changes_are_synced_while_a_big_first_sync_waits_in_the_queue(
    iso_env: dict[str, str], tmp_path: Path, broker: str
) -> None:
    sim = Simulator(job_delay=120.0, indexing_delay=0.0)  # A's run stays open past the test
    with stack(iso_env, tmp_path, sim) as st:
        a = st.klaviyo
        b = Klaviyo.new(sim, a.base_url)  # another account
        c_list = sim.create_list(a.account, "Synced C")  # A's account
        st.start_worker(beat=False, extra_args=["--concurrency", "1"])

        seg_a, seg_b, seg_c = new_segment(), new_segment(), new_segment()
        a_id = create_connector(a, seg_a)
        b_id = create_connector(b, seg_b)
        c_id = create_connector(a, seg_c, list_id=c_list)
        before_b, before_c = _members("holb", 20), _members("holc", 20)
        recompute(seg_b, before_b, tmp_path)
        recompute(seg_c, before_c, tmp_path)
        wait_idle(b_id, timeout=30)
        wait_idle(c_id, timeout=30)

        after_b = before_b[5:] + _members("holbn", 5)
        after_c = before_c[5:] + _members("holcn", 5)
        _write_members(seg_b, after_b, tmp_path)
        _write_members(seg_c, after_c, tmp_path)

        recompute(seg_a, _members("hola", BIG_BATCHES * 10_000), tmp_path)
        a_run = _wait_for("A's batches queued", lambda: _dispatched_run(a_id), 30)
        _publish_recomputes([seg_b, seg_c])

        # Seconds here; the bounds leave a loaded CI host room (the order below is the check).
        wait_idle(b_id, runs_at_least=2, timeout=90)
        wait_idle(c_id, runs_at_least=2, timeout=90)
        # on their lists, exactly, while A's run is still running
        assert _list_of(b, b.list_id) == set(after_b)
        assert _list_of(a, c_list) == set(after_c)
        assert latest_run(a_id).status == "running"
        assert latest_run(a_id).id == a_run

        small = [at for cid in (b_id, c_id) for at in _first_attempts(latest_run(cid).id) if at]
        big = _first_attempts(a_run)
        assert len(big) == BIG_BATCHES and len(small) == 4  # 1 add + 1 removal batch each
        last_small = max(small)
        # taken ahead of A's batches still waiting: some were first taken after both changes'
        later = [at for at in big if at is None or at > last_small]
        first = min(filter(None, big))
        assert later, (
            "every batch of A was taken before the small changes' batches; seconds after A's "
            f"first: A's {_offsets(big, first)}, the small changes' {_offsets(small, first)}"
        )
        with session_scope() as s:
            statuses = set(
                s.scalars(select(SyncRun.status).where(SyncRun.connector_id.in_([b_id, c_id])))
            )
        assert statuses == {"succeeded"}
