"""Personal data stays where it belongs and leaves on time, on the real stack.

One worker (and a Flower watching it) per log format serves the module: a ``context_identified``
message from an outside producer, one whose row the database refuses (its error and traceback
quote the row), then every place that could show them is searched for the member's email,
phone, name and user ids: Flower's task views, the result backend, every log line. Then the
retention purge: member details of runs older than SEGOPS_RETENTION_DAYS go, those of recent
or running runs and the live state stay, and the snapshot of a verification killed mid-read
goes while a live one stays.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from sqlalchemy import text

from segops_sync.celery import SEGOPS_QUEUE, configure
from segops_sync.config import get_settings
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator, SimulatorServer
from tests.conftest import isolated_env
from tests.integration.conftest import FlowerProcess, WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    new_segment,
    recompute,
    redis_texts,
    wait_idle,
)


@dataclass
class Stack:
    log_format: str
    env: dict[str, str]
    sim: Simulator
    base_url: str
    worker: WorkerProcess
    flower: FlowerProcess
    # every identifier of a person this module sent, for the searches
    identifiers: set[str] = field(default_factory=set)

    def klaviyo(self) -> Klaviyo:
        return Klaviyo.new(self.sim, self.base_url)


@pytest.fixture(scope="module", params=["json", "text"])
def stack(
    request: pytest.FixtureRequest,
    segops_env: dict[str, str],
    pg_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    log_format = str(request.param)
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    server = SimulatorServer(sim)
    server.start()
    overrides = {"SEGOPS_KLAVIYO_BASE_URL": server.base_url, "SEGOPS_LOG_FORMAT": log_format}
    try:
        with isolated_env(segops_env, pg_server_url, f"pd{log_format}", **overrides) as env:
            worker = WorkerProcess(env, tmp_path_factory.mktemp("pd-worker"), beat=False)
            worker.start()
            flower = FlowerProcess(env, tmp_path_factory.mktemp("pd-flower"))
            try:
                flower.start()
                _until_flower_follows_events(flower)
                yield Stack(log_format, env, sim, server.base_url, worker, flower)
            finally:
                flower.stop()
                worker.stop()
    finally:
        server.stop()


def _send(task: str, *, kwargs: dict[str, Any], **options: Any) -> str:
    """Publish as an outside producer does: its own Celery app, its own argsrepr (in clear)."""
    from celery import Celery

    producer = Celery("pd-test-producer")
    configure(producer, get_settings())
    producer.conf.task_send_sent_event = False  # the recompute service sends no events
    try:
        return str(producer.send_task(task, kwargs=kwargs, queue=SEGOPS_QUEUE, **options).id)
    finally:
        producer.close()


def _until_flower_follows_events(flower: FlowerProcess) -> None:
    """Flower answers HTTP before it has joined the event stream: a task sent before then is
    seen in part (its success without its name and arguments). Send a task that carries no data
    until Flower shows one whole."""

    def shown(task_id: str) -> None:
        response = httpx.get(f"{flower.url}/api/task/info/{task_id}", timeout=10)
        response.raise_for_status()
        doc = response.json()
        assert (doc.get("name"), doc.get("state")) == ("segops.sweep_runs", "SUCCESS"), doc

    deadline = time.monotonic() + 60
    while True:
        task_id = _send("segops.sweep_runs", kwargs={})
        try:
            _eventually(lambda sent=task_id: shown(sent), timeout=5)
            return
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise


def _eventually(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _spellings(identifiers: set[str]) -> set[str]:
    """Each identifier as a log line, a URL, JSON or HTML would spell it."""
    out: set[str] = set()
    for ident in identifiers:
        out |= {ident, ident.lower(), quote(ident, safe=""), quote_plus(ident), escape(ident)}
        out.add(json.dumps(ident)[1:-1])
        if "@" in ident:
            out.add(ident.split("@")[0])  # the local part alone
    return out


def _leaks(texts: list[str], identifiers: set[str]) -> list[str]:
    spellings = _spellings(identifiers)
    return sorted({s for chunk in texts for s in spellings if s in chunk})


def _person(token: str) -> tuple[str, dict[str, Any]]:
    email = f"zelda.{token}@example.com"
    traits = {
        "email": email,
        "phone_number": f"+1415555{int(token[:4], 16) % 10000:04d}",
        "first_name": f"Zelda{token}",
    }
    return email, traits


# -- 1. task arguments: Flower and the result backend -----------------------------------------


def test_context_identified_arguments_are_masked_in_flower_and_the_result_backend(
    stack: Stack,
) -> None:
    token = uuid.uuid4().hex[:8]
    user_email, traits = _person(token)
    opaque_user = f"cust-{token}"
    refused_email = f"refused.{token}@example.com"
    refused_traits: dict[str, Any] = {
        "email": refused_email,
        "phone_number": "+14155550199",
        "last_name": f"Refused{token}",
        "refuse_me": True,
    }
    stack.identifiers |= {
        user_email,
        traits["phone_number"],
        traits["first_name"],
        opaque_user,
        refused_email,
        refused_traits["phone_number"],
        refused_traits["last_name"],
    }
    # The database refuses this member's row: its error quotes the row, its traceback too.
    with session_scope() as s:
        s.execute(
            text(
                "ALTER TABLE identities DROP CONSTRAINT IF EXISTS test_refuses; "
                "ALTER TABLE identities ADD CONSTRAINT test_refuses "
                "CHECK (NOT (traits ? 'refuse_me'))"
            )
        )
    # the user id is an email; the producer asks for the result to be stored (args and all)
    ok_id = _send(
        "segops.context_identified",
        kwargs={"user_id": user_email, "traits": traits},
        ignore_result=False,
    )
    failed_id = _send(
        "segops.context_identified",
        kwargs={"user_id": opaque_user, "traits": refused_traits},
        ignore_result=False,
    )

    def finished(task_id: str, state: str) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(
            f"{stack.flower.url}/api/task/info/{task_id}", timeout=10
        ).json()
        assert doc.get("state") == state, doc
        return doc

    ok = _eventually(lambda: finished(ok_id, "SUCCESS"))
    failed = _eventually(lambda: finished(failed_id, "FAILURE"))
    with session_scope() as s:
        stored = s.execute(
            text("SELECT email FROM identities WHERE user_id = :u"), {"u": user_email}
        ).scalar_one()
        refused = s.scalar(
            text("SELECT count(*) FROM identities WHERE user_id = :u"), {"u": opaque_user}
        )
    assert (stored, refused) == (user_email, 0)  # the worker saw the data it needed

    # Flower shows what was sent, by name, never its values
    assert ok["kwargs"] == "{'user_id': '[redacted]', 'traits': '[redacted]'}", ok
    assert "CheckViolation" in failed["exception"], failed
    shown = [
        json.dumps(ok),
        json.dumps(failed),
        httpx.get(f"{stack.flower.url}/api/tasks", timeout=10).text,
    ]
    for task_id in (ok_id, failed_id):
        page = httpx.get(f"{stack.flower.url}/task/{task_id}", timeout=10)
        assert page.status_code == 200
        assert task_id in page.text
        shown.append(page.text)
    assert _leaks(shown, stack.identifiers) == [], "member data in Flower"

    # nothing of them in the result backend, whatever the message asked for
    backend = list(
        redis_texts(stack.env["SEGOPS_RESULT_BACKEND"], stack.env["SEGOPS_REDIS_KEY_PREFIX"])
    )
    assert _leaks(backend, stack.identifiers) == [], "member data in the result backend"


# -- 2. retention ----------------------------------------------------------------------------


def _purge_and_wait(stack: Stack, done: Any) -> None:
    """Send the beat's purge task (the beat runs it every 10 minutes) until ``done`` holds."""
    _send("segops.purge_expired", kwargs={})
    _eventually(done)


