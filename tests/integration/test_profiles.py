"""On the real stack: traits marketing can use, a list read back and repaired,
consent pre-flight, rejected members one by one (CLI processes, a worker, the simulator)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from sqlalchemy import text

from segops_sync.db.session import session_scope
from segops_sync.klaviyo import Endpoint
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    cli,
    cli_json,
    create_connector,
    new_segment,
    recompute,
    wait_idle,
)
from tests.integration.test_api import api


@pytest.fixture(scope="module")
def producer(redis_stack_env: dict[str, str]) -> Iterator[Celery]:
    """The event pipeline: a Celery app of its own that knows nothing of our tasks."""
    app = Celery("event-pipeline", broker=redis_stack_env["SEGOPS_BROKER_URL"])
    app.conf.broker_transport_options = {
        "global_keyprefix": redis_stack_env["SEGOPS_REDIS_KEY_PREFIX"]
    }
    yield app
    app.close()


__all__ = ["api"]  # the API fixture, served once per module


def _identify(producer: Celery, user_id: str, traits: dict[str, Any]) -> None:
    producer.send_task(
        "segops.context_identified", kwargs={"user_id": user_id, "traits": traits}, queue="segops"
    )


def _wait_traits(user_id: str, traits: dict[str, Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            stored = s.scalar(
                text("SELECT traits FROM identities WHERE user_id = :u"), {"u": user_id}
            )
        if stored == traits:
            return
        time.sleep(0.2)
    raise AssertionError(f"context_identified for {user_id} was not stored: {stored}")


def _wait_for(check: Any, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f}s"
        time.sleep(0.5)


def _profile(k: Klaviyo, user_id: str) -> Any:
    return k.members()[user_id]


def _create(k: Klaviyo, segment: str, *extra: str) -> tuple[str, str]:
    result = cli(
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        segment,
        "--list-id",
        k.list_id,
        "--api-key",
        k.api_key,
        *extra,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    cli("connectors", "activate", doc["id"], check=True)
    return str(doc["id"]), result.stderr


def test_traits_reach_klaviyo_refused_values_dropped_changes_resent(
    worker: WorkerProcess, klaviyo: Klaviyo, producer: Celery, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    ann, bob, cy = f"{tag}-ann", f"{tag}-bob", f"{tag}-cy@example.com"
    segment = new_segment()
    connector_id, _ = _create(klaviyo, segment, "--traits", "first_name,phone_number,plan")
    doc = cli_json("connectors", "show", connector_id)
    assert doc["traits"] == ["first_name", "phone_number", "plan"]

    traits: dict[str, dict[str, Any]] = {
        ann: {
            "email": f"{ann}@example.com",
            "first_name": "Ann",
            "last_name": "Not named",
            "phone_number": "+14155552671",
            "plan": "pro",
        },
        bob: {"email": f"{bob}@example.com", "first_name": "Bob", "phone_number": "555-0100"},
        cy: {"first_name": "Cy", "plan": {"tier": 2, "seats": [1, 2]}},
    }
    for user_id, t in traits.items():
        _identify(producer, user_id, t)
    for user_id, t in traits.items():
        _wait_traits(user_id, t)
    recompute(segment, [ann, bob, cy], tmp_path)
    wait_idle(connector_id)

    a = _profile(klaviyo, ann).attributes
    assert (a["email"], a["first_name"], a["phone_number"]) == (
        f"{ann}@example.com",
        "Ann",
        "+14155552671",
    )
    assert a["properties"] == {"plan": "pro"} and "last_name" not in a  # only named traits
    b = _profile(klaviyo, bob).attributes
    assert b["first_name"] == "Bob" and "phone_number" not in b  # refused, left out, still joined
    c = _profile(klaviyo, cy).attributes
    assert c["first_name"] == "Cy" and c["properties"] == {"plan": {"tier": 2, "seats": [1, 2]}}
    [run] = cli_json("connectors", "history", connector_id)
    assert (run["status"], run["added"], run["rejected"], run["traits_dropped"]) == (
        "succeeded",
        3,
        0,
        1,
    )

    # a named trait changes for a member already on the list: the next sync sends it (bulk)
    def profile_writes() -> int:
        # a small delta goes through profile-import one by one, a big one as bulk jobs
        return len(klaviyo.sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB)) + len(
            klaviyo.sim.requests(endpoint=Endpoint.PROFILE_IMPORT)
        )

    writes = profile_writes()
    _identify(producer, ann, {**traits[ann], "plan": "enterprise", "last_name": "still unnamed"})
    _identify(producer, cy, {**traits[cy], "mood": "unnamed traits change nothing"})
    _wait_traits(ann, {**traits[ann], "plan": "enterprise", "last_name": "still unnamed"})
    _wait_traits(cy, {**traits[cy], "mood": "unnamed traits change nothing"})
    result = cli("connectors", "resync", connector_id, "--wait")
    assert result.returncode == 0, result.stderr
    newest = cli_json("connectors", "history", connector_id)[0]
    assert (newest["added"], newest["updated"], newest["removed"]) == (0, 1, 0)
    assert _profile(klaviyo, ann).attributes["properties"] == {"plan": "enterprise"}
    assert profile_writes() == writes + 1  # that member only: one call

    # update --traits: the connector now also sends last_name, to the members that have one
    doc = cli_json("connectors", "update", connector_id, "--traits", "first_name,last_name,plan")
    assert doc["traits"] == ["first_name", "last_name", "plan"]
    assert cli("connectors", "resync", connector_id, "--wait").returncode == 0
    assert _profile(klaviyo, ann).attributes["last_name"] == "still unnamed"
    assert klaviyo.sim.subscription_calls() == 0
    subscription = [r for r in klaviyo.sim.requests() if "subscri" in r.path]
    assert subscription == []


def test_bad_traits_are_refused_with_exit_2_and_nothing_written(
    worker: WorkerProcess, klaviyo: Klaviyo
) -> None:
    segment = new_segment()
    for bad in ("first_name,,plan", "email", "$consent"):
        result = cli(
            "connectors",
            "create",
            "--type",
            "klaviyo",
            "--segment",
            segment,
            "--list-id",
            klaviyo.list_id,
            "--api-key",
            klaviyo.api_key,
            "--traits",
            bad,
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, bad
    with session_scope() as s:
        assert not s.scalar(
            text("SELECT count(*) FROM connectors WHERE segment_id = :s"), {"s": segment}
        )


def test_double_opt_in_lists_are_flagged_on_create_update_and_show(
    worker: WorkerProcess, klaviyo: Klaviyo
) -> None:
    connector_id, stderr = _create(klaviyo, new_segment())
    assert "double opt-in" in stderr and "subscribes nobody" in stderr
    assert cli_json("connectors", "show", connector_id)["opt_in_process"] == "double_opt_in"
    shown = cli("connectors", "show", connector_id, check=True).stdout
    assert "double opt-in" in shown
    single = klaviyo.sim.create_list(klaviyo.account, "Single", opt_in_process="single_opt_in")
    result = cli("connectors", "update", connector_id, "--list-id", single)
    assert result.returncode == 0 and "double opt-in" not in result.stderr
    assert cli_json("connectors", "show", connector_id)["opt_in_process"] == "single_opt_in"
    result = cli("connectors", "update", connector_id, "--list-id", klaviyo.list_id)
    assert "double opt-in" in result.stderr


def test_verify_finds_members_taken_off_behind_our_back_and_repairs_them(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    segment = new_segment()
    members = [f"v{i}-{uuid.uuid4().hex[:4]}@example.com" for i in range(20)] + [
        f"v-ext-{i}-{uuid.uuid4().hex[:4]}" for i in range(10)
    ]
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, members, tmp_path)
    wait_idle(connector_id)
    assert set(klaviyo.members()) == set(members)
    on_list = [p.id for p in klaviyo.sim.list_members(klaviyo.list_id)]
    klaviyo.sim.remove_from_list(klaviyo.list_id, on_list[:10])

    # a resync alone cannot know they are gone (the ledger still counts them)
    assert cli("connectors", "resync", connector_id, "--wait").returncode == 0
    assert len(klaviyo.members()) == 20

    reads = len(klaviyo.sim.requests(endpoint=Endpoint.GET_LIST_MEMBERS))
    result = cli("connectors", "verify", connector_id, "--json")
    assert result.returncode == 1, result.stderr  # still differs at the end
    assert json.loads(result.stdout) == {
        "connector_id": connector_id,
        "in_list": 20,
        "expected": 30,
        "missing": 10,
        "extra": 0,
        "added": 0,
        "removed": 0,
    }
    assert len(klaviyo.sim.requests(endpoint=Endpoint.GET_LIST_MEMBERS)) == reads + 1
    # they left the ledger, so a plain resync now adds them again
    assert cli("connectors", "resync", connector_id, "--wait").returncode == 0
    assert set(klaviyo.members()) == set(members)
    assert cli("connectors", "verify", connector_id).returncode == 0

    # --repair does it in one call: read, sync, read again
    klaviyo.sim.remove_from_list(klaviyo.list_id, on_list[10:15])
    result = cli("connectors", "verify", connector_id, "--repair", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["missing"], doc["extra"], doc["added"], doc["removed"]) == (5, 0, 5, 0)
    assert set(klaviyo.members()) == set(members)
    history = cli_json("connectors", "history", connector_id)
    assert history[0]["trigger"] == "verify"
    assert history[0]["verify"] == {"in_list": 25, "expected": 30, "missing": 5, "extra": 0}


def test_foreign_profiles_only_go_with_remove_extra_and_through_the_guard(
    worker: WorkerProcess, klaviyo: Klaviyo, tmp_path: Path
) -> None:
    segment = new_segment()
    tag = uuid.uuid4().hex[:4]
    members = [f"f{i}-{tag}@example.com" for i in range(10)]
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, members, tmp_path)
    wait_idle(connector_id)
    strangers = [
        klaviyo.sim.add_profile(klaviyo.account, email=f"s{i}-{tag}@example.com") for i in range(3)
    ]
    klaviyo.sim.add_to_list(klaviyo.list_id, strangers)

    alone = cli("connectors", "verify", connector_id, "--remove-extra")
    assert alone.returncode == 2 and len(alone.stderr.strip().splitlines()) == 1
    result = cli("connectors", "verify", connector_id, "--repair", "--json")
    assert result.returncode == 1  # reported, not removed: the list still differs
    assert json.loads(result.stdout)["extra"] == 3 and json.loads(result.stdout)["removed"] == 0
    assert set(strangers) <= klaviyo.sim.list_member_ids(klaviyo.list_id)

    result = cli("connectors", "verify", connector_id, "--repair", "--remove-extra", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["in_list"], doc["extra"], doc["removed"], doc["added"]) == (13, 3, 3, 0)
    assert klaviyo.sim.list_member_ids(klaviyo.list_id).isdisjoint(strangers)
    assert all(klaviyo.sim.profile(p) is not None for p in strangers)

    # a crowd of strangers would empty the list of most of its profiles: the guard holds
    crowd = [
        klaviyo.sim.add_profile(klaviyo.account, email=f"c{i}-{tag}@example.com") for i in range(25)
    ]
    klaviyo.sim.add_to_list(klaviyo.list_id, crowd)
    result = cli("connectors", "verify", connector_id, "--repair", "--remove-extra", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["removed"] == 0
    assert set(crowd) <= klaviyo.sim.list_member_ids(klaviyo.list_id)
    assert cli_json("connectors", "history", connector_id)[0]["status"] == "held"
    # the held strangers are let go: the next ordinary sync is not held by them
    recompute(segment, [*members, f"late-{tag}@example.com"], tmp_path)
    wait_idle(connector_id, runs_at_least=5)
    newest = cli_json("connectors", "history", connector_id)[0]
    assert (newest["status"], newest["added"], newest["removed"]) == ("succeeded", 1, 0)


def test_the_verification_task_repairs_missing_and_reports_extra(
    worker: WorkerProcess, klaviyo: Klaviyo, producer: Celery, tmp_path: Path
) -> None:
    segment = new_segment()
    tag = uuid.uuid4().hex[:4]
    members = [f"b{i}-{tag}@example.com" for i in range(12)]
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, members, tmp_path)
    wait_idle(connector_id)
    on_list = [p.id for p in klaviyo.sim.list_members(klaviyo.list_id)]
    klaviyo.sim.remove_from_list(klaviyo.list_id, on_list[:4])
    stranger = klaviyo.sim.add_profile(klaviyo.account, email=f"x-{tag}@example.com")
    klaviyo.sim.add_to_list(klaviyo.list_id, [stranger])
    suppressed = on_list[5]
    klaviyo.sim.suppress(suppressed)

    producer.send_task("segops.verify_connectors", queue="segops")  # what the beat sends
    wait_idle(connector_id, runs_at_least=2)
    run = cli_json("connectors", "history", connector_id)[0]
    assert (run["trigger"], run["status"], run["added"], run["removed"]) == (
        "verify",
        "succeeded",
        4,
        0,
    )
    assert run["verify"] == {"in_list": 9, "expected": 12, "missing": 4, "extra": 1}
    assert run["suppressed"] == 1  # counted, not a failure
    assert set(members) <= set(klaviyo.members())
    assert stranger in klaviyo.sim.list_member_ids(klaviyo.list_id)  # reported, never removed

    # the ledger remembers it: the next ordinary sync counts the suppressed member too
    recompute(segment, [*members, f"late-{tag}@example.com"], tmp_path)
    wait_idle(connector_id, runs_at_least=3)
    newest = cli_json("connectors", "history", connector_id)[0]
    assert (newest["trigger"], newest["status"], newest["added"]) == ("recompute", "succeeded", 1)
    assert (newest["suppressed"], newest["rejected"], newest["error"]) == (1, 0, None)


def test_rejected_members_are_listed_one_by_one(
    worker: WorkerProcess, klaviyo: Klaviyo, api: httpx.Client
) -> None:
    segment = new_segment()
    tag = uuid.uuid4().hex[:4]
    long_ids = [f"{tag}-{i}-" + "x" * 300 for i in range(2)]  # Klaviyo caps external_id
    good = [f"ok{i}-{tag}@example.com" for i in range(3)]
    connector_id = create_connector(klaviyo, segment)
    with session_scope() as s:
        for m in [*good, *long_ids]:
            s.execute(text("INSERT INTO segment_members VALUES (:s, :u)"), {"s": segment, "u": m})
    # rejected members do not fail the run: it succeeds, and its error names them
    assert cli("connectors", "resync", connector_id, "--wait").returncode == 0
    [run] = cli_json("connectors", "history", connector_id)
    assert (run["status"], run["rejected"]) == ("succeeded", 2)
    assert "2 members rejected by Klaviyo" in run["error"]
    assert run["rejected_members"] == f"/v1/connectors/{connector_id}/runs/{run['id']}/rejected"

    doc = cli_json("connectors", "rejected", connector_id, "--run", run["id"])
    listed = doc["rejected_members"]
    assert sorted(m["user_id"] for m in listed) == sorted(long_ids)
    assert all("external_id" in (m["reason"] or "") for m in listed)
    assert all(m["run_id"] == run["id"] for m in listed)
    assert all(m["retry"] == "waiting" for m in listed)
    text_out = cli("connectors", "rejected", connector_id, check=True).stdout
    assert long_ids[0] in text_out and "retry=waiting" in text_out
    bad_run = cli("connectors", "rejected", connector_id, "--run", "no-such-run")
    assert bad_run.returncode == 2

    answer = api.get(run["rejected_members"])
    assert answer.status_code == 200
    assert sorted(m["user_id"] for m in answer.json()["rejected_members"]) == sorted(long_ids)


def test_the_api_takes_traits(api: httpx.Client, klaviyo: Klaviyo) -> None:
    body = {
        "type": "klaviyo",
        "segment_id": new_segment(),
        "list_id": klaviyo.list_id,
        "api_key": klaviyo.api_key,
        "traits": ["first_name", "plan"],
    }
    created = api.post("/v1/connectors", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["traits"] == ["first_name", "plan"]
    assert "double opt-in" in created.headers["warning"]  # consent pre-flight, said not refused
    assert created.json()["opt_in_process"] == "double_opt_in"
    patched = api.patch(f"/v1/connectors/{created.json()['id']}", json={"traits": ["title"]})
    assert patched.status_code == 200 and patched.json()["traits"] == ["title"]
    for bad in ("first_name", ["email"], [1], ["a,b"]):
        answer = api.patch(f"/v1/connectors/{created.json()['id']}", json={"traits": bad})
        assert answer.status_code == 422, bad
    assert api.get(f"/v1/connectors/{created.json()['id']}").json()["traits"] == ["title"]


def test_the_beat_verifies_at_the_configured_interval(
    segops_env: dict[str, str],
    pg_server_url: str,
    sim_server: tuple[Any, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A deployment's beat (SEGOPS_VERIFY_INTERVAL=2 s here) finds and repairs drift alone."""
    from tests.conftest import isolated_env

    sim, base_url = sim_server
    overrides = {"SEGOPS_KLAVIYO_BASE_URL": base_url, "SEGOPS_VERIFY_INTERVAL": "2"}
    with isolated_env(segops_env, pg_server_url, "beatverify", **overrides) as env:
        k = Klaviyo.new(sim, base_url)
        worker = WorkerProcess(env, tmp_path_factory.mktemp("beatverify"), concurrency=2)
        worker.start()
        try:
            segment = new_segment()
            members = [f"bv{i}@example.com" for i in range(8)]
            connector_id = create_connector(k, segment)
            recompute(segment, members, tmp_path_factory.mktemp("members"))
            # (the beat's own verify runs count as runs too: wait for the list itself)
            _wait_for(lambda: set(members) <= set(k.members()), "the first sync")
            gone = [p.id for p in sim.list_members(k.list_id)][:3]
            # The beat may itself have done the first sync (its verify ran between the segment's
            # load and the recompute message, found 8 missing and repaired them): only the runs
            # after the drift count.
            drifted = datetime.now(UTC)
            sim.remove_from_list(k.list_id, gone)
            _wait_for(lambda: set(members) <= set(k.members()), "the beat's repair", 120)
            repairs = [
                r
                for r in cli_json("connectors", "history", connector_id)
                if r["trigger"] == "verify"
                and r["added"]
                and datetime.fromisoformat(r["started_at"]) >= drifted
            ]
            assert [(r["added"], r["verify"]["missing"]) for r in repairs] == [(3, 3)]
        finally:
            worker.stop()


