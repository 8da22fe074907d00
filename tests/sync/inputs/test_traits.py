"""Which traits a connector sends, and the profile Klaviyo gets from them (no services)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from segops_sync.klaviyo.payloads import profile_attributes
from segops_sync.klaviyo_sim import validate_body
from segops_sync.sync.inputs.traits import BadTraits, is_e164, klaviyo_profile, parse_trait_names


def test_trait_names_are_parsed_in_order_without_repeats() -> None:
    assert parse_trait_names("first_name, phone_number,plan,plan") == [
        "first_name",
        "phone_number",
        "plan",
    ]
    assert parse_trait_names("") == []
    assert parse_trait_names(["tier", "first_name"]) == ["tier", "first_name"]


@pytest.mark.parametrize(
    "value", ["first_name,,plan", "email", "external_id", "$consent", "has space", "x" * 101]
)
def test_bad_trait_names_are_refused(value: str) -> None:
    with pytest.raises(BadTraits):
        parse_trait_names(value)


def test_too_many_traits_are_refused() -> None:
    with pytest.raises(BadTraits, match="at most 50"):
        parse_trait_names([f"t{i}" for i in range(51)])


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("+14155552671", True),
        ("+447911123456", True),
        ("+33612345678", True),
        ("14155552671", False),  # no +
        ("+1 415 555 2671", False),  # a real number, but not written in E.164
        ("+1 (415) 555-2671", False),
        ("+1415555267", False),  # too short for the US
        ("+10005552671", False),  # not a valid number
        ("+999123456789", False),  # no such country code
        ("call me", False),
    ],
)
def test_phone_numbers_must_be_valid_e164(value: str, ok: bool) -> None:
    assert is_e164(value) is ok


def test_standard_traits_become_fields_others_custom_properties() -> None:
    built = klaviyo_profile(
        "ann@example.com",
        "u-1",
        {
            "first_name": "Ann",
            "last_name": "Lee",
            "phone_number": "+14155552671",
            "organization": "Shop",
            "title": "Buyer",
            "locale": "en-US",
            "plan": "pro",
            "seats": 3,
        },
    )
    assert built.dropped == []
    attrs = profile_attributes(built.profile)
    assert attrs == {
        "email": "ann@example.com",
        "external_id": "u-1",
        "first_name": "Ann",
        "last_name": "Lee",
        "phone_number": "+14155552671",
        "organization": "Shop",
        "title": "Buyer",
        "locale": "en-US",
        "properties": {"plan": "pro", "seats": 3},
    }


@pytest.mark.parametrize(
    ("traits", "dropped"),
    [
        ({"phone_number": "415-555-2671"}, ["phone_number"]),
        ({"first_name": 42}, ["first_name"]),
        ({"last_name": ""}, ["last_name"]),
        ({"title": "x" * 256}, ["title"]),
        ({"locale": "english please"}, ["locale"]),
        ({"organization": {"name": "Shop"}}, ["organization"]),
        ({"bio": "x" * 20_000}, ["bio"]),
        ({"phone_number": "bad", "plan": "pro", "first_name": "Ann"}, ["phone_number"]),
    ],
)
def test_values_klaviyo_would_refuse_are_left_out_and_named(
    traits: dict[str, Any], dropped: list[str]
) -> None:
    built = klaviyo_profile(None, "u-1", traits)
    assert built.dropped == dropped
    attrs = profile_attributes(built.profile)
    for name in dropped:
        assert name not in attrs and name not in attrs.get("properties", {})
    body = {"data": {"type": "profile", "attributes": attrs}}
    # what is left is a body Klaviyo's official model takes
    assert validate_body("profile_import", body, use_models=True) == []


def test_null_traits_are_absent_not_refused() -> None:
    built = klaviyo_profile("a@example.com", None, {"first_name": None, "plan": None})
    assert built.dropped == []
    assert profile_attributes(built.profile) == {"email": "a@example.com"}


def test_a_profile_over_klaviyo_s_100_kb_loses_its_largest_custom_values() -> None:
    traits = {f"note{i}": "x" * (9_000 + i) for i in range(15)}  # ~135 KB in all
    traits["plan"] = "pro"
    built = klaviyo_profile("a@example.com", None, traits)
    attrs = profile_attributes(built.profile)
    size = len(json.dumps({"type": "profile", "attributes": attrs}).encode())
    assert size <= 100 * 1024
    assert attrs["properties"]["plan"] == "pro"  # small values stay
    assert built.dropped and all(name.startswith("note") for name in built.dropped)
    assert "note14" in built.dropped  # the largest went first
    assert set(built.dropped).isdisjoint(attrs["properties"])
