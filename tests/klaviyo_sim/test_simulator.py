"""The simulator behaves like Klaviyo: limits, timing, identity, jobs, errors, admin API."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from segops_sync.klaviyo import (
    REVISION,
    Endpoint,
    KlaviyoClient,
    ProfileInput,
    RateLimited,
)
from segops_sync.klaviyo_sim import RemoteSimulator, SimHttpResponse, Simulator
from segops_sync.klaviyo_sim.published import ENDPOINT_LIMITS

from .conftest import Env, FakeClock, make_env

JOB_PATH = "/api/profile-bulk-import-jobs"


def members_path(list_id: str) -> str:
    return f"/api/lists/{list_id}/relationships/profiles"


def job_body(*profiles: dict[str, Any], list_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "profile-bulk-import-job",
        "attributes": {
            "profiles": {"data": [{"type": "profile", "attributes": p} for p in profiles]}
        },
    }
    if list_id:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return {"data": data}


def upsert(sim: Simulator, key: str, **attrs: Any) -> SimHttpResponse:
    return sim.call(
        "POST",
        "/api/profile-import",
        key=key,
        json_body={"data": {"type": "profile", "attributes": attrs}},
    )


class Setup:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.account = sim.create_account()
        self.key = sim.create_key(self.account)
        self.list_id = sim.create_list(self.account, "L")

    def get_list(self, key: str | None = None) -> SimHttpResponse:
        return self.sim.call("GET", f"/api/lists/{self.list_id}", key=key or self.key)

    def add(self, *ids: str, key: str | None = None) -> SimHttpResponse:
        body = {"data": [{"type": "profile", "id": i} for i in ids]}
        return self.sim.call(
            "POST", members_path(self.list_id), key=key or self.key, json_body=body
        )


@pytest.fixture
def fake(clock: FakeClock) -> Setup:
    return Setup(Simulator(clock=clock, seed=1))


# -- rate limits ---------------------------------------------------------------------------------


def test_burst_limit_per_account_and_endpoint(fake: Setup, clock: FakeClock) -> None:
    pid = fake.sim.add_profile(fake.account, email="a@example.com")
    assert [fake.add(pid).status for _ in range(10)] == [204] * 10
    clock.advance(0.3)
    refused = fake.add(pid)
    assert refused.status == 429
    assert refused.headers["retry-after"] == "0.7"
    assert not any(h.startswith("ratelimit-") for h in refused.headers)
    # other endpoints of the same account have budgets of their own
    assert (
        fake.sim.call(
            "DELETE",
            members_path(fake.list_id),
            key=fake.key,
            json_body={"data": [{"type": "profile", "id": pid}]},
        ).status
        == 204
    )
    assert fake.get_list().status == 200
    clock.advance(0.7)
    assert fake.add(pid).status == 204


def test_steady_limit(fake: Setup, clock: FakeClock) -> None:
    pid = fake.sim.add_profile(fake.account, email="a@example.com")
    statuses = []
    for _ in range(15):  # 15 bursts of 10, one second apart: 150 requests within the minute
        statuses += [fake.add(pid).status for _ in range(10)]
        clock.advance(1.0)
    assert statuses == [204] * 150
    refused = fake.add(pid)
    assert refused.status == 429
    assert float(refused.headers["retry-after"]) == pytest.approx(45.0)
    assert fake.sim.max_rate(fake.account, Endpoint.ADD_LIST_PROFILES, 60.0) == 151
    assert fake.sim.max_rate(fake.account, Endpoint.ADD_LIST_PROFILES, 1.0) == 10


def test_time_scale_compresses_the_windows(clock: FakeClock) -> None:
    setup = Setup(Simulator(clock=clock, time_scale=10))
    assert (setup.sim.burst_window, setup.sim.steady_window) == (0.1, 6.0)
    assert [setup.sim.call("GET", "/api/accounts", key=setup.key).status for _ in range(2)] == [
        200,
        429,
    ]
    refused = setup.sim.call("GET", "/api/accounts", key=setup.key)
    assert refused.headers["retry-after"] == "0.1"
    clock.advance(0.1)
    ok = setup.sim.call("GET", "/api/accounts", key=setup.key)
    assert ok.status == 200
    assert ok.headers["ratelimit-limit"] == "15"
    assert ok.headers["ratelimit-remaining"] == "13"
    assert ok.headers["ratelimit-reset"] == "5.9"


def test_keys_of_one_account_share_the_budget_other_accounts_do_not(
    fake: Setup, clock: FakeClock
) -> None:
    second_key = fake.sim.create_key(fake.account)
    other = fake.sim.create_account()
    other_key = fake.sim.create_key(other)
    keys = [fake.key, second_key]
    assert [fake.sim.call("GET", "/api/accounts", key=k).status for k in keys] == [200, 429]
    assert fake.sim.call("GET", "/api/accounts", key=other_key).status == 200
    fingerprints = {r.key_fingerprint for r in fake.sim.requests(endpoint=Endpoint.GET_ACCOUNTS)}
    assert len(fingerprints) == 3 and all(f and len(f) == 12 for f in fingerprints)


def test_retry_after_is_exact_and_early_retries_are_counted(fake: Setup, clock: FakeClock) -> None:
    assert fake.sim.call("GET", "/api/accounts", key=fake.key).status == 200
    clock.advance(0.25)
    refused = fake.sim.call("GET", "/api/accounts", key=fake.key)
    retry_after = float(refused.headers["retry-after"])
    assert retry_after == pytest.approx(0.75)
    clock.advance(retry_after - 0.01)
    assert fake.sim.call("GET", "/api/accounts", key=fake.key).status == 429
    assert fake.sim.early_retries() == 1
    clock.advance(0.01)  # exactly Retry-After after the first 429
    assert fake.sim.call("GET", "/api/accounts", key=fake.key).status == 200
    assert fake.sim.early_retries() == 1
    assert fake.sim.count_429() == 2


def test_limits_can_be_switched_off(clock: FakeClock) -> None:
    setup = Setup(Simulator(clock=clock, enforce_rate_limits=False))
    assert {setup.sim.call("GET", "/api/accounts", key=setup.key).status for _ in range(5)} == {200}


def test_every_endpoint_has_a_limit() -> None:
    assert set(ENDPOINT_LIMITS) == set(Endpoint)
    assert ENDPOINT_LIMITS[Endpoint.GET_ACCOUNTS].burst == 1
    assert ENDPOINT_LIMITS[Endpoint.CREATE_BULK_IMPORT_JOB].steady == 150
    assert ENDPOINT_LIMITS[Endpoint.GET_PROFILES].steady == 750


def test_rate_limits_over_real_http_with_time_scale() -> None:
    # time_scale 2: a 0.5 s burst window, which two back-to-back local requests fall in even on
    # a loaded host (0.25 s once looked wide enough; a pause of the test process is not rare)
    sim = Simulator(time_scale=2)
    for env in make_env(sim):
        client = env.client()
        client.get_account_id()
        with pytest.raises(RateLimited) as caught:
            client.get_account_id()  # XS: one per (compressed) second
        wait = caught.value.retry_after
        assert wait is not None and 0 < wait <= 0.5
        time.sleep(wait)
        assert client.get_account_id() == env.account_id
        assert sim.early_retries() == 0
        assert sim.max_rate(env.account_id, Endpoint.GET_ACCOUNTS, sim.burst_window) == 2


def test_a_request_counts_when_it_arrives_not_when_its_body_was_read() -> None:
    """Klaviyo counts a request at its edge. A big body the simulator's process reads slowly
    (its CPUs shared with the workers) must not move the request into a later window."""
    import json
    import socket
    from urllib.parse import urlsplit

    from segops_sync.klaviyo.endpoints import REVISION

    sim = Simulator()
    for env in make_env(sim):
        body = json.dumps(job_body({"email": "slow@example.com"}, list_id=env.list_id)).encode()
        url = urlsplit(env.base_url)
        head = (
            f"POST {JOB_PATH} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Klaviyo-API-Key {env.key}\r\nrevision: {REVISION}\r\n"
            f"Content-Type: application/vnd.api+json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80)) as conn:
            sent_at = sim.now()
            conn.sendall(head + body[:10])
            time.sleep(0.5)  # the rest of the body comes half a second later
            conn.sendall(body[10:])
            answer = conn.makefile("rb").readline()
        assert b" 202 " in answer
        (record,) = sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB)
        assert sent_at <= record.time < sent_at + 0.25  # counted at its start, not 0.5 s later


# -- timing of asynchronous work -----------------------------------------------------------------


def test_new_profiles_are_found_only_after_indexing_delay(clock: FakeClock) -> None:
    setup = Setup(Simulator(clock=clock, indexing_delay=30.0))
    pid = upsert(setup.sim, setup.key, email="late@example.com").json()["data"]["id"]

    def lookup() -> list[Any]:
        found = setup.sim.call(
            "GET",
            "/api/profiles",
            key=setup.key,
            params={"filter": 'equals(email,"late@example.com")'},
        )
        return [p["id"] for p in found.json()["data"]]

    assert lookup() == []
    clock.advance(29.9)
    assert lookup() == []
    clock.advance(0.1)
    assert lookup() == [pid]


def test_bulk_job_completes_after_job_delay(clock: FakeClock) -> None:
    setup = Setup(Simulator(clock=clock, job_delay=10.0))
    created = setup.sim.call(
        "POST",
        JOB_PATH,
        key=setup.key,
        json_body=job_body({"email": "j@example.com"}, list_id=setup.list_id),
    )
    assert created.status == 202
    job_id = created.json()["data"]["id"]
    assert created.json()["data"]["attributes"]["status"] == "queued"

    def status() -> str:
        doc = setup.sim.call("GET", f"{JOB_PATH}/{job_id}", key=setup.key).json()
        return str(doc["data"]["attributes"]["status"])

    clock.advance(1)
    assert status() == "queued"
    clock.advance(5)
    assert status() == "processing"
    assert setup.sim.list_member_ids(setup.list_id) == set()
    clock.advance(4)
    assert status() == "complete"
    assert len(setup.sim.list_member_ids(setup.list_id)) == 1


def test_the_job_runner_applies_a_due_job_before_any_request(clock: FakeClock) -> None:
    """Klaviyo's own workers apply a job when it is due; lazily, the next request would."""
    setup = Setup(Simulator(clock=clock, job_delay=5.0))
    body = job_body({"email": "r@example.com"}, list_id=setup.list_id)
    job_id = setup.sim.call("POST", JOB_PATH, key=setup.key, json_body=body).json()["data"]["id"]
    setup.sim.start_job_runner()
    try:
        clock.advance(4.9)
        time.sleep(0.3)
        assert setup.sim.unapplied_jobs() == 1  # not due yet
        clock.advance(0.1)
        deadline = time.monotonic() + 5
        while setup.sim.unapplied_jobs() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert setup.sim.unapplied_jobs() == 0
        setup.sim.lose_job(job_id)  # too late: it was applied when due, with nobody asking
        assert [p.email for p in setup.sim.list_members(setup.list_id)] == ["r@example.com"]
    finally:
        setup.sim.stop_job_runner()


