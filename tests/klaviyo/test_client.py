"""The client over real HTTP against the simulator on 127.0.0.1: operations and typed outcomes."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from segops_sync.klaviyo import (
    MAX_JOB_BYTES,
    CredentialsRejected,
    Endpoint,
    InvalidRequest,
    KlaviyoClient,
    KlaviyoError,
    NotFound,
    PermissionDenied,
    ProfileInput,
    RateLimited,
    RateLimitHeaders,
    TransientError,
    UnexpectedStatus,
    split_into_jobs,
)
from segops_sync.klaviyo.payloads import bulk_import_body, encode_body
from segops_sync.klaviyo_sim import Simulator

from .conftest import Env, FakeClock, make_env


@pytest.fixture
def timed_env(clock: FakeClock) -> Iterator[Env]:
    """The simulator on a clock the test advances: job delays and Retry-After pass on its
    word, not the machine's speed."""
    yield from make_env(Simulator(time_scale=20, seed=7, clock=clock))


# -- operations ----------------------------------------------------------------------------------


def test_get_account_id(env: Env) -> None:
    assert env.client().get_account_id() == env.account_id


def test_get_list(env: Env) -> None:
    found = env.client().get_list(env.list_id)
    assert (found.id, found.name) == (env.list_id, "Test list")


def test_list_ids_are_case_sensitive(env: Env) -> None:
    with pytest.raises(NotFound) as caught:
        env.client().get_list(env.list_id.swapcase())
    assert caught.value.status == 404 and caught.value.permanent


def test_upsert_profile_creates_then_matches_by_email_then_external_id(env: Env) -> None:
    client = env.client()
    first = client.upsert_profile(ProfileInput(email="Ann@Example.com"))
    assert client.upsert_profile(ProfileInput(email="ann@example.com", external_id="u-1")) == first
    assert client.upsert_profile(ProfileInput(external_id="u-1")) == first
    other = client.upsert_profile(ProfileInput(external_id="u-2"))
    assert other != first and len(other) == 26
    profile = env.sim.profile(first)
    assert profile is not None and (profile.email, profile.external_id) == (
        "ann@example.com",
        "u-1",
    )


def test_bulk_import_job_end_to_end(env: Env) -> None:
    client = env.client()
    profiles = [ProfileInput(email=f"m{i}@example.com") for i in range(5)]
    profiles.append(ProfileInput(external_id="e" * 300))  # valid JSON, rejected by Klaviyo
    accepted = client.create_bulk_import_job(profiles, env.list_id)
    assert accepted.created_at is not None and accepted.total_count == 6
    job_id = accepted.id
    job = client.get_bulk_import_job(job_id)
    assert job.created_at == accepted.created_at
    assert (job.id, job.status, job.total_count) == (job_id, "complete", 6)
    assert (job.completed_count, job.failed_count) == (5, 1)
    assert job.expires_at is not None
    [error] = list(client.iter_bulk_import_errors(job_id))
    assert error.pointer == "/data/attributes/profiles/data/5/attributes/external_id"
    assert error.external_id == "e" * 300 and error.email is None  # which member failed
    imported = list(client.iter_bulk_import_profiles(job_id))
    assert {p.email for p in imported} == {f"m{i}@example.com" for i in range(5)}
    assert env.sim.list_member_ids(env.list_id) == {p.id for p in imported}


def test_bulk_job_with_delay_reports_progress(timed_env: Env, clock: FakeClock) -> None:
    env = timed_env
    env.sim.job_delay = 0.3
    client = env.client()
    job_id = client.create_bulk_import_job([ProfileInput(email="a@example.com")], env.list_id).id
    assert client.get_bulk_import_job(job_id).status in ("queued", "processing")
    assert env.sim.list_member_ids(env.list_id) == set()
    assert list(client.iter_bulk_import_errors(job_id)) == []
    clock.advance(0.35)
    assert client.get_bulk_import_job(job_id).status == "complete"
    assert len(env.sim.list_member_ids(env.list_id)) == 1


def test_add_and_remove_are_idempotent_and_keep_the_profile(env: Env) -> None:
    client = env.client()
    ids = [client.upsert_profile(ProfileInput(email=f"r{i}@example.com")) for i in range(3)]
    client.add_profiles_to_list(env.list_id, ids)
    client.add_profiles_to_list(env.list_id, ids)  # again: still 204
    assert env.sim.list_member_ids(env.list_id) == set(ids)
    client.remove_profiles_from_list(env.list_id, ids[:2])
    client.remove_profiles_from_list(env.list_id, ids[:2])  # non-members: still 204
    assert env.sim.list_member_ids(env.list_id) == {ids[2]}
    for pid in ids:
        kept = env.sim.profile(pid)
        assert kept is not None and kept.email_consent == "NEVER_SUBSCRIBED"
    client.add_profiles_to_list(env.list_id, [])  # nothing to send is not an error
    assert env.sim.subscription_calls() == 0


