"""The simulator's state and behaviour: a fake Klaviyo that answers like the real one.

Everything runs under one lock, so the Starlette app (uvicorn thread) and tests (main thread) can
use it at once. Requests are handled by ``Simulator.handle`` as plain values, so tests can also
drive it in-process with a fake clock (``Simulator.call``).

Choices where Klaviyo's behaviour is unconfirmed (see docs/klaviyo.md#not-confirmed) are marked "choice:".
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlencode

import orjson

from segops_sync.klaviyo.endpoints import ENDPOINT_LIMITS, ENDPOINT_SCOPES, REVISION, Endpoint
from segops_sync.klaviyo.simulator.filters import FilterError, parse_filter
from segops_sync.klaviyo.simulator.ids import (
    UlidFactory,
    key_fingerprint,
    private_key,
    short_id,
)
from segops_sync.klaviyo.simulator.ratelimit import Decision, FixedWindowLimiter, format_seconds
from segops_sync.klaviyo.simulator.validation import BodyKind, validate_body

DEFAULT_SCOPES: frozenset[str] = frozenset(
    {"accounts:read", "lists:read", "lists:write", "profiles:read", "profiles:write"}
)
# The newest revision Klaviyo has published (docs/klaviyo.md#revision-and-headers); later dates are refused.
LATEST_REVISION = "2026-10-15"
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_PROFILE_BYTES = 100 * 1024
MAX_JOB_PROFILES = 10_000
MAX_RELATIONSHIP_IDS = 1_000
MAX_FILTER_VALUES = 100  # choice: third-party clients use 100; Klaviyo documents no maximum
MAX_EXTERNAL_ID = 255  # choice: Segment's limit; Klaviyo's own is unconfirmed
JOB_RETENTION = timedelta(days=7)  # choice: expires_at exists, its duration is undocumented
JSONAPI = "application/vnd.api+json"
_JOB_STATES = frozenset({"queued", "processing", "complete", "cancelled"})

_REVISION_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(\.pre)?$")
# One encoder, not one per call (json.dumps builds one for any non-default option); its output
# is ASCII (ensure_ascii), so its length in characters is its length in bytes.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
_EMAIL_RE = re.compile(r"^[^@\s\"(),:;<>\[\]\\]+@[^@\s\"(),:;<>\[\]\\]+\.[^@\s\"(),:;<>\[\]\\]+$")
_PHONE_RE = re.compile(r"^\+[1-9]\d{6,14}$")
_SUBSCRIPTION_RE = re.compile(r"subscription", re.IGNORECASE)
_PROFILE_ATTRS = (
    "email",
    "phone_number",
    "external_id",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)
_STATUS_TEXT = {
    400: ("invalid", "Invalid input."),
    401: ("not_authenticated", "Authentication credentials were not provided."),
    403: ("permission_denied", "You do not have permission to perform this action."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    409: ("duplicate_profile", "Conflict."),
    413: ("request_too_large", "Request entity too large."),
    415: ("unsupported_media_type", "Unsupported media type."),
    429: ("throttled", "Request was throttled."),
    500: ("error", "A server error occurred."),
    501: ("not_implemented", "Not implemented."),
    503: ("service_unavailable", "Service unavailable."),
}
_CHALLENGE_HTML = (
    b"<!DOCTYPE html><html><head><title>Just a moment...</title></head>"
    b"<body><noscript>Enable JavaScript and cookies to continue</noscript></body></html>"
)


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
class _Key:
    account_id: str
    scopes: frozenset[str]
    fingerprint: str
    revoked: bool = False


@dataclass
class _List:
    id: str
    account_id: str
    name: str
    created: datetime
    members: dict[str, int] = field(default_factory=dict)  # profile id -> join sequence
    # Klaviyo's default for new lists; settable only in Klaviyo's UI (and the simulator's setup).
    opt_in_process: str = "double_opt_in"


@dataclass
class _Profile:
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
class _Account:
    id: str
    profiles: dict[str, _Profile] = field(default_factory=dict)
    by_email: dict[str, str] = field(default_factory=dict)
    by_external_id: dict[str, str] = field(default_factory=dict)
    by_phone: dict[str, str] = field(default_factory=dict)


@dataclass
class _Job:
    id: str
    account_id: str
    created: datetime
    created_clock: float
    ready_at: float
    profiles: list[dict[str, Any]]
    list_ids: list[str]
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
class _Ctx:
    now: float
    req: SimHttpRequest
    path: str
    query: dict[str, str]
    endpoint: Endpoint | None
    account: _Account | None = None
    key: _Key | None = None


class _Reject(Exception):
    """Raised by handlers to answer with a JSON:API error."""

    def __init__(self, response: SimHttpResponse) -> None:
        super().__init__(response.status)
        self.response = response


Handler = Callable[["Simulator", _Ctx, dict[str, str], Any], SimHttpResponse]


# -- the simulator -------------------------------------------------------------------------------


class Simulator:
    """State and behaviour of a fake Klaviyo. Thread-safe.

    time_scale compresses time: with 10, the burst window is 0.1 s and the steady window 6 s, and
    every number the simulator reports or accepts (Retry-After, RateLimit-Reset, job_delay,
    indexing_delay, max_rate windows) is in those compressed, i.e. real clock, seconds.
    """

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        job_delay: float = 0.0,
        indexing_delay: float = 0.0,
        enforce_rate_limits: bool = True,
        seed: int | None = None,
        clock: Callable[[], float] | None = None,
        use_official_models: bool | None = None,
        page_size_cap: int | None = None,
    ) -> None:
        self.time_scale = time_scale
        self.job_delay = job_delay
        self.indexing_delay = indexing_delay
        self.enforce_rate_limits = enforce_rate_limits
        self._use_models = use_official_models
        # Serve at most this many items per page whatever page[size] asks: proves that a client
        # follows links.next instead of assuming one page holds everything.
        self.page_size_cap = page_size_cap
        self._clock = clock or time.monotonic
        self._rng: random.Random = (
            random.Random(seed) if seed is not None else random.SystemRandom()
        )
        self._ulid = UlidFactory(self._rng)
        self._lock = threading.RLock()
        self._limiter = FixedWindowLimiter(time_scale)
        self._accounts: dict[str, _Account] = {}
        self._keys: dict[str, _Key] = {}
        self._lists: dict[str, _List] = {}
        self._profile_index: dict[str, _Profile] = {}
        self._jobs: dict[str, _Job] = {}
        self._pending_jobs: list[str] = []
        # The job runner (start_job_runner): None while jobs are applied lazily.
        self._runner: threading.Thread | None = None
        self._runner_stop = threading.Event()
        self._runner_wake = threading.Event()
        self._join_seq = 0
        self._requests: list[SimRequest] = []
        self._faults = Faults()
        self._forced_429: list[float] = []
        self._not_before: dict[tuple[str, Endpoint], float] = {}
        self._subscription_calls = 0
        # Jobs still to be created that stay "processing" forever (stall_next_jobs).
        self._stall_next = 0
        # Profiles accepted in bulk import jobs, per account and identifier (external_id, else
        # email): how many times a sync sent each member.
        self._submitted: dict[str, dict[str, int]] = {}

    # -- setup ---------------------------------------------------------------------------------

    @property
    def burst_window(self) -> float:
        return self._limiter.burst_seconds

    @property
    def steady_window(self) -> float:
        return self._limiter.steady_seconds

    def now(self) -> float:
        return self._clock()

    # The job runner applies this many profiles per turn of the lock, then pauses this long.
    RUNNER_SLICE = 500
    RUNNER_PAUSE = 0.002

    def start_job_runner(self) -> None:
        """Apply each bulk job when it is due, in a thread of its own, as Klaviyo's own workers
        do. Without it (the default, and what the tests rely on: a job nobody read can still be
        lost whole) the first request after a job's ``ready_at`` applies it, and the job's cost
        lands on that request: a 1M first sync's poll that followed a quiet second answered after
        1.5 s, having applied thirty 10,000-profile jobs on its way. The runner applies
        ``RUNNER_SLICE`` profiles per turn of the lock and then pauses, so requests are stamped
        and served on time however long the backlog."""
        with self._lock:
            if self._runner is not None:
                return
            self._runner_stop.clear()
            self._runner = threading.Thread(
                target=self._run_jobs, name="klaviyo-sim-jobs", daemon=True
            )
            self._runner.start()

    def stop_job_runner(self) -> None:
        """Stop the job runner; due jobs are applied lazily again."""
        runner = self._runner
        if runner is None:
            return
        self._runner_stop.set()
        self._runner_wake.set()
        runner.join(timeout=10)
        self._runner = None

    def _run_jobs(self) -> None:
        while not self._runner_stop.is_set():
            self._runner_wake.clear()  # before looking: a job created meanwhile wakes the wait
            with self._lock:
                now = self._clock()
                pending = [self._jobs[j] for j in self._pending_jobs]
                due = next((job for job in pending if now >= job.ready_at), None)
                if due is not None:
                    self._process_job(due, now, self.RUNNER_SLICE)
                next_at = min((job.ready_at for job in pending), default=None)
            if due is not None:
                # Let the server's own threads have the interpreter between slices: a thread
                # that applies 10,000 profiles in one go delays when requests are stamped.
                time.sleep(self.RUNNER_PAUSE)
                continue
            idle = 1.0 if next_at is None else min(1.0, max(0.0, next_at - self._clock()))
            self._runner_wake.wait(idle)

    def create_account(self, *, account_id: str | None = None) -> str:
        with self._lock:
            account_id = account_id or self._fresh(lambda: short_id(self._rng), self._accounts)
            if account_id in self._accounts:
                raise ValueError(f"account {account_id} exists")
            self._accounts[account_id] = _Account(account_id)
            return account_id

    def create_key(self, account_id: str, *, scopes: Iterable[str] = DEFAULT_SCOPES) -> str:
        with self._lock:
            self._account(account_id)
            key = self._fresh(lambda: private_key(self._rng), self._keys)
            self._keys[key] = _Key(account_id, frozenset(scopes), key_fingerprint(key))
            return key

    def revoke_key(self, key: str) -> None:
        """Choice: a revoked key gets 401 (as an unknown key does), Klaviyo's status for a key
        that no longer authenticates; 403 is kept for a valid key lacking a scope."""
        with self._lock:
            record = self._keys.get(key)
            if record is None:
                raise KeyError("unknown key")
            record.revoked = True

    def create_list(
        self,
        account_id: str,
        name: str = "List",
        *,
        list_id: str | None = None,
        opt_in_process: str = "double_opt_in",
    ) -> str:
        if opt_in_process not in ("double_opt_in", "single_opt_in"):
            raise ValueError("opt_in_process must be double_opt_in or single_opt_in")
        with self._lock:
            self._account(account_id)
            list_id = list_id or self._fresh(lambda: short_id(self._rng), self._lists)
            if list_id in self._lists:
                raise ValueError(f"list {list_id} exists")
            self._lists[list_id] = _List(
                list_id, account_id, name, datetime.now(UTC), opt_in_process=opt_in_process
            )
            return list_id

    def remove_from_list(self, list_id: str, profile_ids: Iterable[str]) -> None:
        """Someone takes profiles off the list in Klaviyo's UI (no request, no rate limit)."""
        with self._lock:
            lst = self._list(list_id)
            for pid in profile_ids:
                lst.members.pop(pid, None)

    def add_to_list(self, list_id: str, profile_ids: Iterable[str]) -> None:
        """Someone puts profiles on the list in Klaviyo's UI (no request, no rate limit)."""
        with self._lock:
            lst = self._list(list_id)
            for pid in profile_ids:
                if pid not in self._profile_index:
                    raise KeyError(f"unknown profile {pid}")
            self._add_members(lst, profile_ids)

    def suppress(self, profile_id: str) -> None:
        """The profile's email is suppressed (an unsubscribe, a bounce): lists keep it."""
        with self._lock:
            found = self._profile_index.get(profile_id)
            if found is None:
                raise KeyError(f"unknown profile {profile_id}")
            found.suppressed = True

    def add_profile(
        self,
        account_id: str,
        *,
        email: str | None = None,
        external_id: str | None = None,
        visible: bool = True,
    ) -> str:
        """Seeds a profile directly (no request, no rate limit)."""
        with self._lock:
            account = self._account(account_id)
            now = self._clock()
            attrs = {k: v for k, v in (("email", email), ("external_id", external_id)) if v}
            profile, _ = self._upsert(account, attrs, now, clear_nulls=False)
            if visible:
                profile.visible_at = now
            return profile.id

    # -- inspection ----------------------------------------------------------------------------

    def list_member_ids(self, list_id: str) -> set[str]:
        with self._lock:
            self._advance(self._clock())
            return set(self._list(list_id).members)

    def on_list(self, list_id: str, identities: Iterable[str]) -> dict[str, bool]:
        """For each email or external_id: is its profile on the list? (Cheap on a big list.)"""
        with self._lock:
            self._advance(self._clock())
            lst = self._list(list_id)
            account = self._account(lst.account_id)
            answer: dict[str, bool] = {}
            for ident in identities:
                pid = account.by_email.get(_norm_email(ident)) or account.by_external_id.get(ident)
                answer[ident] = pid is not None and pid in lst.members
            return answer

    def list_members(self, list_id: str) -> list[SimProfile]:
        with self._lock:
            self._advance(self._clock())
            members = self._list(list_id).members
            ordered = sorted(members, key=members.__getitem__)
            return [self._profile_index[pid].snapshot() for pid in ordered]

    def profile(self, profile_id: str) -> SimProfile | None:
        with self._lock:
            self._advance(self._clock())
            found = self._profile_index.get(profile_id)
            return found.snapshot() if found else None

    def profiles(self, account_id: str) -> list[SimProfile]:
        with self._lock:
            self._advance(self._clock())
            account = self._account(account_id)
            return [account.profiles[pid].snapshot() for pid in sorted(account.profiles)]

    def unapplied_jobs(self) -> int:
        """Jobs not applied yet, due or not. Applies nothing: it tells whether the job runner
        got to a due job before any request did."""
        with self._lock:
            return len(self._pending_jobs)

    def job_status(self, job_id: str) -> str | None:
        with self._lock:
            self._advance(self._clock())
            job = self._jobs.get(job_id)
            return job.status if job else None

    def requests(
        self, *, endpoint: Endpoint | None = None, status: int | None = None
    ) -> list[SimRequest]:
        with self._lock:
            return [
                r
                for r in self._requests
                if (endpoint is None or r.endpoint == endpoint)
                and (status is None or r.status == status)
            ]

    def count_429(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.status == 429)

    def early_retries(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.early_retry)

    def max_rate(self, account_id: str, endpoint: Endpoint, window_seconds: float) -> int:
        """Most requests (of any outcome) that account sent to that endpoint within any sliding
        window of window_seconds (compressed seconds: use burst_window / steady_window)."""
        with self._lock:
            times = sorted(
                r.time for r in self._requests if r.account == account_id and r.endpoint == endpoint
            )
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window_seconds:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def submitted_counts(self, account_id: str) -> dict[str, int]:
        """How many times each profile (by external_id, else email) was sent in an accepted
        bulk import job of the account."""
        with self._lock:
            return dict(self._submitted.get(account_id, {}))

    def subscription_calls(self) -> int:
        with self._lock:
            return self._subscription_calls

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_endpoint: dict[str, int] = {}
            for r in self._requests:
                label = r.endpoint.value if r.endpoint else f"{r.method} {r.path}"
                by_endpoint[label] = by_endpoint.get(label, 0) + 1
            return {
                "requests": len(self._requests),
                "count_429": self.count_429(),
                "early_retries": self.early_retries(),
                "subscription_calls": self._subscription_calls,
                "dropped": sum(1 for r in self._requests if r.dropped),
                "by_endpoint": by_endpoint,
            }

    # -- fault injection -----------------------------------------------------------------------

    def set_faults(
        self,
        *,
        error_rate: float = 0.0,
        drop_rate: float = 0.0,
        latency: float = 0.0,
        challenge_rate: float = 0.0,
    ) -> None:
        for name, rate in (
            ("error_rate", error_rate),
            ("drop_rate", drop_rate),
            ("challenge_rate", challenge_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if latency < 0:
            raise ValueError("latency must not be negative")
        with self._lock:
            self._faults = Faults(error_rate, drop_rate, latency, challenge_rate)

    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def force_429(self, count: int, retry_after: float) -> None:
        """The next ``count`` authenticated API requests get 429 with this Retry-After."""
        with self._lock:
            self._forced_429.extend([retry_after] * count)

    def expire_job(self, job_id: str) -> None:
        """The job's results expire: it is applied (if it was not yet), then answers 404."""
        with self._lock:
            job = self._job_record(job_id)
            if job.status in ("queued", "processing"):
                self._process_job(job, self._clock())
            job.fate = "expired"

    def lose_job(self, job_id: str) -> None:
        """Klaviyo loses the job: it answers 404 from now on. Unless it was already seen complete,
        nothing of it is ever applied (jobs run lazily, so a due job nobody read is lost whole)."""
        with self._lock:
            job = self._job_record(job_id)
            job.fate = "lost"
            self._pending_jobs = [j for j in self._pending_jobs if j != job_id]

    def stall_next_jobs(self, count: int) -> None:
        """The next ``count`` bulk import jobs created stay "processing" forever, nothing of
        them applied: a job Klaviyo never finishes (tests of SEGOPS_JOB_GIVE_UP)."""
        with self._lock:
            self._stall_next = count

    def cancel_job(self, job_id: str) -> None:
        """The job is cancelled before it ran: status 'cancelled', nothing applied."""
        with self._lock:
            job = self._job_record(job_id)
            if job.status == "complete":
                raise ValueError("a completed job cannot be cancelled")
            job.status, job.fate = "cancelled", "cancelled"
            self._pending_jobs = [j for j in self._pending_jobs if j != job_id]

    # -- in-process convenience ----------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        json_body: Any = None,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str | None] | None = None,  # None removes a header
        base_url: str = "http://sim.test",
    ) -> SimHttpResponse:
        """Builds a request with Klaviyo's usual headers and handles it (no HTTP)."""
        merged = {"revision": REVISION, "accept": JSONAPI}
        if key is not None:
            merged["authorization"] = f"Klaviyo-API-Key {key}"
        body = b""
        if json_body is not None:
            merged["content-type"] = JSONAPI
            body = json.dumps(json_body).encode()
        for name, value in (headers or {}).items():
            if value is None:
                merged.pop(name.lower(), None)
            else:
                merged[name.lower()] = value
        items = tuple(params.items() if isinstance(params, Mapping) else (params or ()))
        return self.handle(SimHttpRequest(method, path, items, merged, body, base_url))

    # -- request handling ----------------------------------------------------------------------

    def handle(self, req: SimHttpRequest) -> SimHttpResponse:
        # Stamped on arrival, before waiting for the lock, as Klaviyo stamps a request at its
        # edge: a request queued behind a slow one (a due bulk job applied under the lock) was
        # not sent any later, and must not be counted as a retry that came too early. Over HTTP
        # that is when its headers came in, not when this process had read a 650 KB body and
        # found a thread for it: on a machine whose CPUs it shares with the workers, that moment
        # bunched job submissions sent apart (12 counted in one second at 5M members).
        now = req.arrived_at if req.arrived_at is not None else self._clock()
        with self._lock:
            self._advance(now)
            path = req.path.rstrip("/") or "/"  # Klaviyo accepts trailing slashes
            endpoint, handler, path_params, allowed = _match(req.method, path)
            key = self._key_of(req.headers)
            account = self._accounts.get(key.account_id) if key and not key.revoked else None
            query: dict[str, str] = {}
            for name, value in req.query:
                query.setdefault(name, value)
            ctx = _Ctx(now, req, path, query, endpoint, account, key)
            if path.startswith(("/api/", "/client/")) and _SUBSCRIPTION_RE.search(path):
                self._subscription_calls += 1
            early = self._is_early(ctx)

            fault = self._pick_fault()
            if fault == "challenge":
                return self._record(ctx, _challenge(), early)
            if fault == "drop_before":
                return self._record(ctx, SimHttpResponse(0, {}, drop=True), early)
            if fault == "error":
                status = self._rng.choice((500, 503))
                return self._record(ctx, self._with_limits(ctx, _error(status)), early)

            try:
                response = self._dispatch(ctx, handler, path_params, allowed)
            except _Reject as rejected:
                response = rejected.response
            if response.status != 429:
                response = self._with_limits(ctx, response)
            if fault == "drop_after":
                response.drop = True  # applied, but the answer is lost: the nastiest case
            return self._record(ctx, response, early)

    def _dispatch(
        self,
        ctx: _Ctx,
        handler: Handler | None,
        path_params: dict[str, str],
        allowed: list[str],
    ) -> SimHttpResponse:
        req = ctx.req
        if handler is None and not (
            ctx.path.startswith("/api/") and _SUBSCRIPTION_RE.search(ctx.path)
        ):
            if allowed:
                return _error(405, detail=f"Method {req.method} not allowed.")
            return _error(404, detail="The requested resource was not found.")

        auth = req.headers.get("authorization")
        if not auth:
            return _error(401)
        if ctx.key is None or ctx.key.revoked or ctx.account is None:
            return _error(
                401,
                title="Incorrect authentication credentials.",
                detail="Incorrect authentication credentials.",
            )

        revision = req.headers.get("revision")
        problem = _revision_problem(revision)
        if problem:
            return _error(400, detail=problem, parameter="revision")

        if handler is None:  # a subscription endpoint: counted, never served
            if "subscriptions:write" not in ctx.key.scopes:
                return _error(
                    403, detail="Your API key is missing required scopes: subscriptions:write."
                )
            return _error(501, detail="segops-sync must never call subscription endpoints.")

        assert ctx.endpoint is not None
        decision = self._admit(ctx)
        if decision is not None:
            return decision

        missing = sorted(ENDPOINT_SCOPES[ctx.endpoint] - ctx.key.scopes)
        if missing:
            return _error(
                403, detail="Your API key is missing required scopes: " + ", ".join(missing) + "."
            )

        unknown = [name for name in ctx.query if name not in _ALLOWED_PARAMS[ctx.endpoint]]
        if unknown:
            return _error(
                400, detail=f"'{unknown[0]}' is not a valid query parameter.", parameter=unknown[0]
            )

        body: Any = None
        kind = _BODY_KINDS.get(ctx.endpoint)
        if kind is not None:
            body = self._parse_body(ctx, kind)
        return handler(self, ctx, path_params, body)

    def _admit(self, ctx: _Ctx) -> SimHttpResponse | None:
        """The rate limiter and forced 429s; None means the request may go on."""
        assert ctx.account is not None and ctx.endpoint is not None
        if self._forced_429:
            return self._throttle(ctx, self._forced_429.pop(0))
        decision = self._limiter.acquire(
            (ctx.account.id, ctx.endpoint.value),
            ENDPOINT_LIMITS[ctx.endpoint],
            ctx.now,
            enforce=self.enforce_rate_limits,
        )
        if not decision.allowed:
            assert decision.retry_after is not None
            return self._throttle(ctx, decision.retry_after)
        return None

    def _throttle(self, ctx: _Ctx, retry_after: float) -> SimHttpResponse:
        assert ctx.account is not None and ctx.endpoint is not None
        key = (ctx.account.id, ctx.endpoint)
        self._not_before[key] = max(self._not_before.get(key, 0.0), ctx.now + retry_after)
        text = format_seconds(retry_after)
        response = _error(
            429, detail=f"Request was throttled. Expected available in {text} seconds."
        )
        response.headers["retry-after"] = text  # and no RateLimit-* headers, as Klaviyo
        return response

    def _parse_body(self, ctx: _Ctx, kind: BodyKind) -> Any:
        req = ctx.req
        content_type = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (JSONAPI, "application/json"):
            raise _Reject(
                _error(415, detail=f"Unsupported media type '{content_type or 'none'}' in request.")
            )
        if len(req.body) > MAX_BODY_BYTES:
            raise _Reject(_error(413, detail="The request payload exceeds 5 MB.", pointer="/data"))
        try:
            # orjson: a 10,000-profile job parses in ~7 ms instead of ~60 (the benchmark's
            # simulator shares the workers' CPUs, as Klaviyo's own machines would not).
            body = orjson.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            raise _Reject(_error(400, detail="JSON parse error.", pointer="/data")) from None
        problems = validate_body(kind, body, use_models=self._use_models)
        if problems:
            raise _Reject(
                _errors(
                    400,
                    [_error_item(400, detail=p.detail, pointer=p.pointer) for p in problems[:50]],
                )
            )
        return body

    # -- bookkeeping ---------------------------------------------------------------------------

    def _record(self, ctx: _Ctx, response: SimHttpResponse, early: bool) -> SimHttpResponse:
        retry = response.headers.get("retry-after")
        self._requests.append(
            SimRequest(
                time=ctx.now,
                method=ctx.req.method,
                path=ctx.path,
                account=ctx.account.id if ctx.account else None,
                key_fingerprint=ctx.key.fingerprint if ctx.key else None,
                endpoint=ctx.endpoint,
                status=response.status,
                early_retry=early,
                dropped=response.drop,
                retry_after=float(retry) if retry else None,
                answered=self._clock(),
            )
        )
        return response

    def _is_early(self, ctx: _Ctx) -> bool:
        if ctx.account is None or ctx.endpoint is None:
            return False
        not_before = self._not_before.get((ctx.account.id, ctx.endpoint))
        return not_before is not None and ctx.now < not_before

    def _with_limits(self, ctx: _Ctx, response: SimHttpResponse) -> SimHttpResponse:
        if ctx.account is None or ctx.endpoint is None:
            return response
        state: Decision = self._limiter.peek(
            (ctx.account.id, ctx.endpoint.value), ENDPOINT_LIMITS[ctx.endpoint], ctx.now
        )
        response.headers["ratelimit-limit"] = str(state.steady_limit)
        response.headers["ratelimit-remaining"] = str(state.steady_remaining)
        response.headers["ratelimit-reset"] = format_seconds(state.steady_reset)
        return response

    def _pick_fault(self) -> str | None:
        faults = self._faults
        if faults.challenge_rate and self._rng.random() < faults.challenge_rate:
            return "challenge"
        if faults.drop_rate and self._rng.random() < faults.drop_rate:
            return "drop_before" if self._rng.random() < 0.5 else "drop_after"
        if faults.error_rate and self._rng.random() < faults.error_rate:
            return "error"
        return None

    def _key_of(self, headers: Mapping[str, str]) -> _Key | None:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "klaviyo-api-key":
            return None
        return self._keys.get(value.strip())

    def _fresh(self, make: Callable[[], str], taken: Mapping[str, Any]) -> str:
        while True:
            candidate = make()
            if candidate not in taken:
                return candidate

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            raise KeyError(f"unknown account {account_id}")
        return account

    def _list(self, list_id: str) -> _List:
        found = self._lists.get(list_id)
        if found is None:
            raise KeyError(f"unknown list {list_id}")
        return found

    def _job_record(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(f"unknown job {job_id}")
        return job

    # -- profiles ------------------------------------------------------------------------------

    def _resolve(
        self, account: _Account, attrs: Mapping[str, Any]
    ) -> tuple[_Profile | None, str | None]:
        """Identity matching: email first, then external_id, then phone. Returns the profile and,
        when the identifiers belong to two different profiles, the other one's id."""
        by_email = by_ext = by_phone = None
        if attrs.get("email"):
            by_email = account.by_email.get(_norm_email(attrs["email"]))
        if attrs.get("external_id"):
            by_ext = account.by_external_id.get(attrs["external_id"])
        if attrs.get("phone_number"):
            by_phone = account.by_phone.get(attrs["phone_number"])
        if by_email and by_ext and by_email != by_ext:
            return account.profiles[by_email], by_ext
        chosen = by_email or by_ext or by_phone
        return (account.profiles[chosen] if chosen else None), None

    def _upsert(
        self,
        account: _Account,
        attrs: Mapping[str, Any],
        now: float,
        *,
        clear_nulls: bool,
        found: tuple[_Profile | None, datetime] | None = None,
    ) -> tuple[_Profile, bool]:
        """``found``: the profile the caller already resolved for these attrs, and the time
        to stamp (a job resolves each profile first, to check conflicts, and stamps once)."""
        if found is None:
            profile, stamp = self._resolve(account, attrs)[0], datetime.now(UTC)
        else:
            profile, stamp = found
        created = profile is None
        if profile is None:
            profile = _Profile(
                self._ulid.new(), account.id, stamp, stamp, visible_at=now + self.indexing_delay
            )
            account.profiles[profile.id] = profile
            self._profile_index[profile.id] = profile
        else:  # a new profile is in no index yet (a first sync creates a million)
            self._unindex(account, profile)
        for name, value in attrs.items():
            if value is None:
                if clear_nulls:
                    profile.attrs.pop(name, None)
                continue  # bulk import never clears a field with null
            if name == "properties" and isinstance(value, dict):
                # custom properties merge: the keys sent are set, the others stay
                merged = dict(profile.attrs.get("properties") or {})
                merged.update(value)
                profile.attrs[name] = merged
                continue
            profile.attrs[name] = _norm_email(value) if name == "email" else value
        profile.updated_at = stamp
        self._index(account, profile)
        return profile, created

    def _index(self, account: _Account, profile: _Profile) -> None:
        if profile.attrs.get("email"):
            account.by_email[profile.attrs["email"]] = profile.id
        if profile.attrs.get("external_id"):
            account.by_external_id[profile.attrs["external_id"]] = profile.id
        if profile.attrs.get("phone_number"):
            account.by_phone[profile.attrs["phone_number"]] = profile.id

    def _unindex(self, account: _Account, profile: _Profile) -> None:
        for index, name in (
            (account.by_email, "email"),
            (account.by_external_id, "external_id"),
            (account.by_phone, "phone_number"),
        ):
            value = profile.attrs.get(name)
            if value and index.get(value) == profile.id:
                del index[value]

    def _add_members(self, lst: _List, profile_ids: Iterable[str]) -> None:
        for pid in profile_ids:
            if pid not in lst.members:
                self._join_seq += 1
                lst.members[pid] = self._join_seq

    # -- jobs ----------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Completes due jobs lazily: every entry point calls this first."""
        if not self._pending_jobs:
            return
        still: list[str] = []
        for job_id in self._pending_jobs:
            job = self._jobs[job_id]
            if now >= job.ready_at:
                self._process_job(job, now)
            else:
                if now >= job.created_clock + (job.ready_at - job.created_clock) / 2:
                    job.status = "processing"
                    job.started = job.started or datetime.now(UTC)
                still.append(job_id)
        self._pending_jobs = still

    def _process_job(self, job: _Job, now: float, slice_size: int | None = None) -> bool:
        """Apply the job's profiles from where it stopped, ``slice_size`` of them at most, and
        complete it once all are; returns whether it is complete."""
        account = self._accounts[job.account_id]
        job.started = job.started or datetime.now(UTC)
        stamp = datetime.now(UTC)
        start = job.applied
        stop = (
            len(job.profiles) if slice_size is None else min(len(job.profiles), start + slice_size)
        )
        for index in range(start, stop):
            item = job.profiles[index]
            job.applied = index + 1
            attrs = dict(item.get("attributes") or {})
            error = _profile_rejection(item, attrs, f"/data/attributes/profiles/data/{index}")
            existing: _Profile | None = None
            if error is None:
                existing, conflict = self._resolve(account, attrs)
                if conflict is not None:
                    error = _import_error(
                        "duplicate_profile",
                        "Conflict.",
                        "The identifiers belong to two different profiles.",
                        f"/data/attributes/profiles/data/{index}/attributes",
                    )
            if error is not None:
                error["attributes"]["original_payload"] = item
                job.errors.append(error)
                job.failed_count += 1
                continue
            profile, _ = self._upsert(
                account, attrs, now, clear_nulls=False, found=(existing, stamp)
            )
            job.profile_ids.append(profile.id)
            job.completed_count += 1
        if job.applied < len(job.profiles):
            job.status = "processing"
            return False
        for list_id in job.list_ids:
            lst = self._lists.get(list_id)
            if lst is not None and lst.account_id == job.account_id:
                self._add_members(lst, job.profile_ids)
        job.status = "complete"
        # Applied lazily, a job completed when it was due, not when a request came to look: its
        # completed_at - created_at is how long Klaviyo's jobs take (the watcher learns it).
        done = job.ready_at if self._runner is None else max(job.ready_at, self._clock())
        job.completed = job.created + timedelta(seconds=max(0.0, done - job.created_clock))
        self._pending_jobs = [j for j in self._pending_jobs if j != job.id]
        return True

    def _visible_job(self, ctx: _Ctx, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        assert ctx.account is not None
        if (
            job is None
            or job.account_id != ctx.account.id
            or job.fate in ("expired", "lost")
            or datetime.now(UTC) >= job.created + JOB_RETENTION
        ):
            raise _Reject(_error(404, detail=f"A job with id {job_id} was not found."))
        return job

    # -- handlers ------------------------------------------------------------------------------

    def _h_accounts(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        assert ctx.account is not None
        account_id = ctx.account.id
        resource = {
            "type": "account",
            "id": account_id,
            "attributes": {
                "test_account": True,
                "contact_information": {
                    "default_sender_name": "segops-sync simulator",
                    "default_sender_email": "sim@example.invalid",
                    "website_url": "https://example.invalid",
                    "organization_name": "Simulator",
                    "street_address": {
                        "address1": "",
                        "address2": "",
                        "city": "",
                        "region": "",
                        "country": "",
                        "zip": "",
                    },
                },
                "industry": None,
                "timezone": "UTC",
                "preferred_currency": "USD",
                "public_api_key": account_id,
                "locale": "en-US",
            },
            "links": {"self": f"{ctx.req.base_url}/api/accounts/{account_id}"},
        }
        return _ok({"data": [resource], "links": {"self": _self_link(ctx)}})

    def _h_get_list(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        lst = self._owned_list(ctx, params["id"])
        base = f"{ctx.req.base_url}/api/lists/{lst.id}"
        resource = {
            "type": "list",
            "id": lst.id,
            "attributes": {
                "name": lst.name,
                "created": _iso(lst.created),
                "updated": _iso(lst.created),
                "opt_in_process": lst.opt_in_process,
            },
            "relationships": {
                rel: {"links": {"self": f"{base}/relationships/{rel}", "related": f"{base}/{rel}"}}
                for rel in ("profiles", "tags", "flow-triggers")
            },
            "links": {"self": base},
        }
        return _ok({"data": resource, "links": {"self": _self_link(ctx)}})

    def _h_list_member_ids(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        lst = self._owned_list(ctx, params["id"])
        size = self._page_size(ctx)
        after = _cursor_int(ctx)
        wanted: set[str] | None = None
        if "filter" in ctx.query:
            filt = _parse_filter(ctx, {"email"})
            account = ctx.account
            assert account is not None
            wanted = {
                account.by_email[e] for e in map(_norm_email, filt.values) if e in account.by_email
            }
        if ctx.query.get("sort") not in (None, "joined_group_at", "-joined_group_at"):
            raise _Reject(_error(400, detail="Invalid sort.", parameter="sort"))
        rows = sorted(
            (
                (seq, pid)
                for pid, seq in lst.members.items()
                if seq > after and (wanted is None or pid in wanted)
            ),
        )
        page = rows[:size]
        data = [{"type": "profile", "id": pid} for _, pid in page]
        nxt = str(page[-1][0]) if len(rows) > size else None
        return _ok({"data": data, "links": _links(ctx, nxt)})

    def _h_list_members(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        """GET /api/lists/{id}/profiles: full profiles in join order (cursor = join sequence)."""
        lst = self._owned_list(ctx, params["id"])
        account = ctx.account
        assert account is not None
        size = self._page_size(ctx)
        after = _cursor_int(ctx)
        wanted: set[str] | None = None
        if "filter" in ctx.query:
            filt = _parse_filter(ctx, {"email"})
            wanted = {
                account.by_email[e] for e in map(_norm_email, filt.values) if e in account.by_email
            }
        if ctx.query.get("sort") not in (None, "joined_group_at", "-joined_group_at"):
            raise _Reject(_error(400, detail="Invalid sort.", parameter="sort"))
        extra = ctx.query.get("additional-fields[profile]")
        if extra is not None and extra not in ("subscriptions", "predictive_analytics"):
            raise _Reject(_error(400, detail="Invalid additional-fields.", parameter=extra))
        rows = sorted(
            (seq, pid)
            for pid, seq in lst.members.items()
            if seq > after and (wanted is None or pid in wanted)
        )
        page = rows[:size]
        data = [self._profile_resource(ctx, self._profile_index[pid]) for _, pid in page]
        nxt = str(page[-1][0]) if len(rows) > size else None
        return _ok({"data": data, "links": _links(ctx, nxt)})

    def _h_relationship(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        lst = self._owned_list(ctx, params["id"])
        entries: list[dict[str, Any]] = body["data"]
        if not entries:
            raise _Reject(_error(400, detail="At least one profile is required.", pointer="/data"))
        if len(entries) > MAX_RELATIONSHIP_IDS:
            raise _Reject(
                _error(
                    400,
                    detail=f"At most {MAX_RELATIONSHIP_IDS} profiles may be sent per request.",
                    pointer="/data",
                )
            )
        account = ctx.account
        assert account is not None
        bad = [(i, e["id"]) for i, e in enumerate(entries) if e["id"] not in account.profiles]
        if bad:
            # One bad id fails the whole call (Segment's fixture shows the same).
            listed = ", ".join(pid for _, pid in bad[:20])
            raise _Reject(
                _errors(
                    400,
                    [
                        _error_item(
                            400, detail=f"Invalid profile IDs: {listed}", pointer=f"/data/{i}/id"
                        )
                        for i, _ in bad
                    ],
                )
            )
        ids = [e["id"] for e in entries]
        if ctx.endpoint == Endpoint.ADD_LIST_PROFILES:
            self._add_members(lst, ids)
        else:
            for pid in ids:
                lst.members.pop(pid, None)  # the profile itself (and its consent) stays
        return SimHttpResponse(204, {})

    def _h_get_profiles(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        account = ctx.account
        assert account is not None
        size = self._page_size(ctx)
        after = ctx.query.get("page[cursor]", "")
        sort = ctx.query.get("sort", "id")
        if sort not in _PROFILE_SORTS:
            raise _Reject(_error(400, detail="Invalid sort.", parameter="sort"))
        if "filter" in ctx.query:
            filt = _parse_filter(ctx, {"email", "external_id", "id", "phone_number"})
            ids = set()
            for value in filt.values:
                if filt.field == "email":
                    pid = account.by_email.get(_norm_email(value))
                elif filt.field == "external_id":
                    pid = account.by_external_id.get(value)
                elif filt.field == "phone_number":
                    pid = account.by_phone.get(value)
                else:
                    pid = value if value in account.profiles else None
                if pid:
                    ids.add(pid)
            candidates = sorted(ids)
        else:
            candidates = sorted(account.profiles)
        # Klaviyo indexes new profiles asynchronously: lookups miss them for a while.
        visible = [
            pid for pid in candidates if account.profiles[pid].visible_at <= ctx.now and pid > after
        ]
        page = visible[:size]
        data = [self._profile_resource(ctx, account.profiles[pid]) for pid in page]
        nxt = page[-1] if len(visible) > size else None
        return _ok({"data": data, "links": _links(ctx, nxt)})

    def _h_profile_import(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        account = ctx.account
        assert account is not None
        item = body["data"]
        attrs = {
            k: v
            for k, v in item["attributes"].items()
            if k in _PROFILE_ATTRS or k in ("properties", "location")
        }
        if len(json.dumps(item).encode()) > MAX_PROFILE_BYTES:
            raise _Reject(_error(400, detail="The profile exceeds 100 KB.", pointer="/data"))
        rejection = _profile_rejection(item, attrs, "/data", whole=True)
        if rejection is not None:
            source = rejection["attributes"]["source"]
            raise _Reject(
                _error(400, detail=rejection["attributes"]["detail"], pointer=source["pointer"])
            )
        target: _Profile | None = None
        if item.get("id"):
            target = account.profiles.get(item["id"])
            if target is None:
                raise _Reject(
                    _error(
                        404,
                        detail=f"A profile with id {item['id']} was not found.",
                        pointer="/data/id",
                    )
                )
        else:
            _, conflict = self._resolve(account, attrs)
            if conflict is not None:
                raise _Reject(
                    _errors(
                        409,
                        [
                            _error_item(
                                409,
                                detail="A profile already exists with one of these identifiers.",
                                pointer="/data/attributes",
                                meta={"duplicate_profile_id": conflict},
                            )
                        ],
                    )
                )
        if target is not None:
            self._unindex(account, target)
            for name, value in attrs.items():
                if value is None:
                    target.attrs.pop(name, None)
                else:
                    target.attrs[name] = _norm_email(value) if name == "email" else value
            self._index(account, target)
            profile, created = target, False
        else:
            profile, created = self._upsert(account, attrs, ctx.now, clear_nulls=True)
        doc = {"data": self._profile_resource(ctx, profile)}
        return _ok(doc, status=201 if created else 200)

    def _h_create_job(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        account = ctx.account
        assert account is not None
        data = body["data"]
        profiles: list[dict[str, Any]] = data["attributes"]["profiles"]["data"]
        if not profiles:
            raise _Reject(
                _error(
                    400,
                    detail="At least one profile is required.",
                    pointer="/data/attributes/profiles/data",
                )
            )
        if len(profiles) > MAX_JOB_PROFILES:
            raise _Reject(
                _error(
                    400,
                    detail=f"At most {MAX_JOB_PROFILES} profiles may be imported per job.",
                    pointer="/data/attributes/profiles/data",
                )
            )
        # A malformed email or phone anywhere fails the whole job at submission (as Klaviyo).
        bad: list[dict[str, Any]] = []
        for index, item in enumerate(profiles):
            attrs = item.get("attributes") or {}
            where = f"/data/attributes/profiles/data/{index}/attributes"
            email = attrs.get("email")
            if email is not None and not _valid_email(email):
                bad.append(
                    _error_item(
                        400, detail=f"Invalid email address: {email!r}.", pointer=f"{where}/email"
                    )
                )
            phone = attrs.get("phone_number")
            if phone is not None and not _PHONE_RE.match(phone):
                bad.append(
                    _error_item(
                        400,
                        detail="Invalid phone number format (expected E.164).",
                        pointer=f"{where}/phone_number",
                    )
                )
        if bad:
            raise _Reject(_errors(400, bad))
        rel = ((data.get("relationships") or {}).get("lists") or {}).get("data") or []
        list_ids = [entry["id"] for entry in rel]
        for index, list_id in enumerate(list_ids):
            lst = self._lists.get(list_id)
            if lst is None or lst.account_id != account.id:
                # choice: an unknown list aborts the whole job (rudder-server PR #7107), as 404
                raise _Reject(
                    _error(
                        404,
                        detail=f"A list with id {list_id} does not exist.",
                        pointer=f"/data/relationships/lists/data/{index}/id",
                    )
                )
        stamp = datetime.now(UTC)
        job = _Job(
            id=self._ulid.new(),
            account_id=account.id,
            created=stamp,
            created_clock=ctx.now,
            ready_at=ctx.now + self.job_delay,
            profiles=profiles,
            list_ids=list_ids,
        )
        self._jobs[job.id] = job
        if self._stall_next > 0:  # never due, never applied: it answers "processing" for good
            self._stall_next -= 1
            job.status, job.ready_at = "processing", math.inf
        self._pending_jobs.append(job.id)
        self._runner_wake.set()
        counts = self._submitted.setdefault(account.id, {})
        for item in profiles:
            attrs = item.get("attributes") or {}
            ident = attrs.get("external_id") or attrs.get("email")
            if isinstance(ident, str):
                counts[ident] = counts.get(ident, 0) + 1
        return _ok(
            {"data": self._job_resource(ctx, job), "links": {"self": _self_link(ctx)}}, status=202
        )

    def _h_list_jobs(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        """The account's jobs, oldest first (choice: the spec names no default order), filtered
        by status only (``any``/``equals``, the spec's only filter field)."""
        account = ctx.account
        assert account is not None
        wanted: set[str] | None = None
        if "filter" in ctx.query:
            filt = _parse_filter(ctx, {"status"})
            unknown = sorted(set(filt.values) - _JOB_STATES)
            if unknown:
                raise _Reject(
                    _error(
                        400,
                        detail=f"Invalid filter provided: unknown status {unknown[0]!r}.",
                        parameter="filter",
                    )
                )
            wanted = set(filt.values)
        order = ctx.query.get("sort", "created_at")
        if order not in ("created_at", "-created_at"):
            raise _Reject(_error(400, detail="Invalid sort.", parameter="sort"))
        now = datetime.now(UTC)
        jobs = [
            job
            for job in self._jobs.values()
            if job.account_id == account.id
            and job.fate not in ("expired", "lost")
            and now < job.created + JOB_RETENTION
            and (wanted is None or job.status in wanted)
        ]
        jobs.sort(key=lambda j: (j.created_clock, j.id), reverse=order.startswith("-"))
        size, start = self._page_size(ctx), _cursor_int(ctx)
        page = [self._job_resource(ctx, job) for job in jobs[start : start + size]]
        nxt = str(start + size) if start + size < len(jobs) else None
        return _ok({"data": page, "links": _links(ctx, nxt)})

    def _h_get_job(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        job = self._visible_job(ctx, params["id"])
        return _ok({"data": self._job_resource(ctx, job), "links": {"self": _self_link(ctx)}})

    def _h_job_errors(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        job = self._visible_job(ctx, params["id"])
        size, start = self._page_size(ctx), _cursor_int(ctx)
        page = job.errors[start : start + size]
        nxt = str(start + size) if start + size < len(job.errors) else None
        return _ok({"data": page, "links": _links(ctx, nxt)})

    def _h_job_profiles(self, ctx: _Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        job = self._visible_job(ctx, params["id"])
        size, start = self._page_size(ctx), _cursor_int(ctx)
        ids = job.profile_ids[start : start + size]
        data = [self._profile_resource(ctx, self._profile_index[pid]) for pid in ids]
        nxt = str(start + size) if start + size < len(job.profile_ids) else None
        return _ok({"data": data, "links": _links(ctx, nxt)})

    def _page_size(self, ctx: _Ctx) -> int:
        size = _page_size(ctx)
        return min(size, self.page_size_cap) if self.page_size_cap else size

    # -- resources -----------------------------------------------------------------------------

    def _owned_list(self, ctx: _Ctx, list_id: str) -> _List:
        lst = self._lists.get(list_id)  # case-sensitive, like Klaviyo's ids
        if lst is None or ctx.account is None or lst.account_id != ctx.account.id:
            raise _Reject(_error(404, detail=f"A list with id {list_id} does not exist."))
        return lst

    def _profile_resource(self, ctx: _Ctx, profile: _Profile) -> dict[str, Any]:
        attrs: dict[str, Any] = {name: profile.attrs.get(name) for name in _PROFILE_ATTRS}
        attrs.update(
            {
                "created": _iso(profile.created_at),
                "updated": _iso(profile.updated_at),
                "last_event_date": None,
                "location": profile.attrs.get("location"),
                "properties": profile.attrs.get("properties") or {},
            }
        )
        if ctx.query.get("additional-fields[profile]") == "subscriptions":
            attrs["subscriptions"] = _subscriptions(profile)
        wanted = ctx.query.get("fields[profile]")
        if wanted:
            names = {n.strip() for n in wanted.split(",")}
            if "subscriptions" in attrs:
                names.add("subscriptions")  # additional fields come whatever fields[] says
            attrs = {k: v for k, v in attrs.items() if k in names}
        return {
            "type": "profile",
            "id": profile.id,
            "attributes": attrs,
            "links": {"self": f"{ctx.req.base_url}/api/profiles/{profile.id}"},
        }

    def _job_resource(self, ctx: _Ctx, job: _Job) -> dict[str, Any]:
        base = f"{ctx.req.base_url}/api/profile-bulk-import-jobs/{job.id}"
        return {
            "type": "profile-bulk-import-job",
            "id": job.id,
            "attributes": {
                "status": job.status,
                "created_at": _iso(job.created),
                "total_count": len(job.profiles),
                "completed_count": job.completed_count,
                "failed_count": job.failed_count,
                "completed_at": _iso(job.completed) if job.completed else None,
                "expires_at": _iso(job.created + JOB_RETENTION),
                "started_at": _iso(job.started) if job.started else None,
            },
            "relationships": {
                "lists": {
                    "data": [{"type": "list", "id": lid} for lid in job.list_ids],
                    "links": {"self": f"{base}/relationships/lists", "related": f"{base}/lists"},
                },
                "profiles": {
                    "links": {
                        "self": f"{base}/relationships/profiles",
                        "related": f"{base}/profiles",
                    }
                },
                "import-errors": {
                    "links": {
                        "self": f"{base}/relationships/import-errors",
                        "related": f"{base}/import-errors",
                    }
                },
            },
            "links": {"self": base},
        }


# -- routing -------------------------------------------------------------------------------------

_ROUTES: list[tuple[str, re.Pattern[str], Endpoint, Handler]] = [
    ("GET", re.compile(r"^/api/accounts$"), Endpoint.GET_ACCOUNTS, Simulator._h_accounts),
    ("GET", re.compile(r"^/api/lists/(?P<id>[^/]+)$"), Endpoint.GET_LIST, Simulator._h_get_list),
    (
        "GET",
        re.compile(r"^/api/lists/(?P<id>[^/]+)/relationships/profiles$"),
        Endpoint.GET_LIST_PROFILES,
        Simulator._h_list_member_ids,
    ),
    (
        "GET",
        re.compile(r"^/api/lists/(?P<id>[^/]+)/profiles$"),
        Endpoint.GET_LIST_MEMBERS,
        Simulator._h_list_members,
    ),
    (
        "POST",
        re.compile(r"^/api/lists/(?P<id>[^/]+)/relationships/profiles$"),
        Endpoint.ADD_LIST_PROFILES,
        Simulator._h_relationship,
    ),
    (
        "DELETE",
        re.compile(r"^/api/lists/(?P<id>[^/]+)/relationships/profiles$"),
        Endpoint.REMOVE_LIST_PROFILES,
        Simulator._h_relationship,
    ),
    ("GET", re.compile(r"^/api/profiles$"), Endpoint.GET_PROFILES, Simulator._h_get_profiles),
    (
        "POST",
        re.compile(r"^/api/profile-import$"),
        Endpoint.PROFILE_IMPORT,
        Simulator._h_profile_import,
    ),
    (
        "POST",
        re.compile(r"^/api/profile-bulk-import-jobs$"),
        Endpoint.CREATE_BULK_IMPORT_JOB,
        Simulator._h_create_job,
    ),
    (
        "GET",
        re.compile(r"^/api/profile-bulk-import-jobs$"),
        Endpoint.LIST_BULK_IMPORT_JOBS,
        Simulator._h_list_jobs,
    ),
    (
        "GET",
        re.compile(r"^/api/profile-bulk-import-jobs/(?P<id>[^/]+)$"),
        Endpoint.GET_BULK_IMPORT_JOB,
        Simulator._h_get_job,
    ),
    (
        "GET",
        re.compile(r"^/api/profile-bulk-import-jobs/(?P<id>[^/]+)/import-errors$"),
        Endpoint.GET_BULK_IMPORT_ERRORS,
        Simulator._h_job_errors,
    ),
    (
        "GET",
        re.compile(r"^/api/profile-bulk-import-jobs/(?P<id>[^/]+)/profiles$"),
        Endpoint.GET_BULK_IMPORT_PROFILES,
        Simulator._h_job_profiles,
    ),
]

_BODY_KINDS: dict[Endpoint, BodyKind] = {
    Endpoint.ADD_LIST_PROFILES: "list_members_add",
    Endpoint.REMOVE_LIST_PROFILES: "list_members_delete",
    Endpoint.PROFILE_IMPORT: "profile_import",
    Endpoint.CREATE_BULK_IMPORT_JOB: "bulk_import",
}

# From the spec's parameters for each operation; anything else is a 400, as Klaviyo does.
_ALLOWED_PARAMS: dict[Endpoint, frozenset[str]] = {
    Endpoint.GET_ACCOUNTS: frozenset({"fields[account]"}),
    Endpoint.GET_LIST: frozenset(
        {"additional-fields[list]", "fields[flow]", "fields[list]", "fields[tag]", "include"}
    ),
    Endpoint.GET_LIST_PROFILES: frozenset({"filter", "page[cursor]", "page[size]", "sort"}),
    Endpoint.GET_LIST_MEMBERS: frozenset(
        {
            "additional-fields[profile]",
            "fields[profile]",
            "filter",
            "page[cursor]",
            "page[size]",
            "sort",
        }
    ),
    Endpoint.ADD_LIST_PROFILES: frozenset(),
    Endpoint.REMOVE_LIST_PROFILES: frozenset(),
    Endpoint.GET_PROFILES: frozenset(
        {
            "additional-fields[profile]",
            "fields[conversation]",
            "fields[profile]",
            "fields[push-token]",
            "filter",
            "include",
            "page[cursor]",
            "page[size]",
            "sort",
        }
    ),
    Endpoint.PROFILE_IMPORT: frozenset({"additional-fields[profile]", "fields[profile]"}),
    Endpoint.CREATE_BULK_IMPORT_JOB: frozenset({"fields[profile-bulk-import-job]"}),
    Endpoint.LIST_BULK_IMPORT_JOBS: frozenset(
        {"fields[profile-bulk-import-job]", "filter", "page[cursor]", "page[size]", "sort"}
    ),
    Endpoint.GET_BULK_IMPORT_JOB: frozenset(
        {"fields[list]", "fields[profile-bulk-import-job]", "include"}
    ),
    Endpoint.GET_BULK_IMPORT_ERRORS: frozenset(
        {"fields[import-error]", "page[cursor]", "page[size]"}
    ),
    Endpoint.GET_BULK_IMPORT_PROFILES: frozenset(
        {"additional-fields[profile]", "fields[profile]", "page[cursor]", "page[size]"}
    ),
}
_PROFILE_SORTS = frozenset(
    {"id", "-id", "created", "-created", "email", "-email", "updated", "-updated"}
)


def _match(
    method: str, path: str
) -> tuple[Endpoint | None, Handler | None, dict[str, str], list[str]]:
    allowed: list[str] = []
    for route_method, pattern, endpoint, handler in _ROUTES:
        found = pattern.match(path)
        if found is None:
            continue
        if route_method == method.upper():
            return endpoint, handler, found.groupdict(), [route_method]
        allowed.append(route_method)
    return None, None, {}, allowed


# -- helpers -------------------------------------------------------------------------------------


def _revision_problem(revision: str | None) -> str | None:
    if not revision:
        return "The 'revision' header is required (format YYYY-MM-DD)."
    found = _REVISION_RE.match(revision.strip())
    if not found:
        return f"Invalid revision '{revision}': expected YYYY-MM-DD[.pre]."
    try:
        datetime.strptime(found.group(1), "%Y-%m-%d")
    except ValueError:
        return f"Invalid revision '{revision}'."
    if found.group(1) > LATEST_REVISION:
        return f"Revision '{revision}' does not exist."
    return None


def _valid_email(value: str) -> bool:
    return len(value) <= 254 and bool(_EMAIL_RE.match(value.strip()))


def _norm_email(value: str) -> str:
    return value.strip().lower()


def _profile_rejection(
    item: dict[str, Any], attrs: Mapping[str, Any], where: str, *, whole: bool = False
) -> dict[str, Any] | None:
    """Why Klaviyo would refuse this (schema-valid) profile, as an import-error resource."""
    email, ext, phone = attrs.get("email"), attrs.get("external_id"), attrs.get("phone_number")
    if whole and email is not None and not _valid_email(email):
        return _import_error(
            "invalid",
            "Invalid input.",
            f"Invalid email address: {email!r}.",
            f"{where}/attributes/email",
        )
    if whole and phone is not None and not _PHONE_RE.match(phone):
        return _import_error(
            "invalid",
            "Invalid input.",
            "Invalid phone number format (expected E.164).",
            f"{where}/attributes/phone_number",
        )
    if ext is not None and len(ext) > MAX_EXTERNAL_ID:
        return _import_error(
            "invalid",
            "Invalid input.",
            f"external_id must be at most {MAX_EXTERNAL_ID} characters.",
            f"{where}/attributes/external_id",
        )
    if not email and not ext:
        detail = (
            "A phone number alone needs SMS to be set up; add an email or external_id."
            if phone
            else "A profile needs an email, phone_number or external_id."
        )
        return _import_error("invalid", "Invalid input.", detail, f"{where}/attributes")
    if (
        not whole
        and not _surely_small(item)
        and len(_COMPACT_JSON.encode(item)) > MAX_PROFILE_BYTES
    ):
        return _import_error("invalid", "Invalid input.", "The profile exceeds 100 KB.", where)
    return None


def _surely_small(item: Mapping[str, Any]) -> bool:
    """A profile of a few strings is far below 100 KB: no need to serialize it to know (12
    characters per character bounds JSON's escaping, a surrogate pair included)."""
    attrs = item.get("attributes")
    if len(item) > 2 or not isinstance(attrs, dict):
        return False
    size = 64
    for name, value in attrs.items():
        if not isinstance(value, str):
            return False
        size += 12 * (len(name) + len(value)) + 8
    return size < MAX_PROFILE_BYTES


def _subscriptions(profile: _Profile) -> dict[str, Any]:
    """The shape of Klaviyo's profile ``subscriptions`` additional field (email part)."""
    suppression = (
        [{"reason": "USER_SUPPRESSED", "timestamp": _iso(profile.updated_at)}]
        if profile.suppressed
        else []
    )
    return {
        "email": {
            "marketing": {
                "can_receive_email_marketing": not profile.suppressed,
                "consent": "NEVER_SUBSCRIBED",
                "suppression": suppression,
                "list_suppressions": [],
            }
        }
    }


def _import_error(code: str, title: str, detail: str, pointer: str) -> dict[str, Any]:
    return {
        "type": "import-error",
        "id": str(uuid.uuid4()),
        "attributes": {
            "code": code,
            "title": title,
            "detail": detail,
            "source": {"pointer": pointer},
            "original_payload": None,
        },
    }


def _page_size(ctx: _Ctx) -> int:
    raw = ctx.query.get("page[size]")
    if raw is None:
        return 20
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 1 <= size <= 100:
        raise _Reject(
            _error(
                400, detail="page[size] must be an integer from 1 to 100.", parameter="page[size]"
            )
        )
    return size


def _cursor_int(ctx: _Ctx) -> int:
    raw = ctx.query.get("page[cursor]")
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise _Reject(
            _error(400, detail="Invalid page cursor.", parameter="page[cursor]")
        ) from None


def _parse_filter(ctx: _Ctx, fields: set[str]) -> Any:
    try:
        filt = parse_filter(ctx.query["filter"])
    except FilterError as exc:
        raise _Reject(
            _error(400, detail=f"Invalid filter provided: {exc}.", parameter="filter")
        ) from None
    if filt.field not in fields:
        raise _Reject(
            _error(400, detail=f"Filtering on '{filt.field}' is not supported.", parameter="filter")
        )
    if len(filt.values) > MAX_FILTER_VALUES:
        raise _Reject(
            _error(
                400,
                detail=f"At most {MAX_FILTER_VALUES} values may be given to 'any'.",
                parameter="filter",
            )
        )
    return filt


def _self_link(ctx: _Ctx) -> str:
    query = urlencode(list(ctx.req.query))
    return f"{ctx.req.base_url}{ctx.path}" + (f"?{query}" if query else "")


def _links(ctx: _Ctx, next_cursor: str | None) -> dict[str, str]:
    links = {"self": _self_link(ctx)}
    if next_cursor is not None:
        query = [(k, v) for k, v in ctx.req.query if k != "page[cursor]"]
        query.append(("page[cursor]", next_cursor))
        links["next"] = f"{ctx.req.base_url}{ctx.path}?{urlencode(query)}"
    return links


def _iso(value: datetime) -> str:
    return value.isoformat()


def _ok(doc: Any, status: int = 200) -> SimHttpResponse:
    return SimHttpResponse(status, {"content-type": JSONAPI}, json.dumps(doc).encode())


def _error_item(
    status: int,
    *,
    title: str | None = None,
    detail: str | None = None,
    pointer: str | None = None,
    parameter: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    code, default_title = _STATUS_TEXT.get(status, ("error", "Error."))
    source: dict[str, str] = {}
    if pointer is not None:
        source["pointer"] = pointer
    if parameter is not None:
        source["parameter"] = parameter
    return {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code,
        "title": title or default_title,
        "detail": detail or title or default_title,
        "source": source,
        "links": {},
        "meta": meta or {},
    }


def _errors(status: int, items: list[dict[str, Any]]) -> SimHttpResponse:
    return SimHttpResponse(
        status, {"content-type": JSONAPI}, json.dumps({"errors": items}).encode()
    )


def _error(
    status: int,
    *,
    title: str | None = None,
    detail: str | None = None,
    pointer: str | None = None,
    parameter: str | None = None,
) -> SimHttpResponse:
    return _errors(
        status,
        [_error_item(status, title=title, detail=detail, pointer=pointer, parameter=parameter)],
    )


def _challenge() -> SimHttpResponse:
    return SimHttpResponse(
        403,
        {"content-type": "text/html; charset=UTF-8", "cf-mitigated": "challenge"},
        _CHALLENGE_HTML,
    )
