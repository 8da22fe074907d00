"""One taxonomy of Klaviyo outcomes: each class says whether retrying can help.

Exceptions are built only from the HTTP status and Klaviyo's JSON:API error body, never from the
request, so the API key cannot travel inside them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

from segops_sync.klaviyo.endpoints import Endpoint
from segops_sync.klaviyo.jsonapi import obj
from segops_sync.klaviyo.redact import scrub

_MAX_DETAIL = 500
_PROFILE_POINTER = re.compile(r"^/data/attributes/profiles/data/(\d+)(?:/|$)")
_RELATIONSHIP_POINTER = re.compile(r"^/data/(\d+)(?:/|$)")


@dataclass(frozen=True)
class ApiErrorItem:
    """One entry of a JSON:API ``errors`` array."""

    code: str
    title: str
    detail: str
    pointer: str | None = None
    parameter: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class KlaviyoError(Exception):
    """Any failed Klaviyo call. ``permanent``: retrying the same request cannot succeed."""

    permanent: ClassVar[bool] = True
    summary: ClassVar[str] = "Klaviyo request failed"

    def __init__(
        self,
        detail: str = "",
        *,
        status: int | None = None,
        endpoint: Endpoint | None = None,
        errors: Sequence[ApiErrorItem] = (),
    ) -> None:
        self.detail = detail
        self.status = status
        self.endpoint = endpoint
        self.errors = list(errors)
        super().__init__(detail)

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        head = f"{self.summary}{status}"
        return f"{head}: {self.detail}" if self.detail else head

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, detail={self.detail!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles exceptions; keyword-only fields would otherwise be lost.
        return (type(self), (self.detail,), dict(self.__dict__))


class CredentialsRejected(KlaviyoError):
    """401: the key is missing, mistyped, deleted or revoked. A person must fix it."""

    summary = "Klaviyo rejected the API key"


class PermissionDenied(KlaviyoError):
    """403 with a JSON:API body: the key lacks a scope (needs Lists and Profiles read/write)."""

    summary = "the API key lacks a permission Klaviyo requires"


class NotFound(KlaviyoError):
    """404: the list (or job) does not exist in the key's account. List ids are case-sensitive."""

    summary = "Klaviyo does not know this resource"


class InvalidRequest(KlaviyoError):
    """400, 409, 415, 422: Klaviyo refused the request as sent; ``errors`` name the culprits."""

    summary = "Klaviyo refused the request"

    def profile_indexes(self) -> set[int]:
        """Indexes of the profiles the error pointers name, in the body that was sent.

        ``/data/attributes/profiles/data/3/attributes/email`` (bulk job) and ``/data/3`` or
        ``/data/3/id`` (list relationship body) both name index 3.
        """
        return set(self.reasons_by_index())

    def reasons_by_index(self) -> dict[int, str]:
        """Klaviyo's reason for each profile its pointers name (the first error per index)."""
        reasons: dict[int, str] = {}
        for err in self.errors:
            if not err.pointer:
                continue
            match = _PROFILE_POINTER.match(err.pointer) or _RELATIONSHIP_POINTER.match(err.pointer)
            if match:
                reason = f"{err.title}: {err.detail}" if err.title else err.detail
                reasons.setdefault(int(match.group(1)), reason)
        return reasons


class Conflict(InvalidRequest):
    """409: e.g. the identifiers belong to two different profiles."""

    summary = "Klaviyo reported a conflict"

    @property
    def duplicate_profile_id(self) -> str | None:
        for err in self.errors:
            value = err.meta.get("duplicate_profile_id")
            if isinstance(value, str):
                return value
        return None


class UnexpectedStatus(KlaviyoError):
    """A status this client has no rule for (405, 410 for a retired revision, …)."""

    summary = "Klaviyo answered with an unexpected status"


class TransientError(KlaviyoError):
    """5xx, timeouts, dropped connections, and Cloudflare challenges: retry with backoff."""

    permanent = False
    summary = "Klaviyo is temporarily unavailable"