def test_relationship_with_unknown_ids_names_them_by_index(env: Env) -> None:
    client = env.client()
    good = client.upsert_profile(ProfileInput(email="g@example.com"))
    with pytest.raises(InvalidRequest) as caught:
        client.add_profiles_to_list(env.list_id, [good, "01BADBADBADBADBADBADBADBAD", good, "x"])
    assert caught.value.profile_indexes() == {1, 3}
    assert env.sim.list_member_ids(env.list_id) == set()  # the whole call was refused


def test_lookup_of_250_emails_follows_every_page(sim: Simulator) -> None:
    sim.page_size_cap = 30  # Klaviyo may serve fewer than page[size]: links.next must be followed
    for env in make_env(sim):
        expected = {
            f"user{i}@example.com": sim.add_profile(env.account_id, email=f"user{i}@example.com")
            for i in range(250)
        }
        for i in range(20):
            sim.add_profile(env.account_id, email=f"other{i}@example.com")
        client, recorder = env.recording_client()
        asked = [*expected, "nobody@example.com", "User7@Example.com"]
        found = client.find_profile_ids("email", asked)
        assert {k: v for k, v in found.items() if k in expected} == expected
        assert found["User7@Example.com"] == expected["user7@example.com"]
        assert "nobody@example.com" not in found
        pages = [s for s in recorder.sent if s.path == "/api/profiles"]
        followed = [s for s in pages if "page[cursor]" in dict(s.params)]
        assert len(pages) >= 9 and len(followed) >= 6, len(pages)
        for sent in pages:
            values = dict(sent.params)["filter"].count('"') // 2
            assert values <= 100


def test_lookup_by_external_id_in_chunks(env: Env) -> None:
    ids = {
        f"ext-{i}": env.sim.add_profile(env.account_id, external_id=f"ext-{i}") for i in range(120)
    }
    client, recorder = env.recording_client()
    assert client.find_profile_ids("external_id", list(ids)) == ids
    assert len([s for s in recorder.sent if s.path == "/api/profiles"]) == 2


def test_list_lookup_finds_only_profiles_on_the_list_100_emails_a_call(env: Env) -> None:
    on_list = {
        f"l{i}@example.com": env.sim.add_profile(env.account_id, email=f"l{i}@example.com")
        for i in range(150)
    }
    env.sim.add_to_list(env.list_id, on_list.values())
    env.sim.add_profile(env.account_id, email="elsewhere@example.com")  # a profile, not a member
    client, recorder = env.recording_client()
    asked = [*on_list, "elsewhere@example.com", "nobody@example.com", "L7@Example.com"]
    found = client.find_list_profile_ids(env.list_id, asked)
    assert found == {**on_list, "L7@Example.com": on_list["l7@example.com"]}
    calls = [s for s in recorder.sent if s.path == f"/api/lists/{env.list_id}/profiles"]
    assert len(calls) == 2 and len(recorder.sent) == 2
    for sent in calls:
        params = dict(sent.params)
        assert params["filter"].startswith("any(email,[") and params["filter"].count('"') <= 200
        assert params["page[size]"] == "100"


def test_list_lookup_misses_a_member_klaviyo_has_not_indexed_yet(env: Env) -> None:
    env.sim.indexing_delay = 60.0
    pid = env.sim.add_profile(env.account_id, email="new@example.com", visible=False)
    env.sim.add_to_list(env.list_id, [pid])
    client = env.client()
    assert client.find_list_profile_ids(env.list_id, ["new@example.com"]) == {}
    assert list(client.iter_list_profile_ids(env.list_id)) == [pid]  # a whole read sees it


def test_iter_list_profile_ids_reads_every_member(env: Env) -> None:
    client = env.client()
    ids = [env.sim.add_profile(env.account_id, email=f"l{i}@example.com") for i in range(250)]
    for start in range(0, 250, 100):
        client.add_profiles_to_list(env.list_id, ids[start : start + 100])
    assert sorted(client.iter_list_profile_ids(env.list_id)) == sorted(ids)


def test_10001_profiles_become_two_jobs(env: Env) -> None:
    client = env.client()
    profiles = [ProfileInput(email=f"big{i}@example.com") for i in range(10_001)]
    chunks = split_into_jobs(profiles)
    assert [len(c) for c in chunks] == [10_000, 1]
    with pytest.raises(ValueError):
        client.create_bulk_import_job(profiles, env.list_id)
    jobs = [client.create_bulk_import_job(chunk, env.list_id).id for chunk in chunks]
    assert [client.get_bulk_import_job(j).completed_count for j in jobs] == [10_000, 1]
    assert len(env.sim.list_member_ids(env.list_id)) == 10_001