def test_expired_and_lost_jobs(clock: FakeClock) -> None:
    setup = Setup(Simulator(clock=clock, job_delay=5.0))

    def submit(email: str) -> str:
        body = job_body({"email": email}, list_id=setup.list_id)
        return str(
            setup.sim.call("POST", JOB_PATH, key=setup.key, json_body=body).json()["data"]["id"]
        )

    expired, lost = submit("e@example.com"), submit("l@example.com")
    setup.sim.expire_job(expired)
    setup.sim.lose_job(lost)
    for job_id in (expired, lost):
        assert setup.sim.call("GET", f"{JOB_PATH}/{job_id}", key=setup.key).status == 404
    clock.advance(10)
    # the expired job was applied before its results went away; the lost one never was
    assert [p.email for p in setup.sim.list_members(setup.list_id)] == ["e@example.com"]


def test_jobs_list_filters_by_status_and_pages(clock: FakeClock) -> None:
    """One GET answers for many jobs: the unfinished ones, 100 a page, by status only."""
    setup = Setup(Simulator(clock=clock, job_delay=5.0))
    other = Setup(setup.sim)  # another account's jobs never show

    def submit(who: Setup, email: str) -> str:
        body = job_body({"email": email}, list_id=who.list_id)
        return str(who.sim.call("POST", JOB_PATH, key=who.key, json_body=body).json()["data"]["id"])

    early = [submit(setup, f"e{i}@example.com") for i in range(3)]
    submit(other, "o@example.com")
    clock.advance(3)
    late = [submit(setup, f"l{i}@example.com") for i in range(2)]

    def listed(flt: str | None, size: str = "100") -> tuple[list[str], int, bool]:
        params = {"page[size]": size, **({"filter": flt} if flt else {})}
        answer = setup.sim.call("GET", JOB_PATH, key=setup.key, params=params)
        assert answer.status == 200, answer.body
        doc = answer.json()
        return [d["id"] for d in doc["data"]], answer.status, "next" in doc["links"]

    unfinished = 'any(status,["queued","processing"])'
    assert listed(unfinished)[0] == early + late
    clock.advance(2.5)  # the early jobs are due, the late ones are not
    assert listed(unfinished)[0] == late
    assert listed("equals(status,'complete')")[0] == early
    ids, _, more = listed(None, size="2")
    assert ids == early[:2] and more
    for bad in ('any(id,["x"])', 'equals(status,"done")', "any(status,[queued])"):
        answer = setup.sim.call("GET", JOB_PATH, key=setup.key, params={"filter": bad})
        assert answer.status == 400, bad
    answer = setup.sim.call("GET", JOB_PATH, key=setup.key, params={"page[size]": "101"})
    assert answer.status == 400


