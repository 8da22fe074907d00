"""A recompute flows to a delta, batches, a chord and last_synced_at, on the real stack."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from segops_sync.db.session import session_scope
from tests.conftest import BROKERS
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    cli,
    cli_json,
    create_connector,
    expected_identity,
    latest_run,
    new_segment,
    recompute,
    run_count,
    wait_idle,
)

# Every test here runs on Redis and on RabbitMQ as the broker.
pytestmark = pytest.mark.parametrize("broker", BROKERS, indirect=True)


def _segment_members(n_email: int, n_other: int, prefix: str) -> list[str]:
    return [f"{prefix}-e{i}@example.com" for i in range(n_email)] + [
        f"{prefix}-u{i}" for i in range(n_other)
    ]


def _assert_list_is(k: Klaviyo, members: list[str], identified: dict[str, str]) -> None:
    on_list = k.members()
    assert set(on_list) == set(members), (
        f"missing {sorted(set(members) - set(on_list))[:5]}, extra {sorted(set(on_list) - set(members))[:5]}"
    )
    for user_id in members:
        email, external_id = expected_identity(user_id, identified)
        profile = on_list[user_id]
        assert profile.email == email, user_id
        assert profile.external_id == external_id, user_id


def test_lifecycle_inactive_active_deactivated(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment, activate=False)
    assert cli_json("connectors", "show", connector_id)["status"] == "inactive"

    recompute(segment, ["a@example.com", "b@example.com"], tmp_path)
    time.sleep(3)
    assert run_count(connector_id) == 0
    writes = [r for r in klaviyo.requests() if r.method != "GET"]
    assert writes == [], "an inactive connector wrote to Klaviyo"

    cli("connectors", "activate", connector_id, check=True)
    recompute(segment, ["a@example.com", "b@example.com", "c@example.com"], tmp_path)
    connector = wait_idle(connector_id)
    assert connector.status == "active" and connector.last_synced_at is not None
    _assert_list_is(klaviyo, ["a@example.com", "b@example.com", "c@example.com"], {})

    cli("connectors", "deactivate", connector_id, check=True)
    before = len(klaviyo.requests())
    recompute(segment, ["a@example.com"], tmp_path)
    time.sleep(3)
    assert run_count(connector_id) == 1
    assert len(klaviyo.requests()) == before
    assert set(klaviyo.members()) == {"a@example.com", "b@example.com", "c@example.com"}


def test_300_members_then_churn_sync_exactly(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    segment = new_segment()
    prefix = uuid.uuid4().hex[:6]
    members = _segment_members(120, 180, prefix)
    identified = {f"{prefix}-u{i}": f"{prefix}-known{i}@shop.example" for i in range(0, 180, 2)}
    for user_id, email in list(identified.items())[:5]:
        cli("identify", user_id, "--email", email, check=True)
    with session_scope() as s:  # the rest as the event pipeline records them
        for user_id, email in list(identified.items())[5:]:
            s.execute(
                text("INSERT INTO identities (user_id, email) VALUES (:u, :e)"),
                {"u": user_id, "e": email},
            )
    connector_id = create_connector(klaviyo, segment)

    recompute(segment, members, tmp_path)
    connector = wait_idle(connector_id)
    assert connector.status == "active", connector.last_error
    _assert_list_is(klaviyo, members, identified)
    run = latest_run(connector_id)
    assert (run.status, run.added, run.removed, run.rejected) == ("succeeded", 300, 0, 0)

    leavers = members[:45] + members[200:245]  # 90 leave: emails and external ids
    joiners = _segment_members(40, 80, prefix + "n")  # 120 join
    churned = [m for m in members if m not in set(leavers)] + joiners
    left_profiles = {klaviyo.members()[u].id for u in leavers}
    recompute(segment, churned, tmp_path)
    wait_idle(connector_id, runs_at_least=2)
    _assert_list_is(klaviyo, churned, identified)
    run = latest_run(connector_id)
    assert (run.status, run.added, run.removed) == ("succeeded", 120, 90)
    for profile_id in left_profiles:
        assert klaviyo.sim.profile(profile_id) is not None, "a leaver's profile was deleted"
    assert klaviyo.sim.subscription_calls() == 0


def test_send_task_path_syncs_like_the_cli(
    worker: WorkerProcess, klaviyo: Klaviyo, stack_env: dict[str, str]
) -> None:
    # The recompute service has a Celery app of its own that knows nothing of our tasks.
    from celery import Celery

    app = Celery("recompute-service", broker=stack_env["SEGOPS_BROKER_URL"])
    app.conf.broker_transport_options = {"global_keyprefix": stack_env["SEGOPS_REDIS_KEY_PREFIX"]}

    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    members = [f"st{i}@example.com" for i in range(25)] + [f"st-{i}" for i in range(25)]
    with session_scope() as s:
        s.execute(text("DELETE FROM segment_members WHERE segment_id = :s"), {"s": segment})
        for m in members:
            s.execute(text("INSERT INTO segment_members VALUES (:s, :u)"), {"s": segment, "u": m})
    app.send_task(
        "segops.recompute_finished",
        kwargs={"segment_id": segment, "recompute_id": "r-1"},
        queue="segops",
    )
    wait_idle(connector_id)
    _assert_list_is(klaviyo, members, {})


def test_manual_resync_with_celery_call_and_cli_wait(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, ["r1@example.com"], tmp_path)
    wait_idle(connector_id)
    # Membership changes without a recompute message: only a manual re-sync picks it up.
    with session_scope() as s:
        s.execute(text("INSERT INTO segment_members VALUES (:s, 'r2@example.com')"), {"s": segment})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "segops_sync",
            "call",
            "segops.sync_connector",
            f'--args=["{connector_id}"]',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=worker.env,
    )
    assert result.returncode == 0, result.stderr
    wait_idle(connector_id, runs_at_least=2)
    assert set(klaviyo.members()) == {"r1@example.com", "r2@example.com"}

    with session_scope() as s:
        s.execute(text("INSERT INTO segment_members VALUES (:s, 'r3@example.com')"), {"s": segment})
    result = cli("connectors", "resync", connector_id, "--wait")
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout
    assert set(klaviyo.members()) == {"r1@example.com", "r2@example.com", "r3@example.com"}
    history = cli_json("connectors", "history", connector_id)
    assert [h["trigger"] for h in history] == ["resync", "resync", "recompute"]
    # the contract's fields, at least (updated, traits_dropped, suppressed, verify, ... come too)
    assert set(history[0]) >= {
        "id",
        "connector_id",
        "trigger",
        "started_at",
        "finished_at",
        "status",
        "added",
        "removed",
        "rejected",
        "error",
    }


def test_key_and_list_problems_set_error_then_recover(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    sim = klaviyo.sim
    # 1. a key Klaviyo rejects, saved with --no-verify
    bogus = "pk_" + uuid.uuid4().hex + "beef"
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment, api_key=bogus, verify=False)
    recompute(segment, ["k1@example.com", "k2@example.com"], tmp_path)
    connector = wait_idle(connector_id)
    assert connector.status == "error"
    assert connector.last_error and "API key" in connector.last_error
    assert bogus not in connector.last_error and bogus[3:] not in connector.last_error

    # after an update with a good key the next sync succeeds and the status is active again
    # (the update starts a resync itself; the recompute is served by it or the run after it)
    cli("connectors", "update", connector_id, "--api-key", klaviyo.api_key, check=True)
    recompute(segment, ["k1@example.com", "k2@example.com"], tmp_path)
    connector = wait_idle(connector_id, runs_at_least=2)
    assert (connector.status, connector.last_error) == ("active", None)
    assert set(klaviyo.members()) == {"k1@example.com", "k2@example.com"}

    # 2. a key revoked mid-life
    sim.revoke_key(klaviyo.api_key)
    done = run_count(connector_id)
    recompute(segment, ["k1@example.com", "k3@example.com"], tmp_path)
    connector = wait_idle(connector_id, runs_at_least=done + 1)
    assert connector.status == "error"
    assert connector.last_error and "revoked" in connector.last_error
    assert klaviyo.api_key not in connector.last_error
    fresh_key = sim.create_key(klaviyo.account)
    done = run_count(connector_id)
    cli("connectors", "update", connector_id, "--api-key", fresh_key, check=True)
    recompute(segment, ["k1@example.com", "k3@example.com"], tmp_path)
    connector = wait_idle(connector_id, runs_at_least=done + 1)
    assert connector.status == "active"
    assert set(klaviyo.members()) == {"k1@example.com", "k3@example.com"}

    # 3. a list id that differs only in case
    wrong_case = klaviyo.list_id.swapcase()
    segment2 = new_segment()
    other = create_connector(klaviyo, segment2, api_key=fresh_key, list_id=wrong_case, verify=False)
    recompute(segment2, ["l1@example.com"], tmp_path)
    connector = wait_idle(other)
    assert connector.status == "error"
    assert connector.last_error and wrong_case in connector.last_error
    assert fresh_key not in connector.last_error


def test_preview_shows_the_delta_without_touching_klaviyo(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, ["p1@example.com", "p2@example.com"], tmp_path)
    wait_idle(connector_id)
    with session_scope() as s:  # membership changes; no message yet
        s.execute(
            text(
                "DELETE FROM segment_members WHERE segment_id = :s AND user_id = 'p1@example.com'"
            ),
            {"s": segment},
        )
        s.execute(
            text("INSERT INTO segment_members VALUES (:s, 'p3'), (:s, 'p4@example.com')"),
            {"s": segment},
        )
    requests_before = len(klaviyo.requests())
    doc = cli_json("connectors", "preview", connector_id)
    assert (doc["adds"], doc["removes"]) == (2, 1)
    assert {r["user_id"] for r in doc["sample_adds"]} == {"p3", "p4@example.com"}
    assert [r["user_id"] for r in doc["sample_removes"]] == ["p1@example.com"]
    assert len(klaviyo.requests()) == requests_before
    assert run_count(connector_id) == 1


def test_context_identified_message_gives_opaque_ids_their_email(
    worker: WorkerProcess, klaviyo: Klaviyo, stack_env: dict[str, str], tmp_path: Path
) -> None:
    from celery import Celery

    app = Celery("event-pipeline", broker=stack_env["SEGOPS_BROKER_URL"])
    app.conf.broker_transport_options = {"global_keyprefix": stack_env["SEGOPS_REDIS_KEY_PREFIX"]}
    user = f"ci-{uuid.uuid4().hex[:6]}"
    # two events, one after the other: the later trait replaces the earlier one
    for email in ("old@example.com", "latest@example.com"):
        app.send_task(
            "segops.context_identified",
            kwargs={"user_id": user, "traits": {"email": email, "plan": "pro"}},
            queue="segops",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with session_scope() as s:
                stored = s.scalar(
                    text("SELECT email FROM identities WHERE user_id = :u"), {"u": user}
                )
            if stored == email:
                break
            time.sleep(0.1)
        assert stored == email
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, [user], tmp_path)
    wait_idle(connector_id)
    profile = klaviyo.members()[user]
    assert (profile.email, profile.external_id) == ("latest@example.com", user)


def test_a_fixed_key_clears_the_error_and_the_update_starts_a_resync(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    sim = klaviyo.sim
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, ["fx1@example.com"], tmp_path)
    first = wait_idle(connector_id)
    assert first.last_synced_at is not None

    sim.revoke_key(klaviyo.api_key)
    recompute(segment, ["fx1@example.com", "fx2@example.com"], tmp_path)
    broken = wait_idle(connector_id, runs_at_least=2)
    assert broken.status == "error" and broken.last_error and "revoked" in broken.last_error

    fresh_key = sim.create_key(klaviyo.account)
    result = cli("connectors", "update", connector_id, "--api-key", fresh_key, check=True)
    assert "a resync is pending" in result.stdout, result.stdout
    # no recompute: the update itself brings the list up to date
    fixed = wait_idle(connector_id, runs_at_least=3)
    assert (fixed.status, fixed.last_error) == ("active", None)
    assert fixed.last_synced_at is not None and fixed.last_synced_at > first.last_synced_at
    assert set(klaviyo.members()) == {"fx1@example.com", "fx2@example.com"}
    assert latest_run(connector_id).trigger == "resync"
    shown = cli_json("connectors", "show", connector_id)
    assert (shown["status"], shown["last_error"]) == ("active", None)

    # a key change on a healthy connector needs no resync, and says none
    again = cli("connectors", "update", connector_id, "--api-key", fresh_key, check=True)
    assert "resync" not in again.stdout
