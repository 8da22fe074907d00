"""A small, typed, synchronous Klaviyo client for the calls a list sync needs.

It knows nothing of Celery, databases or retries: every failure becomes one exception of the
taxonomy in ``errors``, and the caller decides what to do. Rate limiting is the caller's too; it
hooks in through ``before_request`` (called before every HTTP request, pages included) and
``after_response`` (called with Klaviyo's RateLimit-* headers after every non-429 answer).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import httpx

from segops_sync.klaviyo.endpoints import REVISION, Endpoint
from segops_sync.klaviyo.errors import (
    KlaviyoError,
    NotFound,
    TransientError,
    UnexpectedStatus,
    error_from_response,
)
from segops_sync.klaviyo.jsonapi import obj
from segops_sync.klaviyo.models import (
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
    JSONAPI,
    MAX_FILTER_VALUES,
    MAX_IDS_PER_RELATIONSHIP_CALL,
    MAX_JOB_BYTES,
    MAX_LISTS_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_PROFILES_PER_JOB,
    any_filter,
    bulk_import_body,
    deletion_job_body,
    encode_body,
    list_create_body,
    profile_import_body,
    relationship_body,
)
from segops_sync.klaviyo.redact import Secret, install_log_redaction, redact_key, scrub

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# A key goes into a header verbatim; anything outside visible ASCII would make httpx raise an
# error that quotes the header value, key included.
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")
_LEADING_INT = re.compile(r"^\s*(\d+)")
_LEADING_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)")

BeforeRequest = Callable[[Endpoint], None]
AfterResponse = Callable[[Endpoint, RateLimitHeaders], None]


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process: httpx would build one per client, loading the CA
    bundle each time (a fifth of a batch step's CPU, and a batch makes a client each step)."""
    return httpx.create_ssl_context()