def test_five_megabyte_limit_splits_long_profiles(env: Env) -> None:
    # ~560 bytes each: 10,000 of them exceed 5 MB although the count limit is not reached
    profiles = [
        ProfileInput(email=f"{i:06d}{'a' * 230}@example.com", external_id=f"{i:06d}" + "x" * 249)
        for i in range(10_000)
    ]
    chunks = split_into_jobs(profiles, list_id=env.list_id)
    assert len(chunks) == 2 and sum(map(len, chunks)) == 10_000
    assert [p for c in chunks for p in c] == profiles
    client, recorder = env.recording_client()
    for chunk in chunks:
        client.create_bulk_import_job(chunk, env.list_id)
    sizes = [len(s.body) for s in recorder.sent if s.method == "POST"]
    assert all(size <= MAX_JOB_BYTES for size in sizes) and max(sizes) > MAX_JOB_BYTES - 1000
    assert len(env.sim.list_member_ids(env.list_id)) == 10_000


def test_whole_job_rejection_resolved_by_dropping_the_named_members(env: Env) -> None:
    client = env.client()
    profiles = [ProfileInput(email=f"ok{i}@example.com") for i in range(6)]
    profiles[2] = ProfileInput(email="not-an-email", external_id="bad-2")
    profiles[4] = ProfileInput(email="also@bad@example.com")
    with pytest.raises(InvalidRequest) as caught:
        client.create_bulk_import_job(profiles, env.list_id)
    assert caught.value.status == 400 and caught.value.permanent
    assert caught.value.profile_indexes() == {2, 4}
    assert env.sim.list_member_ids(env.list_id) == set()  # nothing of the job was imported
    kept = [p for i, p in enumerate(profiles) if i not in caught.value.profile_indexes()]
    job_id = client.create_bulk_import_job(kept, env.list_id).id
    assert client.get_bulk_import_job(job_id).completed_count == 4
    assert {p.email for p in env.sim.list_members(env.list_id)} == {p.email for p in kept}


def test_unknown_list_on_a_bulk_job_is_not_found(env: Env) -> None:
    with pytest.raises(NotFound):
        env.client().create_bulk_import_job([ProfileInput(email="a@example.com")], "Nope00")


# -- typed outcomes ------------------------------------------------------------------------------


def test_unknown_key_is_credentials_rejected(env: Env) -> None:
    client = env.client(key="pk_" + "z" * 34)
    with pytest.raises(CredentialsRejected) as caught:
        client.get_list(env.list_id)
    assert caught.value.status == 401 and caught.value.permanent


def test_revoked_key_is_credentials_rejected(env: Env) -> None:
    client = env.client()
    client.get_list(env.list_id)
    env.sim.revoke_key(env.key)
    with pytest.raises(CredentialsRejected):
        client.get_list(env.list_id)


def test_missing_scope_is_permission_denied(env: Env) -> None:
    read_only = env.sim.create_key(env.account_id, scopes=["lists:read", "profiles:read"])
    client = env.client(key=read_only)
    client.get_list(env.list_id)
    with pytest.raises(PermissionDenied) as caught:
        client.create_bulk_import_job([ProfileInput(email="a@example.com")], env.list_id)
    assert caught.value.status == 403 and caught.value.permanent
    assert "lists:write" in caught.value.detail


def test_cloudflare_challenge_is_transient(env: Env) -> None:
    env.sim.set_faults(challenge_rate=1.0)
    with pytest.raises(TransientError) as caught:
        env.client().get_list(env.list_id)
    assert caught.value.status == 403 and not caught.value.permanent
    assert not isinstance(caught.value, PermissionDenied)
    assert "<html" not in str(caught.value).lower()


def test_429_carries_retry_after_and_skips_after_response(timed_env: Env, clock: FakeClock) -> None:
    env = timed_env
    seen: list[tuple[Endpoint, RateLimitHeaders]] = []
    client = env.client(after_response=lambda e, h: seen.append((e, h)))
    env.sim.force_429(1, 0.35)
    with pytest.raises(RateLimited) as caught:
        client.get_list(env.list_id)
    assert caught.value.retry_after == pytest.approx(0.35)
    assert caught.value.status == 429 and not caught.value.permanent
    assert caught.value.endpoint is Endpoint.GET_LIST
    assert seen == []
    clock.advance(0.36)
    client.get_list(env.list_id)
    assert env.sim.early_retries() == 0
    [(endpoint, headers)] = seen
    assert endpoint is Endpoint.GET_LIST
    assert headers.limit == 750 and headers.remaining is not None and headers.reset is not None
    assert client.last_rate_limit == headers