def _count(sql: str, **params: Any) -> int:
    with session_scope() as s:
        return int(s.scalar(text(sql), params) or 0)


def test_member_details_leave_after_the_retention_days_and_live_state_stays(
    stack: Stack, tmp_path: Path
) -> None:
    k = stack.klaviyo()
    segment = new_segment()
    token = uuid.uuid4().hex[:6]
    members = [f"ret.{token}.{i}@example.com" for i in range(40)]
    stack.identifiers |= set(members)
    connector = create_connector(k, segment)
    recompute(segment, members[:30], tmp_path)
    wait_idle(connector)
    recompute(segment, members[10:], tmp_path)  # 10 leave, 10 join
    wait_idle(connector, runs_at_least=2)
    with session_scope() as s:
        old, recent = s.scalars(
            text(
                "SELECT id FROM sync_runs WHERE connector_id = :c AND status = 'succeeded' "
                "ORDER BY started_at"
            ),
            {"c": connector},
        ).all()[:2]
        # the first run finished 31 days ago, the second 29 (SEGOPS_RETENTION_DAYS: 30)
        s.execute(
            text(
                "UPDATE sync_runs SET started_at = now() - make_interval(days => :d), "
                "finished_at = now() - make_interval(days => :d) WHERE id = :r"
            ),
            [{"d": 31, "r": old}, {"d": 29, "r": recent}],
        )
        # a run of another connector still running, started 40 days ago (stuck, say)
        running_connector = create_connector(stack.klaviyo(), new_segment(), activate=False)
        running = str(uuid.uuid4())
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status, started_at) "
                "VALUES (:r, :c, 'resync', 'running', now() - interval '40 days')"
            ),
            {"r": running, "c": running_connector},
        )
        s.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email) "
                "VALUES (:r, :u, 'add', 0, :u)"
            ),
            [{"r": running, "u": m} for m in members[:5]],
        )
        # a failed run 40 days old whose batch sent members with no recorded outcome: the
        # connector's next run needs its items (it enters them in the ledger)
        in_doubt = str(uuid.uuid4())
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status, started_at, "
                "finished_at) VALUES (:r, :c, 'resync', 'failed', now() - interval '40 days', "
                "now() - interval '40 days')"
            ),
            {"r": in_doubt, "c": running_connector},
        )
        s.execute(
            text(
                "INSERT INTO sync_batches (run_id, kind, seq, status, in_doubt, sent_at) "
                "VALUES (:r, 'add', 0, 'failed', true, now() - interval '40 days')"
            ),
            {"r": in_doubt},
        )
        s.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email) "
                "VALUES (:r, :u, 'add', 0, :u)"
            ),
            [{"r": in_doubt, "u": m} for m in members[5:8]],
        )
    before = {
        "old": _count("SELECT count(*) FROM sync_batch_items WHERE run_id = :r", r=old),
        "recent": _count("SELECT count(*) FROM sync_batch_items WHERE run_id = :r", r=recent),
        "ledger": _count(
            "SELECT count(*) FROM connector_members WHERE connector_id = :c", c=connector
        ),
    }
    assert before["old"] == 30 and before["recent"] == 20 and before["ledger"] == 30

    def purged() -> None:
        assert _count(
            "SELECT count(*) FROM sync_runs WHERE id = :r AND purged_at IS NOT NULL", r=old
        )

    _purge_and_wait(stack, purged)
    assert _count("SELECT count(*) FROM sync_batch_items WHERE run_id = :r", r=old) == 0
    assert (
        _count(
            "SELECT count(*) FROM sync_batches WHERE run_id = :r AND (user_ids IS NOT NULL "
            "OR lo_user_id IS NOT NULL OR hi_user_id IS NOT NULL)",
            r=old,
        )
        == 0
    )
    # the run's counts stay in the history
    assert _count("SELECT added FROM sync_runs WHERE id = :r", r=old) == 30
    # a recent run, a running one and the live state are untouched
    assert _count("SELECT count(*) FROM sync_batch_items WHERE run_id = :r", r=recent) == 20
    assert _count("SELECT count(*) FROM sync_batch_items WHERE run_id = :r", r=running) == 5
    assert _count("SELECT count(*) FROM sync_batch_items WHERE run_id = :r", r=in_doubt) == 3
    assert (
        _count(
            "SELECT count(*) FROM sync_runs WHERE id IN (:a, :b, :c) AND purged_at IS NULL",
            a=recent,
            b=running,
            c=in_doubt,
        )
        == 3
    )
    assert (
        _count("SELECT count(*) FROM connector_members WHERE connector_id = :c", c=connector)
        == before["ledger"]
    )
    assert sorted(k.members()) == sorted(members[10:])


