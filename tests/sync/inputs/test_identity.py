from __future__ import annotations

import pytest

from segops_sync.sync.inputs.identity import identity_for, is_email


@pytest.mark.parametrize(
    ("user_id", "expected"),
    [
        ("ann@example.com", True),
        ("a.b+c@sub.example.co", True),
        ("cust-42", False),
        ("no@tld", False),
        ("two@@example.com", False),
        ("sp ace@example.com", False),
    ],
)
def test_is_email(user_id: str, expected: bool) -> None:
    assert is_email(user_id) is expected


def test_email_user_id_is_the_email() -> None:
    assert identity_for("ann@example.com", "other@example.com") == ("ann@example.com", None)


def test_other_user_id_is_external_id_with_identified_email() -> None:
    assert identity_for("cust-1", "c1@example.com") == ("c1@example.com", "cust-1")
    assert identity_for("cust-2", None) == (None, "cust-2")
