from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text

from segops_sync.db.session import session_scope
from segops_sync.sync.inputs.identity import identity_for, is_email, record_identity


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


def test_identified_at_moves_only_when_the_email_or_traits_change(
    segops_env: dict[str, str],
) -> None:
    """An event sent twice (a redelivery, a producer's retry) must not make a rejected member
    due again: identified_at is when its data last changed."""
    user = f"cust-{uuid.uuid4().hex[:8]}"

    def identify(email: str | None, traits: dict[str, Any] | None) -> tuple[bool, datetime]:
        with session_scope() as s:
            changed = record_identity(s, user, email, traits)
        with session_scope() as s:
            return changed, s.scalar(
                text("SELECT identified_at FROM identities WHERE user_id = :u"), {"u": user}
            )

    first, at_first = identify("ann@example.com", {"plan": "pro"})
    again, at_again = identify("ann@example.com", {"plan": "pro"})
    no_email, at_no_email = identify(None, {"plan": "pro"})  # keeps the email seen before
    changed, at_changed = identify(None, {"plan": "team"})
    assert (first, again, no_email, changed) == (True, False, False, True)
    assert at_first == at_again == at_no_email < at_changed
