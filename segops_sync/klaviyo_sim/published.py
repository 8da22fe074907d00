"""What Klaviyo publishes per endpoint: its rate-limit tier and the scopes a key needs.

Written here from Klaviyo's own sources, never imported from the client
(segops_sync.klaviyo.endpoints): a wrong number in the client must make tests fail, not pass
because both sides read the same table. tests/klaviyo_sim/test_tiers_agree.py checks the two.

Sources:
- Tiers: Klaviyo's rate-limit guide (developers.klaviyo.com/en/docs/rate_limits_and_error_handling)
  names XS = 1/s burst, 15/m steady; S = 3/s, 60/m; M = 10/s, 150/m; L = 75/s, 700/m in the
  guide, but the OpenAPI document's ``x-klaviyo-ratelimit`` says 750/m for every L endpoint since
  revision 2026-01-15 (the revision served here is 2026-07-15, so 750); XL = 350/s, 3500/m.
- Per endpoint: ``x-klaviyo-ratelimit`` and ``x-klaviyo-scopes`` of the OpenAPI document for
  revision 2026-07-15 (klaviyo/openapi ``openapi/stable.json``). Profile-import, Get Profiles,
  Get List and the list-member reads are L; the list relationship writes and every
  profile-bulk-import-jobs endpoint are M; Get Accounts is XS.
- Limits are per account, on a fixed 1-second burst window and a 60-second steady window.
"""

from __future__ import annotations

from dataclasses import dataclass

from segops_sync.klaviyo.endpoints import Endpoint


@dataclass(frozen=True)
class RateLimit:
    burst: int  # requests per second
    steady: int  # requests per minute


XS = RateLimit(burst=1, steady=15)
S = RateLimit(burst=3, steady=60)
M = RateLimit(burst=10, steady=150)
L = RateLimit(burst=75, steady=750)
XL = RateLimit(burst=350, steady=3500)

ENDPOINT_LIMITS: dict[Endpoint, RateLimit] = {
    Endpoint.GET_ACCOUNTS: XS,
    Endpoint.GET_LIST: L,  # without additional-fields[list]=profile_count (then XS)
    Endpoint.GET_LISTS: L,
    Endpoint.CREATE_LIST: M,  # the spec adds 150/d, which the simulator does not count
    Endpoint.GET_LIST_PROFILES: L,
    Endpoint.GET_LIST_MEMBERS: L,
    Endpoint.ADD_LIST_PROFILES: M,
    Endpoint.REMOVE_LIST_PROFILES: M,
    Endpoint.GET_PROFILES: L,  # without predictive_analytics (then M)
    Endpoint.PROFILE_IMPORT: L,
    Endpoint.CREATE_BULK_IMPORT_JOB: M,
    Endpoint.LIST_BULK_IMPORT_JOBS: M,
    Endpoint.GET_BULK_IMPORT_JOB: M,
    Endpoint.GET_BULK_IMPORT_ERRORS: M,
    Endpoint.GET_BULK_IMPORT_PROFILES: M,
    Endpoint.REQUEST_PROFILE_DELETION: S,  # request_profile_deletion: 3/s, 60/m
}

# GET /api/lists/{id} with additional-fields[list]=profile_count (the spec's description of get_list)
PROFILE_COUNT = XS

_LISTS_READ = frozenset({"lists:read", "profiles:read"})
_LISTS_WRITE = frozenset({"lists:write", "profiles:write"})
ENDPOINT_SCOPES: dict[Endpoint, frozenset[str]] = {
    Endpoint.GET_ACCOUNTS: frozenset({"accounts:read"}),
    Endpoint.GET_LIST: frozenset({"lists:read"}),
    Endpoint.GET_LISTS: frozenset({"lists:read"}),
    Endpoint.CREATE_LIST: frozenset({"lists:write"}),
    Endpoint.GET_LIST_PROFILES: _LISTS_READ,
    Endpoint.GET_LIST_MEMBERS: _LISTS_READ,
    Endpoint.ADD_LIST_PROFILES: _LISTS_WRITE,
    Endpoint.REMOVE_LIST_PROFILES: _LISTS_WRITE,
    Endpoint.GET_PROFILES: frozenset({"profiles:read"}),
    Endpoint.PROFILE_IMPORT: frozenset({"profiles:write"}),
    Endpoint.CREATE_BULK_IMPORT_JOB: _LISTS_WRITE,
    Endpoint.LIST_BULK_IMPORT_JOBS: _LISTS_READ,
    Endpoint.GET_BULK_IMPORT_JOB: _LISTS_READ,
    Endpoint.GET_BULK_IMPORT_ERRORS: frozenset({"profiles:read"}),
    Endpoint.GET_BULK_IMPORT_PROFILES: frozenset({"profiles:read"}),
    Endpoint.REQUEST_PROFILE_DELETION: frozenset({"data-privacy:write"}),
}