def test_a_rejected_member_is_sent_again_once_a_context_identified_event_fixes_its_email(
    worker: WorkerProcess, klaviyo: Klaviyo, producer: Celery, tmp_path: Path
) -> None:
    segment = new_segment()
    tag = uuid.uuid4().hex[:6]
    fixable, others = f"fix-{tag}", [f"ok{i}-{tag}" for i in range(3)]
    _identify(producer, fixable, {"email": f"bad,{tag}@example.com"})  # Klaviyo refuses it
    _wait_traits(fixable, {"email": f"bad,{tag}@example.com"})
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, [*others, fixable], tmp_path)
    wait_idle(connector_id)
    [first] = cli_json("connectors", "history", connector_id)
    assert (first["status"], first["added"], first["rejected"]) == ("succeeded", 3, 1)

    # a recompute alone does not send it again: its data has not changed
    recompute(segment, [*others, fixable, f"new-{tag}"], tmp_path)
    wait_idle(connector_id, runs_at_least=2)
    second = cli_json("connectors", "history", connector_id)[0]
    assert (second["added"], second["rejected"]) == (1, 0)
    [row] = cli_json("connectors", "rejected", connector_id)["rejected_members"]
    assert (row["user_id"], row["retry"]) == (fixable, "waiting")

    # the platform's event with a corrected email makes it due; the next run sends it
    _identify(producer, fixable, {"email": f"fixed-{tag}@example.com"})
    _wait_traits(fixable, {"email": f"fixed-{tag}@example.com"})
    [row] = cli_json("connectors", "rejected", connector_id)["rejected_members"]
    assert row["retry"] == "due"
    cli("connectors", "resync", connector_id, check=True)
    wait_idle(connector_id, runs_at_least=3)
    third = cli_json("connectors", "history", connector_id)[0]
    assert (third["status"], third["added"], third["rejected"], third["error"]) == (
        "succeeded",
        1,
        0,
        None,
    )
    assert fixable in klaviyo.members()
