"""The client and the simulator agree on the list read back, opt-in, traits and suppression."""

from __future__ import annotations

from segops_sync.klaviyo import ProfileInput
from segops_sync.klaviyo_sim import Simulator

from .conftest import Env


def _seed(env: Env, n: int) -> list[str]:
    ids = [env.sim.add_profile(env.account_id, email=f"m{i}@example.com") for i in range(n)]
    ids.append(env.sim.add_profile(env.account_id, external_id="opaque-1"))
    env.sim.add_to_list(env.list_id, ids)
    return ids


def test_list_read_back_pages_with_identifiers(env: Env, sim: Simulator) -> None:
    ids = _seed(env, 230)
    sim.page_size_cap = 70  # Klaviyo may serve fewer than asked: every page is followed
    client = env.client()
    pages = list(client.iter_list_members(env.list_id))
    assert [len(p) for p in pages] == [70, 70, 70, 21]
    members = [m for page in pages for m in page]
    assert [m.id for m in members] == ids  # join order, nobody twice
    assert members[0].email == "m0@example.com" and members[0].external_id is None
    assert (members[-1].email, members[-1].external_id) == (None, "opaque-1")


def test_a_profile_taken_off_the_list_behind_our_back_is_not_read_back(env: Env) -> None:
    ids = _seed(env, 5)
    env.sim.remove_from_list(env.list_id, ids[:2])
    read = [m.id for page in env.client().iter_list_members(env.list_id) for m in page]
    assert read == ids[2:]
    assert env.sim.profile(ids[0]) is not None  # only the membership went


def test_get_list_reports_opt_in_process(env: Env) -> None:
    client = env.client()
    assert client.get_list(env.list_id).opt_in_process == "double_opt_in"  # Klaviyo's default
    single = env.sim.create_list(env.account_id, "Single", opt_in_process="single_opt_in")
    assert client.get_list(single).opt_in_process == "single_opt_in"


def test_custom_properties_merge_and_fields_are_stored(env: Env) -> None:
    client = env.client()
    client.create_bulk_import_job(
        [ProfileInput(email="p@example.com", fields={"first_name": "Ann"}, properties={"a": 1})],
        env.list_id,
    )
    client.create_bulk_import_job(
        [ProfileInput(email="p@example.com", properties={"b": "two"})], env.list_id
    )
    [profile] = env.sim.list_members(env.list_id)
    # Klaviyo keeps properties it was not sent, and fields a later import left out
    assert profile.attributes["properties"] == {"a": 1, "b": "two"}
    assert profile.attributes["first_name"] == "Ann"


def test_suppressed_profiles_are_read_back_as_such_and_stay_on_the_list(env: Env) -> None:
    ids = _seed(env, 3)
    env.sim.suppress(ids[1])
    read = [m for page in env.client().iter_list_members(env.list_id) for m in page]
    assert [m.suppressed for m in read] == [False, True, False, False]
    assert env.sim.list_member_ids(env.list_id) == set(ids)