# -- relationships, identity, consent ------------------------------------------------------------


def test_relationship_writes_are_idempotent_and_never_delete(fake: Setup) -> None:
    pid = fake.sim.add_profile(fake.account, email="i@example.com")
    assert fake.add(pid).status == 204
    assert fake.add(pid).status == 204
    remove = {"data": [{"type": "profile", "id": pid}]}
    for _ in range(2):
        assert (
            fake.sim.call(
                "DELETE", members_path(fake.list_id), key=fake.key, json_body=remove
            ).status
            == 204
        )
    assert fake.sim.list_member_ids(fake.list_id) == set()
    profile = fake.sim.profile(pid)
    assert profile is not None and profile.email_consent == "NEVER_SUBSCRIBED"


def test_one_unknown_profile_id_refuses_the_whole_call(fake: Setup) -> None:
    pid = fake.sim.add_profile(fake.account, email="i@example.com")
    refused = fake.add(pid, "01UNKNOWNUNKNOWNUNKNOWNUNK")
    assert refused.status == 400
    assert refused.json()["errors"][0]["source"]["pointer"] == "/data/1/id"
    assert fake.sim.list_member_ids(fake.list_id) == set()


def test_profiles_of_another_account_are_unknown(fake: Setup) -> None:
    other = fake.sim.create_account()
    foreign = fake.sim.add_profile(other, email="x@example.com")
    assert fake.add(foreign).status == 400