def test_server_errors_are_transient(env: Env) -> None:
    env.sim.set_faults(error_rate=1.0)
    with pytest.raises(TransientError) as caught:
        env.client().get_list(env.list_id)
    assert caught.value.status in (500, 503) and not caught.value.permanent


def test_dropped_connections_are_transient(env: Env) -> None:
    env.sim.set_faults(drop_rate=1.0)
    client = env.client()
    for _ in range(4):  # dropped before and after the simulator applied the request
        with pytest.raises(TransientError) as caught:
            client.get_list(env.list_id)
        assert caught.value.status is None
    assert len(env.sim.requests(endpoint=Endpoint.GET_LIST)) == 4
    env.sim.set_faults()
    assert client.get_list(env.list_id).id == env.list_id  # the pool recovers


def test_timeouts_are_transient(env: Env) -> None:
    env.sim.set_faults(latency=0.5)
    client = env.client(timeout=httpx.Timeout(0.1, connect=1.0))
    with pytest.raises(TransientError) as caught:
        client.get_list(env.list_id)
    assert "timed out" in caught.value.detail


def test_connection_refused_is_transient() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        KlaviyoClient("pk_" + "a" * 34, f"http://127.0.0.1:{port}") as client,
        pytest.raises(TransientError),
    ):
        client.get_account_id()


# -- hooks ---------------------------------------------------------------------------------------


def test_before_request_runs_before_every_request_including_pages(env: Env) -> None:
    calls: list[Endpoint] = []
    client, recorder = env.recording_client(before_request=calls.append)
    ids = [env.sim.add_profile(env.account_id, email=f"h{i}@example.com") for i in range(150)]
    client.add_profiles_to_list(env.list_id, ids)
    list(client.iter_list_profile_ids(env.list_id))
    assert calls == [
        Endpoint.ADD_LIST_PROFILES,
        Endpoint.GET_LIST_PROFILES,
        Endpoint.GET_LIST_PROFILES,
    ]
    assert len(recorder.sent) == len(calls)


def test_before_request_may_abort_the_call(env: Env) -> None:
    class Slow(Exception):
        pass

    def refuse(endpoint: Endpoint) -> None:
        raise Slow(endpoint.value)

    client, recorder = env.recording_client(before_request=refuse)
    with pytest.raises(Slow):
        client.get_list(env.list_id)
    assert recorder.sent == []


# -- limits checked before anything is sent ------------------------------------------------------


def test_oversized_batches_raise_value_error_without_a_request(env: Env) -> None:
    client, recorder = env.recording_client()
    with pytest.raises(ValueError):
        client.add_profiles_to_list(env.list_id, [f"id{i}" for i in range(1_001)])
    with pytest.raises(ValueError):
        client.remove_profiles_from_list(env.list_id, [f"id{i}" for i in range(1_001)])
    with pytest.raises(ValueError):
        client.create_bulk_import_job([], env.list_id)
    huge = [ProfileInput(email=f"{i}@example.com", external_id="y" * 700) for i in range(8_000)]
    assert len(encode_body(bulk_import_body(huge, env.list_id))) > MAX_JOB_BYTES
    with pytest.raises(ValueError):
        client.create_bulk_import_job(huge, env.list_id)
    assert recorder.sent == []


# -- pagination safety ---------------------------------------------------------------------------


@pytest.fixture
def foreign_next_link() -> Iterator[httpx.MockTransport]:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(
            200,
            json={
                "data": [{"type": "profile", "id": "01A"}],
                "links": {
                    "self": str(request.url),
                    "next": "https://evil.example/api/lists/AbC123/relationships/profiles",
                },
            },
        )

    transport = httpx.MockTransport(handler)
    transport.hosts = hosts  # type: ignore[attr-defined]
    yield transport


def test_next_links_to_another_host_are_not_followed(
    foreign_next_link: httpx.MockTransport,
) -> None:
    client = KlaviyoClient("pk_" + "b" * 34, "https://a.klaviyo.com", transport=foreign_next_link)
    with pytest.raises(UnexpectedStatus):
        list(client.iter_list_profile_ids("AbC123"))
    assert foreign_next_link.hosts == ["a.klaviyo.com"]  # type: ignore[attr-defined]


def test_every_error_is_a_klaviyo_error() -> None:
    for cls in (
        CredentialsRejected,
        PermissionDenied,
        NotFound,
        InvalidRequest,
        RateLimited,
        TransientError,
        UnexpectedStatus,
    ):
        assert issubclass(cls, KlaviyoError)
    assert not TransientError.permanent and not RateLimited.permanent
    assert CredentialsRejected.permanent and PermissionDenied.permanent and NotFound.permanent
    assert InvalidRequest.permanent
