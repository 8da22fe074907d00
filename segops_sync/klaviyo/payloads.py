"""Request bodies exactly as Klaviyo's spec (revision 2026-07-15) wants them, and their sizes.

The client serializes bodies itself (compact UTF-8 JSON) so that the byte limits are measured on
the very bytes that go on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson

from segops_sync.klaviyo.models import ProfileInput

MAX_PROFILES_PER_JOB = 10_000
MAX_JOB_BYTES = 5 * 1024 * 1024
MAX_IDS_PER_RELATIONSHIP_CALL = 1_000
MAX_FILTER_VALUES = 100
MAX_PAGE_SIZE = 100
# GET /api/lists pages at most 10 lists (the spec's page[size] maximum for it)
MAX_LISTS_PAGE_SIZE = 10
# split_into_jobs does not know the list id; it budgets for an id this long (Klaviyo's are 6).
LIST_ID_RESERVE = 64

JSONAPI = "application/vnd.api+json"


def encode_body(body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON. orjson writes the same bytes as the standard library's compact form
    (a 10,000-profile job in ~1 ms instead of ~20 ms: a million members are 100 of them); what it
    refuses (integers beyond 64 bits, non-string keys) goes through the standard library."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def profile_attributes(profile: ProfileInput) -> dict[str, Any]:
    # Absent values are omitted, never sent as null: null would clear the field on upsert.
    attrs: dict[str, Any] = {}
    if profile.email:
        attrs["email"] = profile.email
    if profile.external_id:
        attrs["external_id"] = profile.external_id
    if profile.fields:  # most profiles have none: no iterator to build
        for name, value in profile.fields.items():
            if value is not None:
                attrs[name] = value
    if profile.properties:
        attrs["properties"] = dict(profile.properties)
    return attrs


def profile_resource(profile: ProfileInput) -> dict[str, Any]:
    return {"type": "profile", "attributes": profile_attributes(profile)}


def list_create_body(name: str) -> dict[str, Any]:
    """ListCreateQuery: the name only, so the account's default opt-in process applies."""
    return {"data": {"type": "list", "attributes": {"name": name}}}


def bulk_import_body(profiles: Sequence[ProfileInput], list_id: str) -> dict[str, Any]:
    """ProfileImportJobCreateQuery with the list attached via data.relationships.lists."""
    return {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": [profile_resource(p) for p in profiles]}},
            "relationships": {"lists": {"data": [{"type": "list", "id": list_id}]}},
        }
    }


def profile_import_body(profile: ProfileInput) -> dict[str, Any]:
    """ProfileUpsertQuery for POST /api/profile-import."""
    return {"data": profile_resource(profile)}


def deletion_job_body(*, profile_id: str | None = None, email: str | None = None) -> dict[str, Any]:
    """DataPrivacyCreateDeletionJobQuery: the profile named by exactly one identifier (Klaviyo
    refuses several); by email, every profile with that email goes."""
    if (profile_id is None) == (email is None):
        raise ValueError("name the profile by exactly one of profile_id and email")
    profile: dict[str, Any] = {"type": "profile", "attributes": {}}
    if profile_id is not None:
        profile["id"] = profile_id
    else:
        profile["attributes"]["email"] = email
    return {
        "data": {
            "type": "data-privacy-deletion-job",
            "attributes": {"profile": {"data": profile}},
        }
    }


def relationship_body(profile_ids: Sequence[str]) -> dict[str, Any]:
    """ListMembersAddQuery / ListMembersDeleteQuery (same shape)."""
    return {"data": [{"type": "profile", "id": pid} for pid in profile_ids]}


def quote_filter_value(value: str) -> str:
    """A double-quoted filter string; backslash and quote are escaped so no value breaks out."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def any_filter(field: str, values: Sequence[str]) -> str:
    return f"any({field},[{','.join(quote_filter_value(v) for v in values)}])"


def split_into_jobs(
    profiles: Sequence[ProfileInput],
    *,
    max_profiles: int = MAX_PROFILES_PER_JOB,
    max_bytes: int = MAX_JOB_BYTES,
    list_id: str | None = None,
) -> list[list[ProfileInput]]:
    """Order-preserving chunks; none exceeds either limit, measured on the serialized job body.

    Without ``list_id`` the envelope is sized for a list id of LIST_ID_RESERVE characters, so the
    chunks fit any real list. Raises ValueError if a single profile cannot fit in a job.
    """
    if max_profiles < 1:
        raise ValueError("max_profiles must be at least 1")
    envelope = len(encode_body(bulk_import_body([], list_id or "x" * LIST_ID_RESERVE)))
    if len(profiles) <= max_profiles and envelope + _upper_bound(profiles) <= max_bytes:
        # Fits however it serializes: skip encoding each profile just to measure it.
        return [list(profiles)] if profiles else []
    chunks: list[list[ProfileInput]] = []
    current: list[ProfileInput] = []
    size = envelope
    for profile in profiles:
        item = len(encode_body(profile_resource(profile)))
        if envelope + item > max_bytes:
            raise ValueError(
                f"one profile serializes to {item} bytes and cannot fit in a {max_bytes}-byte job"
            )
        added = item + (1 if current else 0)  # the comma between array items
        if current and (len(current) >= max_profiles or size + added > max_bytes):
            chunks.append(current)
            current, size, added = [], envelope, item
        current.append(profile)
        size += added
    if current:
        chunks.append(current)
    return chunks


# {"type":"profile","attributes":{"email":"","external_id":""}} plus the comma between items
_PROFILE_OVERHEAD = 64


def _upper_bound(profiles: Sequence[ProfileInput]) -> int:
    """Bytes the profiles can take at most in a job body: JSON escapes a character into at most
    six bytes (``\\u0000``), and UTF-8 takes at most four for one unescaped."""
    return sum(
        _PROFILE_OVERHEAD + 6 * (len(p.email or "") + len(p.external_id or "")) for p in profiles
    )