def test_identity_matching_and_conflicts(fake: Setup) -> None:
    first = upsert(fake.sim, fake.key, email="ID@example.com")
    assert first.status == 201
    pid = first.json()["data"]["id"]
    assert upsert(fake.sim, fake.key, email="id@example.com", external_id="u1").status == 200
    by_ext = upsert(fake.sim, fake.key, external_id="u1", email=None)
    assert by_ext.status == 200 and by_ext.json()["data"]["id"] == pid
    # null clears a field on profile-import; the profile is still found by external_id
    assert by_ext.json()["data"]["attributes"]["email"] is None
    upsert(fake.sim, fake.key, email="id@example.com")  # a second profile now
    conflict = upsert(fake.sim, fake.key, email="id@example.com", external_id="u1")
    assert conflict.status == 409
    assert conflict.json()["errors"][0]["meta"]["duplicate_profile_id"] == pid


def test_ids_look_like_klaviyo_ids(fake: Setup) -> None:
    pid = fake.sim.add_profile(fake.account, email="a@example.com")
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", pid)
    assert re.fullmatch(r"[A-Za-z0-9]{6}", fake.list_id)
    assert re.fullmatch(r"pk_[A-Za-z0-9]{32,}", fake.key)


def test_bulk_job_per_profile_errors(fake: Setup) -> None:
    body = job_body(
        {"email": "fine@example.com"},
        {"external_id": "z" * 256},
        {"first_name": "No identifier"},
        {"email": "big@example.com", "properties": {"blob": "b" * 110_000}},
        list_id=fake.list_id,
    )
    job_id = fake.sim.call("POST", JOB_PATH, key=fake.key, json_body=body).json()["data"]["id"]
    attrs = fake.sim.call("GET", f"{JOB_PATH}/{job_id}", key=fake.key).json()["data"]["attributes"]
    assert (attrs["total_count"], attrs["completed_count"], attrs["failed_count"]) == (4, 1, 3)
    errors = fake.sim.call(
        "GET", f"{JOB_PATH}/{job_id}/import-errors", key=fake.key, params={"page[size]": "2"}
    ).json()
    assert len(errors["data"]) == 2 and "page%5Bcursor%5D=2" in errors["links"]["next"]
    first = errors["data"][0]["attributes"]
    assert first["source"]["pointer"] == "/data/attributes/profiles/data/1/attributes/external_id"
    assert first["original_payload"] == {
        "type": "profile",
        "attributes": {"external_id": "z" * 256},
    }


