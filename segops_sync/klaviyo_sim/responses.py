"""JSON:API answers as Klaviyo writes them (documents, errors, page links) and the query
parameters collections share (page[size], page[cursor], filter)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from segops_sync.klaviyo_sim.filters import FilterError, parse_filter
from segops_sync.klaviyo_sim.state import JSONAPI, Ctx, Reject, SimHttpResponse

MAX_FILTER_VALUES = 100  # choice: third-party clients use 100; Klaviyo documents no maximum
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


def page_size(ctx: Ctx) -> int:
    raw = ctx.query.get("page[size]")
    if raw is None:
        return 20
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 1 <= size <= 100:
        raise Reject(
            error_response(
                400, detail="page[size] must be an integer from 1 to 100.", parameter="page[size]"
            )
        )
    return size


def cursor_int(ctx: Ctx) -> int:
    raw = ctx.query.get("page[cursor]")
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise Reject(
            error_response(400, detail="Invalid page cursor.", parameter="page[cursor]")
        ) from None


def query_filter(ctx: Ctx, fields: set[str]) -> Any:
    try:
        filt = parse_filter(ctx.query["filter"])
    except FilterError as exc:
        raise Reject(
            error_response(400, detail=f"Invalid filter provided: {exc}.", parameter="filter")
        ) from None
    if filt.field not in fields:
        raise Reject(
            error_response(
                400, detail=f"Filtering on '{filt.field}' is not supported.", parameter="filter"
            )
        )
    if len(filt.values) > MAX_FILTER_VALUES:
        raise Reject(
            error_response(
                400,
                detail=f"At most {MAX_FILTER_VALUES} values may be given to 'any'.",
                parameter="filter",
            )
        )
    return filt


def self_link(ctx: Ctx) -> str:
    query = urlencode(list(ctx.req.query))
    return f"{ctx.req.base_url}{ctx.path}" + (f"?{query}" if query else "")


def page_links(ctx: Ctx, next_cursor: str | None) -> dict[str, str]:
    links = {"self": self_link(ctx)}
    if next_cursor is not None:
        query = [(k, v) for k, v in ctx.req.query if k != "page[cursor]"]
        query.append(("page[cursor]", next_cursor))
        links["next"] = f"{ctx.req.base_url}{ctx.path}?{urlencode(query)}"
    return links


def iso(value: datetime) -> str:
    return value.isoformat()


def ok_response(doc: Any, status: int = 200) -> SimHttpResponse:
    return SimHttpResponse(status, {"content-type": JSONAPI}, json.dumps(doc).encode())


def error_item(
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


def errors_response(status: int, items: list[dict[str, Any]]) -> SimHttpResponse:
    return SimHttpResponse(
        status, {"content-type": JSONAPI}, json.dumps({"errors": items}).encode()
    )


def error_response(
    status: int,
    *,
    title: str | None = None,
    detail: str | None = None,
    pointer: str | None = None,
    parameter: str | None = None,
) -> SimHttpResponse:
    return errors_response(
        status,
        [error_item(status, title=title, detail=detail, pointer=pointer, parameter=parameter)],
    )


def challenge_response() -> SimHttpResponse:
    return SimHttpResponse(
        403,
        {"content-type": "text/html; charset=UTF-8", "cf-mitigated": "challenge"},
        _CHALLENGE_HTML,
    )