class RateLimited(KlaviyoError):
    """429: wait ``retry_after`` seconds (when given) before calling this endpoint again."""

    permanent = False
    summary = "Klaviyo rate limit hit"

    def __init__(
        self,
        detail: str = "",
        *,
        status: int | None = 429,
        endpoint: Endpoint | None = None,
        errors: Sequence[ApiErrorItem] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, status=status, endpoint=endpoint, errors=errors)
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"RateLimited(retry_after={self.retry_after!r}, detail={self.detail!r})"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After value: an integer, a decimal (the simulator), or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(0.0, seconds)


def parse_error_items(body: bytes, content_type: str) -> list[ApiErrorItem] | None:
    """The JSON:API errors of a body, or None when the body is not a JSON:API error document."""
    if "json" not in content_type.lower():
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    raw = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        return None
    items: list[ApiErrorItem] = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        source = obj(entry, "source")
        meta = obj(entry, "meta")
        items.append(
            ApiErrorItem(
                code=_text(entry.get("code")),
                title=_text(entry.get("title")),
                detail=_text(entry.get("detail")),
                pointer=_opt_text(source.get("pointer")),
                parameter=_opt_text(source.get("parameter")),
                meta=dict(meta),
            )
        )
    return items


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    endpoint: Endpoint | None,
    secret: str | None,
) -> KlaviyoError:
    """Classify a non-2xx answer. ``secret`` is scrubbed from every text taken from the body."""
    content_type = headers.get("content-type", "")
    items = parse_error_items(body, content_type)
    items = [_scrub_item(i, secret) for i in items] if items is not None else None
    detail = _summarise(items) if items else _describe_non_jsonapi(status, headers)
    kwargs: dict[str, Any] = {"status": status, "endpoint": endpoint, "errors": items or ()}

    if status == 429:
        retry_after = parse_retry_after(headers.get("retry-after"))
        return RateLimited(detail, retry_after=retry_after, **kwargs)
    if status == 401:
        return CredentialsRejected(detail, **kwargs)
    if status == 403:
        # A Cloudflare bot challenge is an HTML 403 (cf-mitigated: challenge): not a scope problem.
        if items is None or "cf-mitigated" in headers:
            return TransientError(detail, **kwargs)
        return PermissionDenied(detail, **kwargs)
    if status == 404:
        return NotFound(detail, **kwargs)
    if status == 400 and items and any("api key" in i.detail.lower() for i in items):
        # Older Klaviyo revisions answered a bad key with 400 and "API key" in the detail.
        return CredentialsRejected(detail, **kwargs)
    if status == 409:
        return Conflict(detail, **kwargs)
    if status in (400, 413, 415, 422):
        return InvalidRequest(detail, **kwargs)
    if status in (408, 425) or status >= 500:
        return TransientError(detail, **kwargs)
    return UnexpectedStatus(detail, **kwargs)


def _summarise(items: Sequence[ApiErrorItem]) -> str:
    parts = []
    for item in items[:5]:
        text = item.detail or item.title or item.code
        where = item.pointer or item.parameter
        parts.append(f"{text} [{where}]" if where else text)
    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
    return _clip("; ".join(parts) + more)


def _describe_non_jsonapi(status: int, headers: Mapping[str, str]) -> str:
    # The body itself (an HTML challenge page, a proxy error) is noise and stays out of the message.
    kind = headers.get("content-type", "no content-type").split(";")[0].strip() or "no content-type"
    extra = f", cf-mitigated: {headers['cf-mitigated']}" if "cf-mitigated" in headers else ""
    return f"HTTP {status} without a JSON:API error body ({kind}{extra})"


def _scrub_item(item: ApiErrorItem, secret: str | None) -> ApiErrorItem:
    return ApiErrorItem(
        code=scrub(item.code, secret),
        title=scrub(item.title, secret),
        detail=_clip(scrub(item.detail, secret)),
        pointer=item.pointer,
        parameter=item.parameter,
        meta=item.meta,
    )


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _opt_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