def test_whole_job_refused_for_a_malformed_email(fake: Setup) -> None:
    body = job_body({"email": "ok@example.com"}, {"email": "broken"}, list_id=fake.list_id)
    refused = fake.sim.call("POST", JOB_PATH, key=fake.key, json_body=body)
    assert refused.status == 400
    [error] = refused.json()["errors"]
    assert error["source"]["pointer"] == "/data/attributes/profiles/data/1/attributes/email"
    assert fake.sim.profiles(fake.account) == []


# -- errors at the door --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "where"),
    [
        ({"revision": None}, 400, "revision"),
        ({"revision": "2026-13-45"}, 400, "revision"),
        ({"revision": "yesterday"}, 400, "revision"),
        ({"revision": "2099-01-15"}, 400, "revision"),
        ({"authorization": None}, 401, None),
        ({"authorization": "Bearer pk_whatever"}, 401, None),
    ],
)
def test_requests_refused_at_the_door(
    fake: Setup, headers: dict[str, Any], status: int, where: str | None
) -> None:
    response = fake.sim.call("GET", f"/api/lists/{fake.list_id}", key=fake.key, headers=headers)
    assert response.status == status
    error = response.json()["errors"][0]
    if where:
        assert error["source"]["parameter"] == where


def test_revision_with_pre_suffix_and_trailing_slash_are_accepted(fake: Setup) -> None:
    ok = fake.sim.call(
        "GET", f"/api/lists/{fake.list_id}/", key=fake.key, headers={"revision": f"{REVISION}.pre"}
    )
    assert ok.status == 200


def test_wrong_content_type_is_415(fake: Setup) -> None:
    pid = fake.sim.add_profile(fake.account, email="a@example.com")
    response = fake.sim.call(
        "POST",
        members_path(fake.list_id),
        key=fake.key,
        json_body={"data": [{"type": "profile", "id": pid}]},
        headers={"content-type": "text/plain"},
    )
    assert response.status == 415