def test_the_snapshot_of_a_killed_verification_goes_and_a_live_one_stays(
    stack: Stack, tmp_path: Path
) -> None:
    from segops_sync.sync.retention import snapshot_lease

    k = stack.klaviyo()
    segment = new_segment()
    token = uuid.uuid4().hex[:6]
    members = [f"snap.{token}.{i}@example.com" for i in range(450)]
    stack.identifiers |= set(members)
    connector = create_connector(k, segment)
    recompute(segment, members, tmp_path)
    wait_idle(connector)

    # a live verification: its lease is held (here, by this test) while its snapshot exists
    live = str(uuid.uuid4())
    with snapshot_lease(live):
        with session_scope() as s:
            s.execute(
                text(
                    "INSERT INTO list_snapshots (verify_id, profile_id, connector_id, email) "
                    "VALUES (:v, :p, :c, :e)"
                ),
                [
                    {"v": live, "p": f"p{i}", "c": connector, "e": m}
                    for i, m in enumerate(members[:3])
                ],
            )
        # `connectors verify` killed halfway through reading the list (pages answer slowly)
        stack.sim.set_faults(latency=0.5)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "segops_sync.cli", "connectors", "verify", connector],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=os.environ.copy(),
            )

            def half_read() -> None:
                n = _count(
                    "SELECT count(*) FROM list_snapshots WHERE connector_id = :c "
                    "AND verify_id <> :v",
                    c=connector,
                    v=live,
                )
                assert n >= 100, n

            _eventually(half_read)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            stack.sim.set_faults()
        left = _count(
            "SELECT count(*) FROM list_snapshots WHERE connector_id = :c AND verify_id <> :v",
            c=connector,
            v=live,
        )
        assert 100 <= left < 450, left

        def crashed_snapshot_gone() -> None:
            assert (
                _count(
                    "SELECT count(*) FROM list_snapshots WHERE connector_id = :c "
                    "AND verify_id <> :v",
                    c=connector,
                    v=live,
                )
                == 0
            )

        _purge_and_wait(stack, crashed_snapshot_gone)
        # the live verification's snapshot is still there
        assert _count("SELECT count(*) FROM list_snapshots WHERE verify_id = :v", v=live) == 3
    with session_scope() as s:
        s.execute(text("DELETE FROM list_snapshots WHERE verify_id = :v"), {"v": live})


# -- 3. the worker's log, exceptions included (last: it covers everything above) ---------------


def test_zz_no_log_line_holds_member_data_tracebacks_included(stack: Stack) -> None:
    raw = stack.worker.log()
    if stack.log_format == "json":
        records = [json.loads(line) for line in raw.splitlines()]
        failures = [r for r in records if "exc_info" in r]
        assert failures, "the refused row's failure is logged with its traceback"
        assert any("CheckViolation" in r["exc_info"] for r in failures)
    else:
        assert "Traceback (most recent call last)" in raw
        assert "CheckViolation" in raw
    # the SQL error names its statement, never its values
    assert "SQL parameters hidden due to hide_parameters=True" in raw
    assert "DETAIL:  [redacted]" in raw
    assert len(stack.identifiers) >= 7
    assert _leaks([raw], stack.identifiers) == [], "member data in the worker log"