class KlaviyoClient:
    """One pooled httpx.Client per instance; close it (or use ``with``) when done."""

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://a.klaviyo.com",
        *,
        timeout: httpx.Timeout | None = None,
        before_request: BeforeRequest | None = None,
        after_response: AfterResponse | None = None,
        transport: httpx.BaseTransport | None = None,
        event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        if not isinstance(api_key, str) or not _HEADER_SAFE.match(api_key):
            raise ValueError("the API key is empty or contains characters not allowed in a header")
        install_log_redaction()
        self._secret = Secret(api_key)
        self._label = redact_key(api_key)
        self._before_request = before_request
        self._after_response = after_response
        self.last_rate_limit: RateLimitHeaders | None = None
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Klaviyo-API-Key {api_key}",
                "revision": REVISION,
                "accept": JSONAPI,
                "user-agent": "segops-sync",
            },
            timeout=timeout or DEFAULT_TIMEOUT,
            transport=transport,
            verify=_tls_context(),
            follow_redirects=False,  # a redirect could carry the key to another host
            # httpx's own hooks (request/response): the caller's metrics see every answer, 429s
            # included, without this client knowing who counts.
            event_hooks={k: list(v) for k, v in (event_hooks or {}).items()},
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    def __repr__(self) -> str:
        return f"KlaviyoClient(base_url={self.base_url!r}, api_key={self._label!r})"

    __str__ = __repr__

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KlaviyoClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- operations ----------------------------------------------------------------------------

    def get_account_id(self) -> str:
        """The account the key belongs to (XS tier: 1/s, 15/m, so cache the answer)."""
        doc = self._json(self._request(Endpoint.GET_ACCOUNTS, Endpoint.GET_ACCOUNTS.path()))
        data = doc.get("data")
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise _malformed(Endpoint.GET_ACCOUNTS, "no account in data")
        return _str_field(data[0], "id", Endpoint.GET_ACCOUNTS)

    def get_list(self, list_id: str, *, profile_count: bool = False) -> KlaviyoList:
        """Checks key and list together in one L-tier call. With ``profile_count`` the answer
        also counts the list's members, but Klaviyo then bills the call to its XS tier
        (PROFILE_COUNT_LIMIT: 1/s, 15/m): ask for a few lists only."""
        endpoint = Endpoint.GET_LIST
        params = {"additional-fields[list]": "profile_count"} if profile_count else None
        doc = self._json(self._request(endpoint, endpoint.path(list_id), params=params))
        found = _klaviyo_list(_dict_field(doc, "data", endpoint), endpoint)
        if found.id != list_id:
            # list ids are case-sensitive: a different id back means the one we asked for is unknown
            raise NotFound(
                f"asked for list {list_id!r}, Klaviyo answered with {found.id!r}",
                status=200,
                endpoint=endpoint,
            )
        return found

    def iter_lists(self) -> Iterator[KlaviyoList]:
        """Every list of the key's account, by name, all pages (10 lists a page, Klaviyo's
        maximum for this call; L tier). Without member counts: GET /api/lists has none."""
        endpoint = Endpoint.GET_LISTS
        params = {"page[size]": str(MAX_LISTS_PAGE_SIZE), "sort": "name"}
        for item in self._paginate(endpoint, endpoint.path(), params):
            yield _klaviyo_list(item, endpoint)

    def create_list(self, name: str) -> KlaviyoList:
        """POST /api/lists: a new list with the account's default opt-in process (M tier, and
        at most 150 a day). Raises ValueError for a blank name."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a list needs a name")
        endpoint = Endpoint.CREATE_LIST
        body = encode_body(list_create_body(name))
        doc = self._json(self._request(endpoint, endpoint.path(), body=body))
        return _klaviyo_list(_dict_field(doc, "data", endpoint), endpoint)

    def create_bulk_import_job(
        self, profiles: Sequence[ProfileInput], list_id: str
    ) -> BulkImportJob:
        """Submits one bulk import job with the list attached; returns the job as Klaviyo
        accepted it (id, status, created_at).

        Raises ValueError when the batch is empty or over MAX_PROFILES_PER_JOB / MAX_JOB_BYTES
        (use split_into_jobs first).
        """
        if not profiles:
            raise ValueError("a bulk import job needs at least one profile")
        if len(profiles) > MAX_PROFILES_PER_JOB:
            raise ValueError(f"{len(profiles)} profiles exceed {MAX_PROFILES_PER_JOB} per job")
        body = encode_body(bulk_import_body(profiles, list_id))
        if len(body) > MAX_JOB_BYTES:
            raise ValueError(f"the job body is {len(body)} bytes, over {MAX_JOB_BYTES}")
        endpoint = Endpoint.CREATE_BULK_IMPORT_JOB
        doc = self._json(self._request(endpoint, endpoint.path(), body=body))
        return _bulk_import_job(_dict_field(doc, "data", endpoint), endpoint)

    def get_bulk_import_job(self, job_id: str) -> BulkImportJob:
        endpoint = Endpoint.GET_BULK_IMPORT_JOB
        doc = self._json(self._request(endpoint, endpoint.path(job_id)))
        return _bulk_import_job(_dict_field(doc, "data", endpoint), endpoint)

    def iter_bulk_import_jobs(
        self,
        statuses: Sequence[JobStatus],
        *,
        newest_first: bool = False,
        before_page: Callable[[], bool] | None = None,
    ) -> Iterator[BulkImportJob]:
        """The account's jobs in these states, 100 a page (one request answers for 100 jobs),
        oldest first or (``newest_first``) newest first by ``created_at``.

        Klaviyo filters this list by ``status`` only (``any``/``equals``), not by id: a caller
        watching its own jobs lists them newest first and stops iterating (which stops paging)
        once it has passed the oldest job it watches. ``before_page`` is asked before each
        page's request: False ends the listing there.
        """
        if isinstance(statuses, str) or not statuses:
            raise ValueError("statuses must be a non-empty sequence of job states")
        endpoint = Endpoint.LIST_BULK_IMPORT_JOBS
        params = {"filter": any_filter("status", statuses), "page[size]": str(MAX_PAGE_SIZE)}
        if newest_first:
            params["sort"] = "-created_at"
        for item in self._paginate(endpoint, endpoint.path(), params, before_page):
            yield _bulk_import_job(item, endpoint)

    def iter_bulk_import_errors(self, job_id: str) -> Iterator[ImportErrorItem]:
        """Every per-profile error of a finished job, all pages."""
        endpoint = Endpoint.GET_BULK_IMPORT_ERRORS
        params = {"page[size]": str(MAX_PAGE_SIZE)}
        for item in self._paginate(endpoint, endpoint.path(job_id), params):
            attrs = obj(item, "attributes")
            source = obj(attrs, "source")
            payload = attrs.get("original_payload")
            pointer = source.get("pointer")
            yield ImportErrorItem(
                code=scrub(str(attrs.get("code") or ""), self._secret.reveal()),
                title=scrub(str(attrs.get("title") or ""), self._secret.reveal()),
                detail=scrub(str(attrs.get("detail") or ""), self._secret.reveal()),
                pointer=pointer if isinstance(pointer, str) else None,
                original_payload=payload if isinstance(payload, dict) else None,
            )

    def iter_bulk_import_profiles(self, job_id: str) -> Iterator[ImportedProfile]:
        """The profiles a finished job created or updated, with their ids (all pages)."""
        endpoint = Endpoint.GET_BULK_IMPORT_PROFILES
        params = {"page[size]": str(MAX_PAGE_SIZE), "fields[profile]": "email,external_id"}
        for item in self._paginate(endpoint, endpoint.path(job_id), params):
            yield _imported_profile(item, endpoint)

    def add_profiles_to_list(self, list_id: str, profile_ids: Sequence[str]) -> None:
        """Idempotent; subscribes nobody. At most MAX_IDS_PER_RELATIONSHIP_CALL ids."""
        self._relationship(Endpoint.ADD_LIST_PROFILES, list_id, profile_ids)

    def remove_profiles_from_list(self, list_id: str, profile_ids: Sequence[str]) -> None:
        """Idempotent; the profiles and their consent stay as they are."""
        self._relationship(Endpoint.REMOVE_LIST_PROFILES, list_id, profile_ids)

    def request_profile_deletion(
        self, *, profile_id: str | None = None, email: str | None = None
    ) -> None:
        """POST /api/data-privacy-deletion-jobs: Klaviyo deletes the profile (by id), or every
        profile with the email, asynchronously (202). Give exactly one of the two."""
        endpoint = Endpoint.REQUEST_PROFILE_DELETION
        body = encode_body(deletion_job_body(profile_id=profile_id, email=email))
        self._request(endpoint, endpoint.path(), body=body)

    def find_profile_ids(
        self, field: Literal["email", "external_id"], values: Sequence[str]
    ) -> dict[str, str]:
        """value -> profile id, for the values Klaviyo knows (every page of every chunk).

        Emails match case-insensitively (Klaviyo stores them lower-cased); the keys of the result
        are the values as given. Chunks of MAX_FILTER_VALUES values, MAX_PAGE_SIZE per page.
        """
        if field not in ("email", "external_id"):
            raise ValueError("field must be 'email' or 'external_id'")
        endpoint = Endpoint.GET_PROFILES
        return self._find_ids(endpoint, endpoint.path(), field, values)

    def find_list_profile_ids(self, list_id: str, emails: Sequence[str]) -> dict[str, str]:
        """email -> profile id, for the emails whose profile is on the list: one L-tier call per
        MAX_FILTER_VALUES emails (GET /api/lists/{id}/profiles filtered by email, which names
        each profile's email; the relationships read answers ids alone). Keys are the emails as
        given, matched case-insensitively. Klaviyo filters list members by email only, not by
        external_id."""
        endpoint = Endpoint.GET_LIST_MEMBERS
        return self._find_ids(endpoint, endpoint.path(list_id), "email", emails)

    def upsert_profile(self, profile: ProfileInput) -> str:
        """POST /api/profile-import: creates or updates one profile, returns its id."""
        endpoint = Endpoint.PROFILE_IMPORT
        body = encode_body(profile_import_body(profile))
        doc = self._json(self._request(endpoint, endpoint.path(), body=body))
        return _str_field(_dict_field(doc, "data", endpoint), "id", endpoint)

    def iter_list_profile_ids(self, list_id: str) -> Iterator[str]:
        """Every member of the list (ids), all pages; for reconciliation."""
        endpoint = Endpoint.GET_LIST_PROFILES
        params = {"page[size]": str(MAX_PAGE_SIZE)}
        for item in self._paginate(endpoint, endpoint.path(list_id), params):
            yield _str_field(item, "id", endpoint)

    def list_members_page(
        self, list_id: str, next_url: str | None = None
    ) -> tuple[list[ListMember], str | None]:
        """One page of the list read back (100 a page, L tier) with the identifiers the sync
        matches on and whether each profile's email is suppressed; and the next page's URL.

        One request per call, so a caller that is throttled can ask for the same page again."""
        endpoint = Endpoint.GET_LIST_MEMBERS
        if next_url is None:
            url: str = endpoint.path(list_id)
            params: dict[str, str] | None = {
                "page[size]": str(MAX_PAGE_SIZE),
                "fields[profile]": "email,external_id,subscriptions.email.marketing.suppression",
                # stays in the L tier (only predictive_analytics costs more)
                "additional-fields[profile]": "subscriptions",
            }
        else:
            url, params = self._same_origin(next_url, endpoint), None
        doc = self._json(self._request(endpoint, url, params=params))
        data = doc.get("data")
        if not isinstance(data, list):
            raise _malformed(endpoint, "data is not a list")
        members = [_list_member(item, endpoint) for item in data if isinstance(item, dict)]
        nxt = obj(doc, "links").get("next")
        if isinstance(nxt, str) and nxt:
            if nxt == next_url:
                raise _malformed(endpoint, "pagination repeats a page")
            return members, nxt
        return members, None

    def iter_list_members(self, list_id: str) -> Iterator[list[ListMember]]:
        """Every page of the list read back (see list_members_page)."""
        page, nxt = self.list_members_page(list_id)
        yield page
        while nxt is not None:
            page, nxt = self.list_members_page(list_id, nxt)
            yield page

    # -- plumbing ------------------------------------------------------------------------------

    def _find_ids(
        self, endpoint: Endpoint, path: str, field: str, values: Sequence[str]
    ) -> dict[str, str]:
        wanted: dict[str, list[str]] = {}
        for value in values:
            if value:
                wanted.setdefault(_identity_key(field, value), []).append(value)
        found: dict[str, str] = {}
        # Ask for the normalized email and, when it differs, the spelling given: both Klaviyo
        # behaviours (lower-cased storage, exact-match filter) then find the profile.
        distinct = list(
            dict.fromkeys(q for key, group in wanted.items() for q in (key, *group) if q)
        )
        for start in range(0, len(distinct), MAX_FILTER_VALUES):
            chunk = distinct[start : start + MAX_FILTER_VALUES]
            params = {
                "filter": any_filter(field, chunk),
                "page[size]": str(MAX_PAGE_SIZE),
                "fields[profile]": "email,external_id",
            }
            for item in self._paginate(endpoint, path, params):
                attrs = obj(item, "attributes")
                matched = attrs.get(field)
                pid = item.get("id")
                if not isinstance(matched, str) or not isinstance(pid, str):
                    continue
                for original in wanted.get(_identity_key(field, matched), ()):
                    found.setdefault(original, pid)
        return found

    def _relationship(self, endpoint: Endpoint, list_id: str, profile_ids: Sequence[str]) -> None:
        if isinstance(profile_ids, str):
            raise TypeError("profile_ids must be a sequence of ids, not one string")
        if len(profile_ids) > MAX_IDS_PER_RELATIONSHIP_CALL:
            raise ValueError(
                f"{len(profile_ids)} ids exceed {MAX_IDS_PER_RELATIONSHIP_CALL} per call"
            )
        if not profile_ids:
            return  # Klaviyo refuses an empty data array; nothing to do is not an error
        body = encode_body(relationship_body(profile_ids))
        self._request(endpoint, endpoint.path(list_id), body=body)

    def _request(
        self,
        endpoint: Endpoint,
        url: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> httpx.Response:
        if self._before_request is not None:
            self._before_request(endpoint)  # may raise: the caller's limiter aborts the call
        headers = {"content-type": JSONAPI} if body is not None else None
        response: httpx.Response | None = None
        failure: KlaviyoError | None = None
        try:
            response = self._http.request(
                endpoint.method, url, params=params, content=body, headers=headers
            )
        except httpx.TimeoutException as exc:
            failure = TransientError(self._transport_text(exc, "timed out"), endpoint=endpoint)
        except httpx.TransportError as exc:
            # connection refused/reset, a dropped connection, a truncated answer
            text = self._transport_text(exc, "connection failed")
            failure = TransientError(text, endpoint=endpoint)
        except httpx.HTTPError as exc:
            failure = KlaviyoError(self._transport_text(exc, "request failed"), endpoint=endpoint)
        if failure is not None or response is None:
            # Raised outside the except block: the httpx exception (its message and its request,
            # headers included) must not ride along as __context__.
            raise failure or KlaviyoError("no response", endpoint=endpoint)
        log.debug("%s -> %s", endpoint.value, response.status_code)
        if response.status_code != 429:
            limits = _rate_limit_headers(response.headers)
            self.last_rate_limit = limits
            if self._after_response is not None:
                self._after_response(endpoint, limits)
        if response.is_success:
            return response
        raise error_from_response(
            response.status_code,
            response.headers,
            response.content,
            endpoint=endpoint,
            secret=self._secret.reveal(),
        )

    def _paginate(
        self,
        endpoint: Endpoint,
        path: str,
        params: dict[str, str],
        before_page: Callable[[], bool] | None = None,
    ) -> Iterator[dict[str, Any]]:
        url: str = path
        query: dict[str, str] | None = params
        seen: set[str] = set()
        while True:
            if before_page is not None and not before_page():
                return
            doc = self._json(self._request(endpoint, url, params=query))
            data = doc.get("data")
            if not isinstance(data, list):
                raise _malformed(endpoint, "data is not a list")
            for item in data:
                if isinstance(item, dict):
                    yield item
            links = obj(doc, "links")
            nxt = links.get("next")
            if not isinstance(nxt, str) or not nxt:
                return
            if nxt in seen:
                raise _malformed(endpoint, "pagination repeats a page")
            seen.add(nxt)
            url, query = self._same_origin(nxt, endpoint), None

    def _same_origin(self, link: str, endpoint: Endpoint) -> str:
        # links.next is a full URL; following it to another host would hand that host our key.
        target = self._http.base_url.join(link)
        base = self._http.base_url
        if (target.scheme, target.host, target.port) != (base.scheme, base.host, base.port):
            raise UnexpectedStatus(
                f"pagination link points to another host ({target.host}); not followed",
                endpoint=endpoint,
            )
        return str(target)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        doc: Any = None
        # raised below, not inside a handler: the decode error (as __context__) holds the body
        with contextlib.suppress(ValueError):
            doc = response.json()
        if doc is None:
            raise TransientError(
                f"HTTP {response.status_code} with a body that is not JSON",
                status=response.status_code,
            )
        if not isinstance(doc, dict):
            raise TransientError("the response is not a JSON object", status=response.status_code)
        return doc

    def _transport_text(self, exc: Exception, what: str) -> str:
        return scrub(f"{what}: {type(exc).__name__}: {exc}", self._secret.reveal())


def _rate_limit_headers(headers: httpx.Headers) -> RateLimitHeaders:
    return RateLimitHeaders(
        limit=_header_int(headers.get("ratelimit-limit")),
        remaining=_header_int(headers.get("ratelimit-remaining")),
        reset=_header_float(headers.get("ratelimit-reset")),
    )


def _header_int(value: str | None) -> int | None:
    # "750" or a structured variant such as "750, 750;w=60": the leading number is the limit
    match = _LEADING_INT.match(value) if value else None
    return int(match.group(1)) if match else None


def _header_float(value: str | None) -> float | None:
    match = _LEADING_NUMBER.match(value) if value else None
    return float(match.group(1)) if match else None


def _identity_key(field: str, value: str) -> str:
    return value.strip().lower() if field == "email" else value


def _imported_profile(item: dict[str, Any], endpoint: Endpoint) -> ImportedProfile:
    attrs = obj(item, "attributes")
    email, ext = attrs.get("email"), attrs.get("external_id")
    return ImportedProfile(
        id=_str_field(item, "id", endpoint),
        email=email if isinstance(email, str) else None,
        external_id=ext if isinstance(ext, str) else None,
    )


def _list_member(item: dict[str, Any], endpoint: Endpoint) -> ListMember:
    attrs = obj(item, "attributes")
    email, ext = attrs.get("email"), attrs.get("external_id")
    marketing = obj(obj(obj(attrs, "subscriptions"), "email"), "marketing")
    suppression = marketing.get("suppression")
    return ListMember(
        id=_str_field(item, "id", endpoint),
        email=email if isinstance(email, str) else None,
        external_id=ext if isinstance(ext, str) else None,
        suppressed=isinstance(suppression, list) and bool(suppression),
    )


def _klaviyo_list(data: dict[str, Any], endpoint: Endpoint) -> KlaviyoList:
    attrs = obj(data, "attributes")
    name, opt_in, count = attrs.get("name"), attrs.get("opt_in_process"), attrs.get("profile_count")
    return KlaviyoList(
        id=_str_field(data, "id", endpoint),
        name=name if isinstance(name, str) else "",
        opt_in_process=opt_in if isinstance(opt_in, str) else None,
        profile_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
    )


def _bulk_import_job(data: dict[str, Any], endpoint: Endpoint) -> BulkImportJob:
    attrs = _dict_field(data, "attributes", endpoint)
    return BulkImportJob(
        id=_str_field(data, "id", endpoint),
        status=_str_field(attrs, "status", endpoint),
        total_count=_int(attrs.get("total_count")),
        completed_count=_int(attrs.get("completed_count")),
        failed_count=_int(attrs.get("failed_count")),
        expires_at=_datetime(attrs.get("expires_at")),
        created_at=_datetime(attrs.get("created_at")),
        completed_at=_datetime(attrs.get("completed_at")),
    )


def _malformed(endpoint: Endpoint, what: str) -> TransientError:
    return TransientError(f"unexpected response shape: {what}", endpoint=endpoint)


def _dict_field(doc: dict[str, Any], name: str, endpoint: Endpoint) -> dict[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise _malformed(endpoint, f"{name} is not an object")
    return value


def _str_field(doc: dict[str, Any], name: str, endpoint: Endpoint) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise _malformed(endpoint, f"{name} is missing")
    return value


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