def test_revoked_key_gets_401_and_missing_scope_403(fake: Setup) -> None:
    limited = fake.sim.create_key(fake.account, scopes=["profiles:read"])
    denied = fake.get_list(key=limited)
    assert denied.status == 403 and denied.json()["errors"][0]["code"] == "permission_denied"
    fake.sim.revoke_key(fake.key)
    revoked = fake.get_list()
    assert revoked.status == 401 and "errors" in revoked.json()


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"page[size]": "101"}, 400),
        ({"page[size]": "0"}, 400),
        ({"bogus": "1"}, 400),
        ({"filter": "any(email,[unquoted@example.com])"}, 400),
        ({"filter": 'any(first_name,["x"])'}, 400),
        ({"filter": "any(email,[" + ",".join(f'"{i}@x.co"' for i in range(101)) + "])"}, 400),
        ({"filter": 'any(email,[\'single@quotes.example\', "x\\"y@z.co"])'}, 200),
    ],
)
def test_query_validation(fake: Setup, params: dict[str, str], status: int) -> None:
    assert fake.sim.call("GET", "/api/profiles", key=fake.key, params=params).status == status


def test_unknown_routes_and_methods(fake: Setup) -> None:
    assert fake.sim.call("GET", "/api/nothing-here", key=fake.key).status == 404
    assert fake.sim.call("PATCH", "/api/profile-import", key=fake.key).status == 405


def test_subscription_endpoints_are_counted_and_refused(fake: Setup) -> None:
    assert fake.sim.subscription_calls() == 0
    response = fake.sim.call(
        "POST", "/api/profile-subscription-bulk-create-jobs", key=fake.key, json_body={"data": {}}
    )
    assert response.status == 403
    assert fake.sim.subscription_calls() == 1


def test_a_full_client_session_never_touches_subscriptions(env: Env) -> None:
    client = env.client()
    job = client.create_bulk_import_job([ProfileInput(email="s@example.com")], env.list_id)
    client.get_bulk_import_job(job.id)
    ids = client.find_profile_ids("email", ["s@example.com"])
    client.remove_profiles_from_list(env.list_id, list(ids.values()))
    client.add_profiles_to_list(env.list_id, list(ids.values()))
    assert env.sim.subscription_calls() == 0


def test_429_storm_and_stats(fake: Setup) -> None:
    fake.sim.force_429(3, 2.5)
    statuses = [fake.get_list().status for _ in range(4)]
    assert statuses == [429, 429, 429, 200]
    assert fake.sim.count_429() == 3
    assert (
        fake.sim.early_retries() == 3
    )  # the 2nd, 3rd and 4th arrived inside the 2.5 s the storm asked for
    assert fake.sim.stats()["count_429"] == 3


# -- the HTTP admin API and the CLI entry point --------------------------------------------------


def test_admin_api_mirrors_the_simulator(env: Env) -> None:
    with RemoteSimulator(env.base_url) as remote:
        account = remote.create_account()
        key = remote.create_key(account)
        list_id = remote.create_list(account, "Remote")
        with KlaviyoClient(key, env.base_url) as client:
            pid = client.upsert_profile(ProfileInput(email="remote@example.com"))
            client.add_profiles_to_list(list_id, [pid])
        assert remote.list_member_ids(list_id) == {pid}
        assert remote.list_members(list_id)[0]["email"] == "remote@example.com"
        assert remote.subscription_calls() == 0
        assert remote.max_rate(account, Endpoint.ADD_LIST_PROFILES, 1.0) == 1
        assert [r["endpoint"] for r in remote.requests(endpoint=Endpoint.PROFILE_IMPORT)] == [
            "POST /api/profile-import"
        ]
        remote.force_429(1, 0.2)
        with KlaviyoClient(key, env.base_url) as client, pytest.raises(RateLimited):
            client.get_list(list_id)
        assert remote.count_429() == 1
        remote.set_faults(error_rate=1.0)
        assert env.sim.faults.error_rate == 1.0
        remote.set_faults()
        remote.revoke_key(key)
        assert key not in str(remote.stats()) and key not in str(remote.requests())


