"""Plain value objects the client accepts and returns (no httpx, no JSON:API nesting)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

# The profile attributes besides the identifiers that a caller may set (Klaviyo's names).
PROFILE_FIELDS = ("first_name", "last_name", "phone_number", "organization", "title", "locale")


_NOTHING: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class RateLimitHeaders:
    """Klaviyo's RateLimit-Limit / -Remaining / -Reset: they describe the steady (1 min) window."""

    limit: int | None
    remaining: int | None
    reset: float | None  # seconds until the steady window resets


@dataclass(frozen=True)
class ProfileInput:
    """One profile to import; Klaviyo matches on email first, then external_id.

    ``fields`` are standard profile attributes (PROFILE_FIELDS), ``properties`` custom ones;
    the caller has checked their values (this layer only shapes them)."""

    email: str | None = None
    external_id: str | None = None
    # Shared empty defaults, not a dict per profile: a first sync builds a million of these.
    fields: Mapping[str, str] = field(default_factory=lambda: _NOTHING)
    properties: Mapping[str, Any] = field(default_factory=lambda: _NOTHING)

    def __post_init__(self) -> None:
        if not self.email and not self.external_id:
            raise ValueError("a profile needs an email or an external_id")
        unknown = set(self.fields).difference(PROFILE_FIELDS) if self.fields else None
        if unknown:
            raise ValueError(f"not a profile field: {sorted(unknown)}")

    @classmethod
    def identified(cls, email: str | None, external_id: str | None) -> ProfileInput:
        """A profile of identifiers only, the same as ``ProfileInput(email=, external_id=)``.
        A first sync builds a million of these: the frozen dataclass's ``__init__`` (an
        ``object.__setattr__`` per field, two default factories) takes 0.9 µs a profile, this
        0.25."""
        if not email and not external_id:
            raise ValueError("a profile needs an email or an external_id")
        profile = object.__new__(cls)
        values = profile.__dict__
        values["email"] = email
        values["external_id"] = external_id
        values["fields"] = _NOTHING
        values["properties"] = _NOTHING
        return profile


@dataclass(frozen=True)
class ListMember:
    """A profile on a list, as read back: its id and the identifiers the sync matches on."""

    id: str
    email: str | None
    external_id: str | None
    # Klaviyo suppresses its email (unsubscribed, bounced, ...): on the list, never emailed
    suppressed: bool = False


@dataclass(frozen=True)
class KlaviyoList:
    id: str
    name: str
    # double_opt_in | single_opt_in (None when Klaviyo did not say): API list membership never
    # subscribes anyone, whatever this says; double opt-in makes that visible to marketers.
    opt_in_process: str | None = None
    # members on the list; None unless asked for (Klaviyo serves it in its XS tier only)
    profile_count: int | None = None


class JobStatus(StrEnum):
    """A profile bulk import job's states, as Klaviyo's OpenAPI document lists them
    (``ProfileImportJobResponseObjectResource.attributes.status``), in the order a job goes
    through them."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETE = "complete"
    CANCELLED = "cancelled"


# Klaviyo is still working on a job in these states.
UNFINISHED_JOB_STATES = (JobStatus.QUEUED, JobStatus.PROCESSING)


@dataclass(frozen=True)
class BulkImportJob:
    id: str
    # A JobStatus value; typed str so that a state Klaviyo adds later still parses.
    status: str
    total_count: int
    completed_count: int
    failed_count: int
    expires_at: datetime | None
    # Klaviyo's clock: jobs listed newest first are ordered by it (the watcher stops paging at it)
    created_at: datetime | None = None
    # Klaviyo's clock too: completed_at - created_at is how long its jobs take (the watcher
    # polls at the newest job's expected end)
    completed_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.COMPLETE, JobStatus.CANCELLED)


@dataclass(frozen=True)
class ImportErrorItem:
    code: str
    title: str
    detail: str
    pointer: str | None
    # the profile as it was submitted: how the caller tells which member failed
    original_payload: dict[str, Any] | None

    @property
    def email(self) -> str | None:
        return _payload_attr(self.original_payload, "email")

    @property
    def external_id(self) -> str | None:
        return _payload_attr(self.original_payload, "external_id")


@dataclass(frozen=True)
class ImportedProfile:
    """A profile a bulk job created or updated: lets the caller store ids for later removals."""

    id: str
    email: str | None
    external_id: str | None


def _payload_attr(payload: dict[str, Any] | None, name: str) -> str | None:
    if not payload:
        return None
    attrs = payload.get("attributes", payload)
    value = attrs.get(name) if isinstance(attrs, dict) else None
    return value if isinstance(value, str) else None
