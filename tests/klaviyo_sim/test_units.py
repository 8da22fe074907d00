"""The simulator's pure pieces: filter parsing, rounding of waits, ids."""

from __future__ import annotations

import random

import pytest

from segops_sync.klaviyo_sim.filters import FilterError, parse_filter
from segops_sync.klaviyo_sim.ids import _CROCKFORD, UlidFactory, encode_ulid
from segops_sync.klaviyo_sim.ratelimit import format_seconds, round_up


def test_filter_parser_refuses_unquoted_values() -> None:
    with pytest.raises(FilterError):
        parse_filter("any(email,[a@b.co])")
    assert parse_filter("equals(external_id,'u-1')").values == ("u-1",)


def test_simulator_rounds_waits_up() -> None:
    assert round_up(0.341) == 0.35
    assert round_up(0.35) == 0.35
    assert round_up(0.0) == 0.01
    assert (format_seconds(2.0), format_seconds(0.3), format_seconds(0.351)) == ("2", "0.3", "0.36")


@pytest.mark.parametrize("value", [0, 1, 31, 32, 2**80 - 1, 2**80, 2**127 + 12345, 2**128 - 1])
def test_simulator_ulids_are_crockford_base32_digit_by_digit(value: int) -> None:
    """The fast encoding (base64's base32, translated) gives each 5-bit digit, top first."""
    digits = "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
    assert encode_ulid(value) == digits
    ids = UlidFactory(random.Random(7))
    made = [ids.new() for _ in range(1000)]
    assert made == sorted(made) and len(set(made)) == 1000 and {len(i) for i in made} == {26}