def test_admin_errors_are_json(env: Env) -> None:
    assert httpx.post(f"{env.base_url}/_sim/accounts/none/keys").status_code == 404
    assert httpx.post(f"{env.base_url}/_sim/faults", json={"error_rate": 2}).status_code == 400
    assert httpx.get(f"{env.base_url}/_sim/health").json()["ok"] is True


def test_serve_prints_one_line_and_serves() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "segops_sync.klaviyo_sim", "--port", "0", "--time-scale", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        assert set(fields) >= {"base_url", "api_key", "list_id"}
        deadline = time.monotonic() + 10
        while True:
            try:
                with KlaviyoClient(fields["api_key"], fields["base_url"]) as client:
                    assert client.get_list(fields["list_id"]).id == fields["list_id"]
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert httpx.get(f"{fields['base_url']}/_sim/health").json()["time_scale"] == 5
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_request_is_stamped_on_arrival_not_when_its_turn_comes(clock: FakeClock) -> None:
    """A request queued behind a slow one (a due bulk job applied under the lock) keeps the time
    it arrived: it was not sent any later, so it cannot pass for an early retry."""
    import threading

    test_thread = threading.current_thread()
    read_by_caller = threading.Event()

    def watched_clock() -> float:
        now = clock()
        if threading.current_thread() is not test_thread:
            read_by_caller.set()  # after reading: the test moves time on only once it is read
        return now

    fake = Setup(Simulator(clock=watched_clock, seed=1))
    clock.advance(0.1)
    arrived = clock()
    with fake.sim._lock:  # the simulator is busy
        caller = threading.Thread(target=fake.get_list)
        caller.start()
        # The caller reads the clock while the lock is held, or never before it is released.
        assert read_by_caller.wait(timeout=10), "the request was not stamped on arrival"
        clock.advance(0.3)
    caller.join()
    assert [r.time for r in fake.sim.requests()] == [arrived]


def test_profiles_submitted_in_bulk_jobs_are_counted_per_identifier(fake: Setup) -> None:
    body = job_body(
        {"email": "c1@example.com"},
        {"email": "c2@example.com", "external_id": "u2"},
        list_id=fake.list_id,
    )
    for _ in range(2):
        assert fake.sim.call("POST", JOB_PATH, key=fake.key, json_body=body).status == 202
    refused = job_body({"email": "not-an-email"}, list_id=fake.list_id)
    assert fake.sim.call("POST", JOB_PATH, key=fake.key, json_body=refused).status == 400
    assert fake.sim.submitted_counts(fake.account) == {"c1@example.com": 2, "u2": 2}
    assert fake.sim.submitted_counts("other-account") == {}


# -- the list picker's calls: GET and POST /api/lists, profile_count ------------------------------


def test_lists_page_by_ten_at_most_and_refuse_bad_queries(fake: Setup) -> None:
    for i in range(11):
        fake.sim.create_list(fake.account, f"N{i:02d}")
    other = fake.sim.create_account()
    fake.sim.create_list(other, "not this account's")
    first = fake.sim.call("GET", "/api/lists", key=fake.key, params={"sort": "-name"})
    assert first.status == 200
    page = first.json()
    assert len(page["data"]) == 10
    cursor = re.search(r"page%5Bcursor%5D=([^&]+)", page["links"]["next"])
    assert cursor is not None
    rest = fake.sim.call(
        "GET", "/api/lists", key=fake.key, params={"sort": "-name", "page[cursor]": cursor[1]}
    ).json()
    names = [d["attributes"]["name"] for d in page["data"] + rest["data"]]
    assert names == [
        "N10",
        "N09",
        "N08",
        "N07",
        "N06",
        "N05",
        "N04",
        "N03",
        "N02",
        "N01",
        "N00",
        "L",
    ]
    assert "next" not in rest["links"]
    named = fake.sim.call(
        "GET", "/api/lists", key=fake.key, params={"filter": 'equals(name,"N03")'}
    )
    assert [d["attributes"]["name"] for d in named.json()["data"]] == ["N03"]
    for params in ({"page[size]": "11"}, {"sort": "members"}, {"filter": 'equals(opt_in,"x")'}):
        assert fake.sim.call("GET", "/api/lists", key=fake.key, params=params).status == 400


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"type": "list", "attributes": {"name": "  "}}},
        {"data": {"type": "list", "attributes": {"name": 5}}},
        {"data": {"type": "segment", "attributes": {"name": "N"}}},
        {"data": {"type": "list"}},
    ],
)
def test_a_bad_new_list_is_400_and_makes_nothing(fake: Setup, body: dict[str, Any]) -> None:
    before = fake.sim.call("GET", "/api/lists", key=fake.key).json()["data"]
    answer = fake.sim.call("POST", "/api/lists", key=fake.key, json_body=body)
    assert answer.status == 400 and answer.json()["errors"][0]["source"]["pointer"]
    assert fake.sim.call("GET", "/api/lists", key=fake.key).json()["data"] == before


