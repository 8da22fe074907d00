"""Which ``context_identified`` traits a connector sends, and how they become a Klaviyo profile.

A connector names its traits (``--traits first_name,phone_number,plan``). Klaviyo's standard
profile fields (PROFILE_FIELDS) are sent as those fields, every other name as a custom property
of the same name. A value Klaviyo would refuse is left out and counted, never sent: one bad
value must not cost its member the list (a bulk import job refuses a malformed phone number for
the whole job).

Limits that Klaviyo does not document are choices, marked "choice:".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from segops_sync.klaviyo import PROFILE_FIELDS, ProfileInput
from segops_sync.klaviyo.payloads import encode_body, profile_resource

MAX_TRAITS = 50
# choice: a name a Klaviyo property can carry and a CLI list can hold (no comma, no space).
TRAIT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
# The identity mapping owns these: a trait must not override what the sync matches on.
RESERVED = frozenset({"email", "external_id", "id", "_kx", "anonymous_id"})
# choice: Klaviyo publishes no per-field length; 255 is what its UI fields hold.
MAX_FIELD_CHARS = 255
# choice: a custom property value of at most 10 KB; the whole profile stays under Klaviyo's
# 100 KB per profile (a little kept back for the job's own JSON around it).
MAX_PROPERTY_BYTES = 10 * 1024
MAX_PROFILE_BYTES = 100 * 1024 - 256
# IETF BCP 47 language tag, as Klaviyo describes `locale` ("en-US", "fr", "zh-Hant-TW").
LOCALE_RE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")


class BadTraits(ValueError):
    """A trait list a person gave is unusable; the message says why."""


def parse_trait_names(value: str | Iterable[str]) -> list[str]:
    """``"first_name,phone_number,plan"`` (or a list) -> validated names, order kept, no repeats.

    An empty string or list means: none but the email."""
    raw = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    # A refused name is said by its place in the list, never echoed: it may be anything pasted.
    for place, item in enumerate(raw, start=1):
        if not isinstance(item, str):
            raise BadTraits("traits must be strings")
        name = item.strip()
        if not name and isinstance(value, str):
            if value.strip():
                raise BadTraits(f"traits: name {place} is empty (a comma too many?)")
            continue
        if not TRAIT_NAME_RE.fullmatch(name):
            raise BadTraits(
                f"trait name {place} is malformed: 1 to 100 letters, digits, '_', '.' or '-'"
            )
        if name in RESERVED:
            raise BadTraits(
                f"trait {name!r} cannot be sent as a trait: the identity mapping sets it"
            )
        if name not in names:
            names.append(name)
    if len(names) > MAX_TRAITS:
        raise BadTraits(f"at most {MAX_TRAITS} traits per connector ({len(names)} given)")
    return names


# The named traits of a member (``i`` = identities, ``:names`` = the connector's list) as
# jsonb, NULL when it has none of them; and its md5, the ledger's traits_hash.
SELECTED_TRAITS_SQL = (
    "(SELECT jsonb_object_agg(t.key, t.value) FROM jsonb_each(i.traits) t "
    "WHERE t.key = ANY(CAST(:names AS text[])) AND t.value <> 'null'::jsonb)"
)
TRAITS_HASH_SQL = f"md5(CAST({SELECTED_TRAITS_SQL} AS text))"


@dataclass(frozen=True)
class KlaviyoProfile:
    profile: ProfileInput
    dropped: list[str] = field(default_factory=list)  # names of the values left out


def klaviyo_profile(
    email: str | None, external_id: str | None, traits: Mapping[str, Any] | None
) -> KlaviyoProfile:
    """The profile to send for one member, from its named traits; refused values left out."""
    if not traits:  # the common case, a million times in a first sync: nothing to check
        return KlaviyoProfile(ProfileInput(email=email, external_id=external_id))
    fields: dict[str, str] = {}
    properties: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in sorted((traits or {}).items()):
        if value is None:
            continue  # absent, not refused: bulk import never clears a field anyway
        if name in PROFILE_FIELDS:
            good = standard_value(name, value)
            if good is None:
                dropped.append(name)
            else:
                fields[name] = good
        elif property_ok(value):
            properties[name] = value
        else:
            dropped.append(name)
    profile = ProfileInput(
        email=email, external_id=external_id, fields=fields, properties=properties
    )
    # Klaviyo refuses a profile over 100 KB: the largest custom values go first until it fits.
    while properties and _size(profile) > MAX_PROFILE_BYTES:
        largest = max(properties, key=lambda n: len(json.dumps(properties[n], ensure_ascii=False)))
        del properties[largest]
        dropped.append(largest)
        profile = ProfileInput(
            email=email, external_id=external_id, fields=fields, properties=properties
        )
    return KlaviyoProfile(profile, sorted(dropped))


def _size(profile: ProfileInput) -> int:
    return len(encode_body(profile_resource(profile)))


def standard_value(name: str, value: Any) -> str | None:
    """The value as Klaviyo takes it for a standard field, or None when it would refuse it."""
    if not isinstance(value, str):
        return None  # Klaviyo's schema: these are strings
    if not value.strip() or len(value) > MAX_FIELD_CHARS or "\x00" in value:
        return None
    if name == "phone_number":
        return value if is_e164(value) else None
    if name == "locale" and not LOCALE_RE.fullmatch(value):
        return None
    return value


def is_e164(value: str) -> bool:
    """A valid phone number written exactly in E.164 form ("+14155552671")."""
    if not value.startswith("+"):
        return False
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        return False
    if not phonenumbers.is_valid_number(parsed):
        return False
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == value


def property_ok(value: Any) -> bool:
    """A custom property value Klaviyo stores: JSON, finite numbers, at most 10 KB."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError):
        return False
    return len(encoded) <= MAX_PROPERTY_BYTES and b"\\u0000" not in encoded


def describe(names: Sequence[str]) -> str:
    standard = [n for n in names if n in PROFILE_FIELDS]
    custom = [n for n in names if n not in PROFILE_FIELDS]
    parts = []
    if standard:
        parts.append("profile fields " + ", ".join(standard))
    if custom:
        parts.append("custom properties " + ", ".join(custom))
    return "; ".join(parts) if parts else "none but the email"
