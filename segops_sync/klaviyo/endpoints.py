"""The Klaviyo endpoints the client calls, with their published rate limits and scopes.

Numbers come from the ``x-klaviyo-ratelimit`` / ``x-klaviyo-scopes`` extensions of Klaviyo's OpenAPI
document for revision 2026-07-15. The simulator (segops_sync.klaviyo_sim.published) keeps its own
copy, written from Klaviyo's sources too, and tests/klaviyo_sim/test_tiers_agree.py checks that the
two agree: a limiter that keeps the simulator happy keeps Klaviyo happy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote

# Pinned to the vendored spec: bodies and behaviour are checked against exactly this revision.
REVISION = "2026-07-15"


class Endpoint(StrEnum):
    """One member per rate-limited Klaviyo endpoint; the value is a stable key ("METHOD path")."""

    GET_ACCOUNTS = "GET /api/accounts"
    GET_LIST = "GET /api/lists/{id}"
    # the list picker (connectors create without --list-id, POST /v1/klaviyo/lists)
    GET_LISTS = "GET /api/lists"
    # connectors create --create-list
    CREATE_LIST = "POST /api/lists"
    # ids only: cheaper than /profiles and all reconciliation needs
    GET_LIST_PROFILES = "GET /api/lists/{id}/relationships/profiles"
    # with email and external_id: what verification matches segment members on
    GET_LIST_MEMBERS = "GET /api/lists/{id}/profiles"
    ADD_LIST_PROFILES = "POST /api/lists/{id}/relationships/profiles"
    REMOVE_LIST_PROFILES = "DELETE /api/lists/{id}/relationships/profiles"
    GET_PROFILES = "GET /api/profiles"
    PROFILE_IMPORT = "POST /api/profile-import"
    CREATE_BULK_IMPORT_JOB = "POST /api/profile-bulk-import-jobs"
    # One call answers for up to 100 jobs: how a whole account's jobs are watched at once.
    LIST_BULK_IMPORT_JOBS = "GET /api/profile-bulk-import-jobs"
    GET_BULK_IMPORT_JOB = "GET /api/profile-bulk-import-jobs/{id}"
    GET_BULK_IMPORT_ERRORS = "GET /api/profile-bulk-import-jobs/{id}/import-errors"
    GET_BULK_IMPORT_PROFILES = "GET /api/profile-bulk-import-jobs/{id}/profiles"
    # members forget --klaviyo-delete: Klaviyo deletes the profile (asynchronously)
    REQUEST_PROFILE_DELETION = "POST /api/data-privacy-deletion-jobs"

    @property
    def method(self) -> str:
        return self.value.split(" ", 1)[0]

    @property
    def path_template(self) -> str:
        return self.value.split(" ", 1)[1]

    def path(self, resource_id: str | None = None) -> str:
        """The concrete path; the id is percent-encoded so it can never change the route."""
        template = self.path_template
        if "{id}" not in template:
            return template
        if not resource_id:
            raise ValueError(f"{self.name} needs a resource id")
        return template.replace("{id}", quote(resource_id, safe=""))


@dataclass(frozen=True)
class RateLimit:
    """Klaviyo's published limit for one endpoint: requests per 1 s (burst), per 60 s (steady)."""

    burst: int
    steady: int

    def __post_init__(self) -> None:
        for name in ("burst", "steady"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RateLimit.{name} must be a positive int, got {value!r}")


XS = RateLimit(burst=1, steady=15)
S = RateLimit(burst=3, steady=60)
M = RateLimit(burst=10, steady=150)
L = RateLimit(burst=75, steady=750)

ENDPOINT_LIMITS: dict[Endpoint, RateLimit] = {
    Endpoint.GET_ACCOUNTS: XS,
    Endpoint.GET_LIST: L,
    Endpoint.GET_LISTS: L,
    Endpoint.CREATE_LIST: M,  # and 150 a day, which no limiter here counts
    Endpoint.GET_LIST_PROFILES: L,
    Endpoint.GET_LIST_MEMBERS: L,
    Endpoint.ADD_LIST_PROFILES: M,
    Endpoint.REMOVE_LIST_PROFILES: M,
    Endpoint.GET_PROFILES: L,
    Endpoint.PROFILE_IMPORT: L,
    Endpoint.CREATE_BULK_IMPORT_JOB: M,
    Endpoint.LIST_BULK_IMPORT_JOBS: M,
    Endpoint.GET_BULK_IMPORT_JOB: M,
    Endpoint.GET_BULK_IMPORT_ERRORS: M,
    Endpoint.GET_BULK_IMPORT_PROFILES: M,
    Endpoint.REQUEST_PROFILE_DELETION: S,
}

# GET /api/lists/{id} with additional-fields[list]=profile_count: Klaviyo's XS tier, not L. Only
# the list picker asks for it, for a few lists at a time (connectors.key_lists).
PROFILE_COUNT_LIMIT = XS

ENDPOINT_SCOPES: dict[Endpoint, frozenset[str]] = {
    Endpoint.GET_ACCOUNTS: frozenset({"accounts:read"}),
    Endpoint.GET_LIST: frozenset({"lists:read"}),
    Endpoint.GET_LISTS: frozenset({"lists:read"}),
    Endpoint.CREATE_LIST: frozenset({"lists:write"}),
    Endpoint.GET_LIST_PROFILES: frozenset({"lists:read", "profiles:read"}),
    Endpoint.GET_LIST_MEMBERS: frozenset({"lists:read", "profiles:read"}),
    Endpoint.ADD_LIST_PROFILES: frozenset({"lists:write", "profiles:write"}),
    Endpoint.REMOVE_LIST_PROFILES: frozenset({"lists:write", "profiles:write"}),
    Endpoint.GET_PROFILES: frozenset({"profiles:read"}),
    Endpoint.PROFILE_IMPORT: frozenset({"profiles:write"}),
    Endpoint.CREATE_BULK_IMPORT_JOB: frozenset({"lists:write", "profiles:write"}),
    Endpoint.LIST_BULK_IMPORT_JOBS: frozenset({"lists:read", "profiles:read"}),
    Endpoint.GET_BULK_IMPORT_JOB: frozenset({"lists:read", "profiles:read"}),
    Endpoint.GET_BULK_IMPORT_ERRORS: frozenset({"profiles:read"}),
    Endpoint.GET_BULK_IMPORT_PROFILES: frozenset({"profiles:read"}),
    Endpoint.REQUEST_PROFILE_DELETION: frozenset({"data-privacy:write"}),
}


def _template_pattern(endpoint: Endpoint) -> re.Pattern[str]:
    parts = [re.escape(p) for p in endpoint.path_template.split("{id}")]
    return re.compile("^" + "[^/]+".join(parts) + "/?$")


_PATTERNS = [(e, _template_pattern(e)) for e in Endpoint]


def endpoint_for(method: str, path: str) -> Endpoint | None:
    """The endpoint a concrete request went to, for labels and logs that must name the template
    (``GET /api/profiles``), never the URL with its ids or filter values."""
    method = method.upper()
    start = path.find("/api/")  # a base URL may carry a path prefix (a proxy, say)
    path = path[start:] if start > 0 else path
    for endpoint, pattern in _PATTERNS:
        if endpoint.method == method and pattern.match(path):
            return endpoint
    return None