def test_a_new_list_is_201_and_a_read_only_key_is_403(fake: Setup) -> None:
    body = {"data": {"type": "list", "attributes": {"name": "Fresh"}}}
    answer = fake.sim.call("POST", "/api/lists", key=fake.key, json_body=body)
    assert answer.status == 201
    made = answer.json()["data"]
    assert made["attributes"]["name"] == "Fresh"
    assert fake.get_list().status == 200
    reader = fake.sim.create_key(fake.account, scopes=["lists:read"])
    assert fake.sim.call("POST", "/api/lists", key=reader, json_body=body).status == 403


def test_profile_count_is_billed_to_the_xs_tier(fake: Setup, clock: FakeClock) -> None:
    fake.add(fake.sim.add_profile(fake.account, email="a@example.com"))
    counted = {"additional-fields[list]": "profile_count"}
    path = f"/api/lists/{fake.list_id}"
    first = fake.sim.call("GET", path, key=fake.key, params=counted)
    assert first.json()["data"]["attributes"]["profile_count"] == 1
    assert first.headers["ratelimit-limit"] == "15"
    assert fake.sim.call("GET", path, key=fake.key, params=counted).status == 429
    # the plain read keeps its own L budget, without the count
    plain = fake.get_list()
    assert plain.status == 200 and "profile_count" not in plain.json()["data"]["attributes"]
    clock.advance(1.0)
    assert fake.sim.call("GET", path, key=fake.key, params=counted).status == 200
    refused = {"additional-fields[list]": "members"}
    assert fake.sim.call("GET", path, key=fake.key, params=refused).status == 400


def test_a_deletion_job_deletes_the_one_profile_it_names_after_answering_202() -> None:
    sim = Simulator(job_delay=0.0, enforce_rate_limits=False)  # 4 calls: over the S tier's 3/s
    account = sim.create_account()
    key = sim.create_key(account)
    list_id = sim.create_list(account)
    by_id, by_email = (sim.add_profile(account, email=f"d{i}@example.com") for i in range(2))
    sim.add_to_list(list_id, [by_id, by_email])

    def deletion(profile: dict[str, Any]) -> SimHttpResponse:
        body = {"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": profile}}}
        return sim.call("POST", "/api/data-privacy-deletion-jobs", key=key, json_body=body)

    both = {"type": "profile", "id": by_id, "attributes": {"email": "d1@example.com"}}
    assert deletion({"data": both}).status == 400  # several identifiers: refused
    assert deletion({"data": {"type": "profile", "id": by_id, "attributes": {}}}).status == 202
    email = {"type": "profile", "attributes": {"email": "D1@example.com"}}
    assert deletion({"data": email}).status == 202
    assert (sim.profile(by_id), sim.profile(by_email), sim.list_members(list_id)) == (
        None,
        None,
        [],
    )
    scoped = sim.create_key(account, scopes={"profiles:write"})
    refused = sim.call(
        "POST",
        "/api/data-privacy-deletion-jobs",
        key=scoped,
        json_body={
            "data": {
                "type": "data-privacy-deletion-job",
                "attributes": {"profile": {"data": {"type": "profile", "attributes": {}}}},
            }
        },
    )
    assert refused.status == 403
