"""The simulator: a fake Klaviyo that answers like the real one, composed of its resources.

Requests are handled by ``Simulator.handle`` as plain values, so tests can also drive it
in-process with a fake clock (``Simulator.call``). The behaviour of each resource lives in its
module (accounts, profiles, lists, jobs, throttling); this one authenticates, routes, validates
and records every request.

Choices where Klaviyo's behaviour is unconfirmed (see docs/klaviyo.md#not-confirmed) are marked "choice:".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from segops_sync.klaviyo.endpoints import REVISION, Endpoint
from segops_sync.klaviyo_sim.accounts import AccountsMixin
from segops_sync.klaviyo_sim.jobs import JobsMixin
from segops_sync.klaviyo_sim.published import ENDPOINT_SCOPES
from segops_sync.klaviyo_sim.responses import (
    challenge_response,
    error_item,
    error_response,
    errors_response,
)
from segops_sync.klaviyo_sim.state import (
    JSONAPI,
    Ctx,
    Faults,
    Reject,
    SimHttpRequest,
    SimHttpResponse,
    SimRequest,
)
from segops_sync.klaviyo_sim.throttling import RateLimitsMixin
from segops_sync.klaviyo_sim.validation import BodyKind, validate_body

# The newest revision Klaviyo has published (docs/klaviyo.md#revision-and-headers); later dates are refused.
LATEST_REVISION = "2026-10-15"
MAX_BODY_BYTES = 5 * 1024 * 1024
_REVISION_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(\.pre)?$")
_SUBSCRIPTION_RE = re.compile(r"subscription", re.IGNORECASE)
Handler = Callable[["Simulator", Ctx, dict[str, str], Any], SimHttpResponse]


class Simulator(JobsMixin, AccountsMixin, RateLimitsMixin):
    """State and behaviour of a fake Klaviyo. Thread-safe.

    time_scale compresses time: with 10, the burst window is 0.1 s and the steady window 6 s, and
    every number the simulator reports or accepts (Retry-After, RateLimit-Reset, job_delay,
    indexing_delay, max_rate windows) is in those compressed, i.e. real clock, seconds.
    """

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
            ctx = Ctx(now, req, path, query, endpoint, account, key)
            if path.startswith(("/api/", "/client/")) and _SUBSCRIPTION_RE.search(path):
                self._subscription_calls += 1
            early = self._is_early(ctx)

            fault = self._pick_fault()
            if fault == "challenge":
                return self._record(ctx, challenge_response(), early)
            if fault == "drop_before":
                return self._record(ctx, SimHttpResponse(0, {}, drop=True), early)
            if fault == "error":
                status = self._rng.choice((500, 503))
                return self._record(ctx, self._with_limits(ctx, error_response(status)), early)

            try:
                response = self._dispatch(ctx, handler, path_params, allowed)
            except Reject as rejected:
                response = rejected.response
            if response.status != 429:
                response = self._with_limits(ctx, response)
            if fault == "drop_after":
                response.drop = True  # applied, but the answer is lost: the nastiest case
            return self._record(ctx, response, early)

    def _dispatch(
        self,
        ctx: Ctx,
        handler: Handler | None,
        path_params: dict[str, str],
        allowed: list[str],
    ) -> SimHttpResponse:
        req = ctx.req
        if handler is None and not (
            ctx.path.startswith("/api/") and _SUBSCRIPTION_RE.search(ctx.path)
        ):
            if allowed:
                return error_response(405, detail=f"Method {req.method} not allowed.")
            return error_response(404, detail="The requested resource was not found.")

        auth = req.headers.get("authorization")
        if not auth:
            return error_response(401)
        if ctx.key is None or ctx.key.revoked or ctx.account is None:
            return error_response(
                401,
                title="Incorrect authentication credentials.",
                detail="Incorrect authentication credentials.",
            )

        revision = req.headers.get("revision")
        problem = _revision_problem(revision)
        if problem:
            return error_response(400, detail=problem, parameter="revision")

        if handler is None:  # a subscription endpoint: counted, never served
            if "subscriptions:write" not in ctx.key.scopes:
                return error_response(
                    403, detail="Your API key is missing required scopes: subscriptions:write."
                )
            return error_response(501, detail="segops-sync must never call subscription endpoints.")

        assert ctx.endpoint is not None
        decision = self._admit(ctx)
        if decision is not None:
            return decision

        missing = sorted(ENDPOINT_SCOPES[ctx.endpoint] - ctx.key.scopes)
        if missing:
            return error_response(
                403, detail="Your API key is missing required scopes: " + ", ".join(missing) + "."
            )

        unknown = [name for name in ctx.query if name not in _ALLOWED_PARAMS[ctx.endpoint]]
        if unknown:
            return error_response(
                400, detail=f"'{unknown[0]}' is not a valid query parameter.", parameter=unknown[0]
            )

        body: Any = None
        kind = _BODY_KINDS.get(ctx.endpoint)
        if kind is not None:
            body = self._parse_body(ctx, kind)
        return handler(self, ctx, path_params, body)

    def _parse_body(self, ctx: Ctx, kind: BodyKind) -> Any:
        req = ctx.req
        content_type = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (JSONAPI, "application/json"):
            raise Reject(
                error_response(
                    415, detail=f"Unsupported media type '{content_type or 'none'}' in request."
                )
            )
        if len(req.body) > MAX_BODY_BYTES:
            raise Reject(
                error_response(413, detail="The request payload exceeds 5 MB.", pointer="/data")
            )
        try:
            # orjson: a 10,000-profile job parses in ~7 ms instead of ~60 (the benchmark's
            # simulator shares the workers' CPUs, as Klaviyo's own machines would not).
            body = orjson.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            raise Reject(error_response(400, detail="JSON parse error.", pointer="/data")) from None
        problems = validate_body(kind, body, use_models=self._use_models)
        if problems:
            raise Reject(
                errors_response(
                    400,
                    [error_item(400, detail=p.detail, pointer=p.pointer) for p in problems[:50]],
                )
            )
        return body

    # -- bookkeeping ---------------------------------------------------------------------------

    def _record(self, ctx: Ctx, response: SimHttpResponse, early: bool) -> SimHttpResponse:
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

    def _pick_fault(self) -> str | None:
        faults = self._faults
        if faults.challenge_rate and self._rng.random() < faults.challenge_rate:
            return "challenge"
        if faults.drop_rate and self._rng.random() < faults.drop_rate:
            return "drop_before" if self._rng.random() < 0.5 else "drop_after"
        if faults.error_rate and self._rng.random() < faults.error_rate:
            return "error"
        return None


# -- routing -------------------------------------------------------------------------------------

_ROUTES: list[tuple[str, re.Pattern[str], Endpoint, Handler]] = [
    ("GET", re.compile(r"^/api/accounts$"), Endpoint.GET_ACCOUNTS, Simulator._h_accounts),
    ("GET", re.compile(r"^/api/lists/(?P<id>[^/]+)$"), Endpoint.GET_LIST, Simulator._h_get_list),
    ("GET", re.compile(r"^/api/lists$"), Endpoint.GET_LISTS, Simulator._h_get_lists),
    ("POST", re.compile(r"^/api/lists$"), Endpoint.CREATE_LIST, Simulator._h_create_list),
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
    (
        "POST",
        re.compile(r"^/api/data-privacy-deletion-jobs$"),
        Endpoint.REQUEST_PROFILE_DELETION,
        Simulator._h_request_deletion,
    ),
]

_BODY_KINDS: dict[Endpoint, BodyKind] = {
    Endpoint.CREATE_LIST: "list_create",
    Endpoint.ADD_LIST_PROFILES: "list_members_add",
    Endpoint.REMOVE_LIST_PROFILES: "list_members_delete",
    Endpoint.PROFILE_IMPORT: "profile_import",
    Endpoint.CREATE_BULK_IMPORT_JOB: "bulk_import",
    Endpoint.REQUEST_PROFILE_DELETION: "deletion_job",
}

# From the spec's parameters for each operation; anything else is a 400, as Klaviyo does.
_ALLOWED_PARAMS: dict[Endpoint, frozenset[str]] = {
    Endpoint.GET_ACCOUNTS: frozenset({"fields[account]"}),
    Endpoint.GET_LIST: frozenset(
        {"additional-fields[list]", "fields[flow]", "fields[list]", "fields[tag]", "include"}
    ),
    Endpoint.GET_LISTS: frozenset(
        {
            "fields[flow]",
            "fields[list]",
            "fields[tag]",
            "filter",
            "include",
            "page[cursor]",
            "page[size]",
            "sort",
        }
    ),
    Endpoint.CREATE_LIST: frozenset({"fields[list]"}),
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
    Endpoint.REQUEST_PROFILE_DELETION: frozenset(),
}


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
