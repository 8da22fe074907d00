"""Klaviyo layer: a typed httpx client and one error taxonomy (the fake Klaviyo is ``klaviyo_sim``).

Nothing here knows Celery or the database.
"""

from segops_sync.klaviyo.client import DEFAULT_TIMEOUT, KlaviyoClient
from segops_sync.klaviyo.endpoints import (
    ENDPOINT_LIMITS,
    ENDPOINT_SCOPES,
    PROFILE_COUNT_LIMIT,
    REVISION,
    Endpoint,
    RateLimit,
)
from segops_sync.klaviyo.errors import (
    ApiErrorItem,
    Conflict,
    CredentialsRejected,
    InvalidRequest,
    KlaviyoError,
    NotFound,
    PermissionDenied,
    RateLimited,
    TransientError,
    UnexpectedStatus,
    parse_retry_after,
)
from segops_sync.klaviyo.models import (
    PROFILE_FIELDS,
    UNFINISHED_JOB_STATES,
    BulkImportJob,
    ImportedProfile,
    ImportErrorItem,
    JobStatus,
    KlaviyoList,
    ListMember,
    ProfileInput,
    RateLimitHeaders,
)
from segops_sync.klaviyo.payloads import (
    MAX_FILTER_VALUES,
    MAX_IDS_PER_RELATIONSHIP_CALL,
    MAX_JOB_BYTES,
    MAX_PAGE_SIZE,
    MAX_PROFILES_PER_JOB,
    split_into_jobs,
)
from segops_sync.klaviyo.redact import fingerprint, redact_key, scrub

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENDPOINT_LIMITS",
    "ENDPOINT_SCOPES",
    "MAX_FILTER_VALUES",
    "MAX_IDS_PER_RELATIONSHIP_CALL",
    "MAX_JOB_BYTES",
    "MAX_PAGE_SIZE",
    "MAX_PROFILES_PER_JOB",
    "PROFILE_COUNT_LIMIT",
    "PROFILE_FIELDS",
    "REVISION",
    "UNFINISHED_JOB_STATES",
    "ApiErrorItem",
    "BulkImportJob",
    "Conflict",
    "CredentialsRejected",
    "Endpoint",
    "ImportErrorItem",
    "ImportedProfile",
    "InvalidRequest",
    "JobStatus",
    "KlaviyoClient",
    "KlaviyoError",
    "KlaviyoList",
    "ListMember",
    "NotFound",
    "PermissionDenied",
    "ProfileInput",
    "RateLimit",
    "RateLimitHeaders",
    "RateLimited",
    "TransientError",
    "UnexpectedStatus",
    "fingerprint",
    "parse_retry_after",
    "redact_key",
    "scrub",
    "split_into_jobs",
]
