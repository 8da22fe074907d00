"""Verification in the domain, without a broker: traits sent and re-sent, the list read back,
the ledger corrected, foreign profiles removed through the mass-removal guard."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, text

from segops_sync.config import get_settings
from segops_sync.db.models import Connector, LedgerEntry, SyncBatchItem
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import Endpoint
from segops_sync.klaviyo_sim import Simulator
from segops_sync.sync.costs import Delta, expected_requests
from segops_sync.sync.inputs.identity import record_identity
from segops_sync.sync.planner import preview
from segops_sync.sync.verify import FOREIGN_PREFIX, release_foreign, verify_list
from tests.sync.helpers import World, open_world
from tests.sync.helpers import make_connector as _connector
from tests.sync.helpers import run_sync as _sync
from tests.sync.helpers import set_members as _set_members


@pytest.fixture(params=["bulk"])
def world(
    server: tuple[Simulator, str], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[World]:
    """Every add in a bulk job, as in test_pipeline_functions.py."""
    yield from open_world(server, monkeypatch, request.param)


def _traits(connector_id: str, names: list[str]) -> None:
    with session_scope() as s:
        s.get_one(Connector, connector_id).traits = names


def _identify(user_id: str, traits: dict[str, Any]) -> None:
    with session_scope() as s:
        record_identity(s, user_id, traits.get("email"), traits)


def _profile(w: World, external_id: str) -> Any:
    [found] = [p for p in w.sim.list_members(w.list_id) if p.external_id == external_id]
    return found


def test_named_traits_are_sent_refused_values_dropped_and_counted(world: World) -> None:
    tag = uuid.uuid4().hex[:6]
    ann, bob, cy = f"{tag}-ann", f"{tag}-bob", f"{tag}-cy"
    connector_id = _connector(world, f"tr-{tag}", [ann, bob, cy])
    _traits(connector_id, ["first_name", "phone_number", "plan"])
    _identify(
        ann,
        {
            "email": f"{ann}@x.example",
            "first_name": "Ann",
            "phone_number": "+14155552671",
            "plan": "pro",
            "secret_score": 99,
        },
    )
    _identify(bob, {"first_name": 12, "phone_number": "555-0100", "plan": "free"})
    run = _sync(world, connector_id)
    assert (run.status, run.added, run.rejected, run.traits_dropped) == ("succeeded", 3, 0, 2)
    a = _profile(world, ann).attributes
    assert (a["email"], a["first_name"], a["phone_number"]) == (
        f"{ann}@x.example",
        "Ann",
        "+14155552671",
    )
    assert a["properties"] == {"plan": "pro"}  # only the named traits go to Klaviyo
    b = _profile(world, bob).attributes
    assert "first_name" not in b and "phone_number" not in b and b["properties"] == {"plan": "free"}
    assert _profile(world, cy).attributes.get("properties") in (None, {})
    with session_scope() as s:
        dropped = dict(
            s.execute(
                select(SyncBatchItem.user_id, SyncBatchItem.dropped_traits).where(
                    SyncBatchItem.run_id == run.id, SyncBatchItem.dropped_traits.is_not(None)
                )
            ).all()
        )
    assert dropped == {bob: ["first_name", "phone_number"]}
    assert world.sim.subscription_calls() == 0


def test_a_changed_trait_is_sent_again_for_only_those_members(world: World) -> None:
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}" for i in range(20)]
    connector_id = _connector(world, f"tc-{tag}", members)
    _traits(connector_id, ["plan", "first_name"])
    for m in members:
        _identify(m, {"plan": "free", "first_name": "N"})
    assert _sync(world, connector_id).added == 20

    jobs_before = len(world.sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB))
    again = _sync(world, connector_id)  # nothing changed: nothing is sent
    assert (again.added, again.updated) == (0, 0)
    assert len(world.sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB)) == jobs_before

    _identify(members[3], {"plan": "pro", "first_name": "N"})
    _identify(members[7], {"plan": "free", "first_name": "Ned", "unnamed": "changes nothing"})
    _identify(members[9], {"plan": "free", "first_name": "N", "unnamed": "x"})  # same named traits
    with session_scope() as s:
        p = preview(s, connector_id)
        assert (p.adds, p.updates) == (0, 2)  # membership did not change, two trait sets did
    run = _sync(world, connector_id)
    assert (run.status, run.added, run.updated, run.removed) == ("succeeded", 0, 2, 0)
    [job] = world.sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB)[jobs_before:]
    assert job.status == 202  # one bulk job, two profiles
    with session_scope() as s:
        sent = set(s.scalars(select(SyncBatchItem.user_id).where(SyncBatchItem.run_id == run.id)))
    assert sent == {members[3], members[7]}
    assert _profile(world, members[3]).attributes["properties"]["plan"] == "pro"
    assert _profile(world, members[7]).attributes["first_name"] == "Ned"
    assert _sync(world, connector_id).updated == 0  # the ledger keeps the new hash

    _traits(connector_id, ["plan"])  # a connector that names other traits sends them again
    assert _sync(world, connector_id).updated == 20


def test_members_taken_off_the_list_are_found_and_added_again(world: World) -> None:
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}@x.example" for i in range(30)] + [f"{tag}-u{i}" for i in range(10)]
    connector_id = _connector(world, f"tv-{tag}", members)
    assert _sync(world, connector_id).added == 40
    gone = [p.id for p in world.sim.list_members(world.list_id)][:10]
    world.sim.remove_from_list(world.list_id, gone)
    assert _sync(world, connector_id).added == 0  # the ledger alone cannot know

    reads_before = len(world.sim.requests(endpoint=Endpoint.GET_LIST_MEMBERS))
    found = verify_list(connector_id, world.access, get_settings())
    assert (found.in_list, found.expected, found.missing, found.extra) == (30, 40, 10, 0)
    assert found.forgotten == 10
    reads = world.sim.requests(endpoint=Endpoint.GET_LIST_MEMBERS)[reads_before:]
    assert len(reads) == 1 and all(r.status == 200 for r in reads)
    run = _sync(world, connector_id)
    assert (run.status, run.added) == ("succeeded", 10)
    assert verify_list(connector_id, world.access, get_settings()).matches
    with session_scope() as s:
        assert not s.scalar(
            text("SELECT count(*) FROM list_snapshots WHERE connector_id = :c"), {"c": connector_id}
        )


def test_foreign_profiles_are_removed_only_when_asked_and_through_the_guard(world: World) -> None:
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}@x.example" for i in range(10)]
    connector_id = _connector(world, f"tx-{tag}", members)
    _sync(world, connector_id)
    strangers = [
        world.sim.add_profile(world.account, email=f"{tag}-s{i}@x.example") for i in range(3)
    ]
    world.sim.add_to_list(world.list_id, strangers)

    found = verify_list(connector_id, world.access, get_settings())
    assert (found.in_list, found.missing, found.extra, found.foreign) == (13, 0, 3, 3)
    assert _sync(world, connector_id).removed == 0  # reported, never removed unasked

    verify_list(connector_id, world.access, get_settings(), adopt_extra=True)
    run = _sync(world, connector_id)
    assert (run.status, run.removed) == ("succeeded", 3)
    assert world.sim.list_member_ids(world.list_id).isdisjoint(strangers)
    assert all(world.sim.profile(p) is not None for p in strangers)  # off the list, not deleted
    assert verify_list(connector_id, world.access, get_settings()).matches

    # many strangers: the mass-removal guard holds the run, and they are let go again
    crowd = [world.sim.add_profile(world.account, email=f"{tag}-c{i}@x.example") for i in range(30)]
    world.sim.add_to_list(world.list_id, crowd)
    verify_list(connector_id, world.access, get_settings(), adopt_extra=True)
    held = _sync(world, connector_id)
    assert held.status == "held" and "--allow-mass-removal" in (held.error or ""), held.error
    with session_scope() as s:
        assert release_foreign(s, connector_id) == 30
    with session_scope() as s:
        left = s.scalars(
            select(LedgerEntry.user_id).where(
                LedgerEntry.connector_id == connector_id,
                LedgerEntry.user_id.startswith(FOREIGN_PREFIX),
            )
        ).all()
    assert left == []
    _set_members(f"tx-{tag}", members)
    assert _sync(world, connector_id).status == "succeeded"


def test_foreign_profiles_enter_the_ledger_by_id_alone_and_a_deleted_one_is_let_go(
    world: World,
) -> None:
    """A foreign profile may be someone we were asked to forget: neither its email nor its
    external id enters our tables. One deleted in Klaviyo before the removal has nothing else
    to be found by, so it is taken as gone at once (no lookup, no wait for indexing)."""
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}@x.example" for i in range(10)]  # 3 strangers: under the guard
    connector_id = _connector(world, f"tid-{tag}", members)
    _sync(world, connector_id)
    strangers = [
        world.sim.add_profile(world.account, email=f"{tag}-s{i}@x.example", external_id=f"x{i}")
        for i in range(3)
    ]
    world.sim.add_to_list(world.list_id, strangers)
    verify_list(connector_id, world.access, get_settings(), adopt_extra=True)
    with session_scope() as s:
        adopted = s.execute(
            select(LedgerEntry.user_id, LedgerEntry.email, LedgerEntry.external_id).where(
                LedgerEntry.connector_id == connector_id,
                LedgerEntry.user_id.startswith(FOREIGN_PREFIX),
            )
        ).all()
    assert sorted(adopted) == sorted((FOREIGN_PREFIX + p, None, None) for p in strangers)

    world.sim.delete_profile(strangers[0])
    before = len(world.sim.requests())
    run = _sync(world, connector_id)
    assert (run.status, run.removed) == ("succeeded", 3)
    assert world.sim.list_member_ids(world.list_id).isdisjoint(strangers)
    sent = Counter(r.endpoint for r in world.sim.requests()[before:] if r.account == world.account)
    assert sent[Endpoint.GET_PROFILES] == sent[Endpoint.GET_LIST_MEMBERS] == 0, "no lookup"
    with session_scope() as s:
        kept = s.execute(
            select(SyncBatchItem.email, SyncBatchItem.external_id).where(
                SyncBatchItem.run_id == run.id
            )
        ).all()
    assert sorted(kept) == [(None, None)] * 3
    assert verify_list(connector_id, world.access, get_settings()).matches


def test_context_identified_keeps_every_trait_of_the_latest_event(world: World) -> None:
    import pytest

    from segops_sync.sync.inputs.identity import BadIdentity

    user = f"id-{uuid.uuid4().hex[:6]}"
    _identify(user, {"email": "first@x.example", "first_name": "Ann", "plan": "pro"})
    _identify(user, {"first_name": "Annie", "nested": {"a": [1, 2]}})  # no email this time
    with session_scope() as s:
        email, traits = s.execute(
            text("SELECT email, traits FROM identities WHERE user_id = :u"), {"u": user}
        ).one()
    # the email seen before stays; the traits are those of the latest event only
    assert email == "first@x.example"
    assert traits == {"first_name": "Annie", "nested": {"a": [1, 2]}}
    for bad in ({"x": "nul\x00byte"}, {"x": float("nan")}, {"x": "y" * 70_000}):
        with pytest.raises(BadIdentity), session_scope() as s:
            record_identity(s, user, None, bad)
    with pytest.raises(BadIdentity), session_scope() as s:
        record_identity(s, user, "not-an-email", {"email": "not-an-email"})


def test_the_read_back_waits_out_429s_and_a_dead_key_leaves_nothing(world: World) -> None:
    from segops_sync.klaviyo import CredentialsRejected

    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}@x.example" for i in range(5)]
    connector_id = _connector(world, f"tz-{tag}", members)
    _sync(world, connector_id)
    before, early = world.sim.count_429(), world.sim.early_retries()
    world.sim.force_429(2, 0.3)  # the next two requests are refused with Retry-After
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    found = verify_list(connector_id, world.access, get_settings(), sleep=sleep)
    assert found.matches and found.in_list == 5
    assert world.sim.count_429() == before + 2
    assert len(slept) >= 2 and all(s >= 0.3 for s in slept[:2])  # never before Retry-After
    assert world.sim.early_retries() == early

    world.sim.revoke_key(world.key)
    with pytest.raises(CredentialsRejected):
        verify_list(connector_id, world.access, get_settings())
    with session_scope() as s:
        left = s.scalar(
            text("SELECT count(*) FROM list_snapshots WHERE connector_id = :c"), {"c": connector_id}
        )
    assert left == 0


def test_a_changed_trait_goes_through_the_bulk_path_too(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import _reset_settings

    monkeypatch.setenv("SEGOPS_DIRECT_ADD_LIMIT", "0")  # every add as a bulk import job
    _reset_settings()
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-b{i}" for i in range(6)]
    connector_id = _connector(world, f"tb-{tag}", members)
    _traits(connector_id, ["plan", "phone_number"])
    for m in members:
        _identify(m, {"plan": "free", "phone_number": "+14155552671"})
    _identify(members[5], {"plan": "free", "phone_number": "not a phone"})
    first = _sync(world, connector_id)
    assert (first.added, first.traits_dropped) == (6, 1)
    jobs = len(world.sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB))
    _identify(members[2], {"plan": "team", "phone_number": "+14155552671"})
    run = _sync(world, connector_id)
    assert (run.status, run.added, run.updated) == ("succeeded", 0, 1)
    assert len(world.sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB)) == jobs + 1
    assert _profile(world, members[2]).attributes["properties"]["plan"] == "team"
    assert _sync(world, connector_id).updated == 0


def _ledger_ids(connector_id: str) -> dict[str, str | None]:
    with session_scope() as s:
        rows = s.execute(
            select(LedgerEntry.user_id, LedgerEntry.profile_id).where(
                LedgerEntry.connector_id == connector_id
            )
        ).all()
    return {user_id: profile_id for user_id, profile_id in rows}


def _list_ids(w: World) -> dict[str, str]:
    return {p.external_id or p.email or "": p.id for p in w.sim.list_members(w.list_id)}


def test_the_read_back_keeps_each_members_profile_id_in_the_ledger(world: World) -> None:
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}@x.example" for i in range(20)] + [f"{tag}-u{i}" for i in range(10)]
    connector_id = _connector(world, f"ids-{tag}", members)
    assert _sync(world, connector_id).added == 30
    assert verify_list(connector_id, world.access, get_settings()).matches
    assert _ledger_ids(connector_id) == _list_ids(world)
    # a merged profile: the next read-back replaces the id it stored
    merged = world.sim.merge_profile(_list_ids(world)[members[3]])
    assert verify_list(connector_id, world.access, get_settings()).matches
    assert _ledger_ids(connector_id)[members[3]] == merged
    assert _ledger_ids(connector_id) == _list_ids(world)


def test_a_churn_after_a_read_back_sends_only_the_deletes(world: World) -> None:
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}@x.example" for i in range(150)] + [f"{tag}-u{i}" for i in range(150)]
    connector_id = _connector(world, f"churn-{tag}", members)
    assert _sync(world, connector_id).added == 300
    assert verify_list(connector_id, world.access, get_settings()).matches
    leavers = members[:50] + members[150:200]  # 50 emails, 50 external_ids, every id known
    joiners = [f"{tag}-j{i}@x.example" for i in range(100)]
    before = len(world.sim.requests())
    _set_members(f"churn-{tag}", [m for m in members if m not in leavers] + joiners)
    run = _sync(world, connector_id)
    assert (run.status, run.added, run.removed) == ("succeeded", 100, 100)
    assert set(_list_ids(world)) == set(members + joiners) - set(leavers)
    sent = Counter(r.endpoint for r in world.sim.requests()[before:] if r.account == world.account)
    assert sent[Endpoint.GET_PROFILES] == sent[Endpoint.GET_LIST_MEMBERS] == 0, "no lookup"
    expected = expected_requests(Delta.of(100, [(u, "id") for u in leavers]), direct=False)
    assert {e: sent[e] for e in expected.by_endpoint} == expected.by_endpoint
    assert expected.by_endpoint[Endpoint.REMOVE_LIST_PROFILES] == 1


def test_a_stale_profile_id_is_looked_up_again_and_nothing_of_ours_stays_on_the_list(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import _reset_settings

    # a member Klaviyo cannot find at all is taken as off the list at once
    monkeypatch.setenv("SEGOPS_INDEXING_WAIT", "0")
    monkeypatch.setenv("SEGOPS_PROFILE_GONE_AFTER", "0")
    _reset_settings()
    tag = uuid.uuid4().hex[:6]
    members = [f"{tag}-{i}@x.example" for i in range(20)] + [f"{tag}-u{i}" for i in range(20)]
    connector_id = _connector(world, f"stale-{tag}", members)
    assert _sync(world, connector_id).added == 40
    assert verify_list(connector_id, world.access, get_settings()).matches
    ids = _ledger_ids(connector_id)
    # Klaviyo forgets three of the ids the ledger holds: two profiles merged (a new id, still
    # on the list), one deleted (on no list any more)
    merged_email = world.sim.merge_profile(str(ids[members[0]]))
    merged_ext = world.sim.merge_profile(str(ids[members[20]]))
    world.sim.delete_profile(str(ids[members[1]]))
    leavers = [members[0], members[1], members[2], members[20], members[21]]
    before = len(world.sim.requests())
    _set_members(f"stale-{tag}", [m for m in members if m not in leavers])
    run = _sync(world, connector_id)
    assert (run.status, run.removed) == ("succeeded", 5)
    assert set(_list_ids(world)) == set(members) - set(leavers)
    assert {merged_email, merged_ext}.isdisjoint(world.sim.list_member_ids(world.list_id))
    sent = [
        (r.endpoint, r.status)
        for r in world.sim.requests()[before:]
        if r.account == world.account and r.endpoint != Endpoint.GET_ACCOUNTS
    ]
    assert sent == [
        (Endpoint.REMOVE_LIST_PROFILES, 400),  # refused: three ids Klaviyo no longer knows
        (Endpoint.GET_PROFILES, 200),  # the merged external_id, account-wide
        (Endpoint.GET_LIST_MEMBERS, 200),  # both emails, on the list: one merged, one gone
        (Endpoint.REMOVE_LIST_PROFILES, 204),
    ]
    assert set(_ledger_ids(connector_id)) == set(members) - set(leavers)
