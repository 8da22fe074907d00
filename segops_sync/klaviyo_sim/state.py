"""The simulator's values: what it hands out (profiles, recorded requests, its HTTP request and
response) and the records it keeps per account, key, list, profile and bulk import job."""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from segops_sync.klaviyo.endpoints import Endpoint

JSONAPI = "application/vnd.api+json"


# -- public values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimProfile:
    id: str
    account_id: str
    email: str | None
    external_id: str | None
    phone_number: str | None
    created_at: datetime
    updated_at: datetime
    visible_at: float  # simulator clock: GET /api/profiles finds it from then on
    attributes: dict[str, Any] = field(default_factory=dict, compare=False)
    # consent is never changed by anything the simulator serves; tests assert it stays so
    email_consent: str = "NEVER_SUBSCRIBED"
    suppressed: bool = False


@dataclass(frozen=True)
class SimRequest:
    time: float  # simulator clock (seconds; already compressed by time_scale)
    method: str
    path: str
    account: str | None  # account id
    key_fingerprint: str | None  # never the key
    endpoint: Endpoint | None
    status: int  # 0 when the connection was dropped before an answer
    early_retry: bool = False
    dropped: bool = False
    retry_after: float | None = None
    # When the answer was ready (same clock as ``time``, which is the arrival): a client can
    # learn of a 429 no earlier than this, however long a starved simulator took over it.
    answered: float | None = None


@dataclass(frozen=True)
class SimHttpRequest:
    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""
    base_url: str = "http://127.0.0.1"
    # The simulator's clock when the request began to arrive (its headers), if the server knew.
    arrived_at: float | None = None


@dataclass
class SimHttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    drop: bool = False  # the transport should close the connection without answering

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class Faults:
    error_rate: float = 0.0
    drop_rate: float = 0.0
    latency: float = 0.0
    challenge_rate: float = 0.0


# -- internal state ------------------------------------------------------------------------------


@dataclass
class KeyRecord:
    account_id: str
    scopes: frozenset[str]
    fingerprint: str
    revoked: bool = False


@dataclass
class ListRecord:
    id: str
    account_id: str
    name: str
    created: datetime
    members: dict[str, int] = field(default_factory=dict)  # profile id -> join sequence
    # Klaviyo's default for new lists; settable only in Klaviyo's UI (and the simulator's setup).
    opt_in_process: str = "double_opt_in"
    # Bumped by every change of ``members``: the join-ordered view is rebuilt only then, so a
    # read-back of a million members pages through one sorted copy instead of sorting the list
    # again for every page of 100.
    changes: int = 0
    _ordered: tuple[int, list[int], list[str]] | None = field(
        default=None, repr=False, compare=False
    )

    def joined_after(self, after: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` (join sequence, profile id) of members joined after ``after``."""
        cached = self._ordered
        if cached is None or cached[0] != self.changes:
            pairs = sorted((seq, pid) for pid, seq in self.members.items())
            cached = (self.changes, [seq for seq, _ in pairs], [pid for _, pid in pairs])
            self._ordered = cached
        _, seqs, pids = cached
        start = bisect.bisect_right(seqs, after)
        return list(zip(seqs[start : start + limit], pids[start : start + limit], strict=True))


@dataclass(slots=True)  # one per simulated profile: millions in a big benchmark
class ProfileRecord:
    id: str
    account_id: str
    created_at: datetime
    updated_at: datetime
    visible_at: float
    attrs: dict[str, Any] = field(default_factory=dict)
    suppressed: bool = False

    def snapshot(self) -> SimProfile:
        return SimProfile(
            id=self.id,
            account_id=self.account_id,
            email=self.attrs.get("email"),
            external_id=self.attrs.get("external_id"),
            phone_number=self.attrs.get("phone_number"),
            created_at=self.created_at,
            updated_at=self.updated_at,
            visible_at=self.visible_at,
            attributes=json.loads(json.dumps(self.attrs)),
            suppressed=self.suppressed,
        )


@dataclass
class AccountRecord:
    id: str
    profiles: dict[str, ProfileRecord] = field(default_factory=dict)
    by_email: dict[str, str] = field(default_factory=dict)
    by_external_id: dict[str, str] = field(default_factory=dict)
    by_phone: dict[str, str] = field(default_factory=dict)


@dataclass
class JobRecord:
    id: str
    account_id: str
    created: datetime
    created_clock: float
    ready_at: float
    # The payload's profiles, dropped once the job is complete: a 10M first sync would otherwise
    # keep every payload it was sent (what a finished job still answers is counted below).
    profiles: list[dict[str, Any]]
    list_ids: list[str]
    total_count: int = 0
    status: str = "queued"
    fate: Literal["normal", "expired", "lost", "cancelled"] = "normal"
    started: datetime | None = None
    completed: datetime | None = None
    completed_count: int = 0
    failed_count: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    profile_ids: list[str] = field(default_factory=list)
    applied: int = 0  # profiles applied so far (the job runner applies a job in slices)


@dataclass
class Ctx:
    now: float
    req: SimHttpRequest
    path: str
    query: dict[str, str]
    endpoint: Endpoint | None
    account: AccountRecord | None = None
    key: KeyRecord | None = None


class Reject(Exception):
    """Raised by handlers to answer with a JSON:API error."""

    def __init__(self, response: SimHttpResponse) -> None:
        super().__init__(response.status)
        self.response = response
