"""How a SegOps user_id becomes a Klaviyo identity.

A user_id that is an email address becomes the profile's ``email``; any other becomes its
``external_id``, with the email of the latest ``context_identified`` trait when there is one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

# Deliberately simple: one @, no spaces, a dot in the domain. The same rule runs in SQL below.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
_EMAIL_RE = re.compile(EMAIL_PATTERN)
MAX_USER_ID = 255
# The longest user id a look-up by id accepts (members trace, members forget): the member-list
# input caps ids at MAX_USER_ID, but the recompute service writes segment_members itself, and an
# id Klaviyo rejected for its length is exactly one a person wants to trace, or must forget.
# (Below the 2,704 bytes a PostgreSQL primary-key index holds.)
MAX_KNOWN_USER_ID = 1_000


def known_user_id_problem(user_id: object) -> str | None:
    """What keeps ``user_id`` from being looked up by id (members trace, members forget), or
    None. The reason never echoes the id: it may be an email."""
    if not isinstance(user_id, str) or not user_id:
        return "the user id is empty"
    if len(user_id) > MAX_KNOWN_USER_ID:
        return f"the user id is longer than {MAX_KNOWN_USER_ID} characters"
    if any(ch < " " or ch == "\x7f" for ch in user_id):
        return "the user id contains a control character"
    try:
        user_id.encode("utf-8")  # an unpaired surrogate is no text PostgreSQL holds
    except UnicodeEncodeError:
        return "the user id is not valid text"
    return None


def is_email(value: str) -> bool:
    return bool(_EMAIL_RE.fullmatch(value))


def identity_for(user_id: str, identified_email: str | None) -> tuple[str | None, str | None]:
    """(email, external_id) for a member, as the SQL planner computes it."""
    if is_email(user_id):
        return user_id, None
    return identified_email, user_id


# The SQL twin of identity_for, used where the delta is computed.
SQL_EMAIL = f"CASE WHEN sm.user_id ~ '{EMAIL_PATTERN}' THEN sm.user_id ELSE i.email END"
SQL_EXTERNAL_ID = f"CASE WHEN sm.user_id ~ '{EMAIL_PATTERN}' THEN NULL ELSE sm.user_id END"
# The same two columns from one match of the pattern per member instead of two, where every
# member of a batch is written: the pattern costs about 0.45 µs a row, a fifth of writing a
# first sync's members. SQL_IS_EMAIL joins after ``sm`` (OFFSET 0 keeps PostgreSQL from
# inlining the match into both columns again).
SQL_IS_EMAIL = f"CROSS JOIN LATERAL (SELECT sm.user_id ~ '{EMAIL_PATTERN}' AS is_email OFFSET 0) k"
SQL_EMAIL_ONCE = "CASE WHEN k.is_email THEN sm.user_id ELSE i.email END"
SQL_EXTERNAL_ID_ONCE = "CASE WHEN k.is_email THEN NULL ELSE sm.user_id END"


class BadIdentity(ValueError):
    pass


# A context_identified event larger than this is refused: traits are profile data, not payloads.
MAX_TRAITS_BYTES = 64 * 1024


# PostgreSQL advisory lock class of one member (the object id is a hash of the user id): every
# identity write and a forget of the same member take it (sync/forget.py), so a write under way
# when a forget begins commits first and the forget's purge deletes it.
MEMBER_LOCK_CLASS = 7313009


def hold_member(session: Session, user_id: str) -> None:
    session.execute(
        text("SELECT pg_advisory_xact_lock(:c, hashtext(:u))"),
        {"c": MEMBER_LOCK_CLASS, "u": user_id},
    )


def record_identity(
    session: Session, user_id: str, email: str | None, traits: Mapping[str, Any] | None = None
) -> bool:
    """Store the latest ``context_identified`` event of a user: all its traits, as received,
    and its email (an event without an email keeps the one seen before). Returns whether the
    stored email or traits changed (a member Klaviyo rejected is sent again only then);
    ``identified_at`` moves only then too, so an event sent twice makes no retry due."""
    if not user_id or len(user_id) > MAX_USER_ID:
        raise BadIdentity(f"user_id must be 1 to {MAX_USER_ID} characters")
    if email is not None and not is_email(email):
        raise BadIdentity("email is not an email address")  # never echoed: personal data
    doc = dict(traits) if traits is not None else ({"email": email} if email else {})
    try:
        encoded = json.dumps(doc, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise BadIdentity("traits must be JSON") from None
    if len(encoded.encode()) > MAX_TRAITS_BYTES:
        raise BadIdentity(f"traits exceed {MAX_TRAITS_BYTES} bytes")
    if "\\u0000" in encoded or "\x00" in encoded:
        raise BadIdentity("traits contain a NUL character, which PostgreSQL cannot store")
    hold_member(session, user_id)
    # ``before`` reads the row as it was when the statement began (one snapshot for both parts).
    changed = session.scalar(
        text(
            "WITH before AS (SELECT email, traits FROM identities WHERE user_id = :u) "
            "INSERT INTO identities AS i (user_id, email, traits, identified_at) "
            "VALUES (:u, :e, CAST(:t AS jsonb), now()) "
            "ON CONFLICT (user_id) DO UPDATE SET email = COALESCE(EXCLUDED.email, i.email), "
            "traits = EXCLUDED.traits, identified_at = CASE WHEN i.email IS NOT DISTINCT FROM "
            "COALESCE(EXCLUDED.email, i.email) AND i.traits = EXCLUDED.traits "
            "THEN i.identified_at ELSE now() END "
            "RETURNING NOT EXISTS (SELECT 1 FROM before b WHERE b.email IS NOT DISTINCT FROM "
            "i.email AND b.traits = i.traits)"
        ),
        {"u": user_id, "e": email, "t": encoded},
    )
    return bool(changed)
