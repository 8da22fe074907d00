"""Pure pieces: job splitting, filters, Retry-After, error classification, value objects."""

from __future__ import annotations

import json

import pytest

from segops_sync.klaviyo import (
    MAX_JOB_BYTES,
    ApiErrorItem,
    Conflict,
    CredentialsRejected,
    Endpoint,
    InvalidRequest,
    KlaviyoError,
    NotFound,
    PermissionDenied,
    ProfileInput,
    RateLimited,
    TransientError,
    UnexpectedStatus,
    parse_retry_after,
    split_into_jobs,
)
from segops_sync.klaviyo.errors import error_from_response
from segops_sync.klaviyo.payloads import (
    LIST_ID_RESERVE,
    any_filter,
    bulk_import_body,
    encode_body,
    profile_import_body,
)
from segops_sync.klaviyo_sim.filters import parse_filter

# -- encode_body ---------------------------------------------------------------------------------


def _stdlib_compact(body: dict[str, object]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@pytest.mark.parametrize(
    "properties",
    [
        {"city": "Zürich", "score": 1.5e16, "tags": ["a", "\u2028"], "nested": {"n": None}},
        {"huge": 2**70},  # beyond orjson's 64-bit integers: the standard library writes it
        {"negative": -(2**63), "zero": 0.0, "quote": 'say "hi"\\'},
    ],
)
def test_encoded_bodies_are_the_standard_librarys_compact_bytes(
    properties: dict[str, object],
) -> None:
    """The byte limits are measured on encode_body's output: it must be exactly the compact
    UTF-8 JSON the limits were written for, whichever encoder wrote it."""
    profile = ProfileInput(email="é@example.com", external_id="x1", properties=properties)
    body = bulk_import_body([profile], "AbC123")
    assert encode_body(body) == _stdlib_compact(body)
    assert json.loads(encode_body(body)) == body


def test_a_lone_surrogate_cannot_be_encoded() -> None:
    with pytest.raises(UnicodeEncodeError):
        encode_body(profile_import_body(ProfileInput(email="a@example.com", external_id="\ud800")))


# -- split_into_jobs -----------------------------------------------------------------------------


def _size(chunk: list[ProfileInput], list_id: str) -> int:
    return len(encode_body(bulk_import_body(chunk, list_id)))


@pytest.mark.parametrize("max_bytes", [300, 1_000, 4_321])
def test_chunks_fit_exactly_and_are_as_large_as_possible(max_bytes: int) -> None:
    profiles = [
        ProfileInput(email=f"{i}@example.com", external_id="é" * (i % 7)) for i in range(60)
    ]
    chunks = split_into_jobs(profiles, max_profiles=10, max_bytes=max_bytes, list_id="AbC123")
    assert [p for c in chunks for p in c] == profiles  # order kept, nothing lost
    for i, chunk in enumerate(chunks):
        assert len(chunk) <= 10
        assert _size(chunk, "AbC123") <= max_bytes  # measured on the real serialized body
        if i + 1 < len(chunks) and len(chunk) < 10:
            # greedy: the next profile would not have fitted
            assert _size([*chunk, chunks[i + 1][0]], "AbC123") > max_bytes


def test_without_a_list_id_the_envelope_is_budgeted_for_any_list() -> None:
    profiles = [ProfileInput(email=f"{i}@example.com") for i in range(100)]
    chunks = split_into_jobs(profiles, max_bytes=1_500)
    for chunk in chunks:
        assert _size(chunk, "x" * LIST_ID_RESERVE) <= 1_500


def test_count_limit() -> None:
    profiles = [ProfileInput(external_id=str(i)) for i in range(25)]
    assert [len(c) for c in split_into_jobs(profiles, max_profiles=10)] == [10, 10, 5]
    assert split_into_jobs([]) == []


def test_a_profile_too_big_for_any_job_is_an_error() -> None:
    with pytest.raises(ValueError):
        split_into_jobs([ProfileInput(external_id="x" * 500)], max_bytes=400)


def test_default_limits_are_klaviyos() -> None:
    assert MAX_JOB_BYTES == 5 * 1024 * 1024


# -- bodies --------------------------------------------------------------------------------------


def test_absent_identifiers_are_omitted_not_null() -> None:
    assert profile_import_body(ProfileInput(external_id="u")) == {
        "data": {"type": "profile", "attributes": {"external_id": "u"}}
    }


def test_profile_input_needs_an_identifier() -> None:
    with pytest.raises(ValueError):
        ProfileInput()
    with pytest.raises(ValueError):
        ProfileInput(email="", external_id="")
    with pytest.raises(ValueError):
        ProfileInput.identified(None, "")


@pytest.mark.parametrize(
    ("email", "external_id"), [("a@example.com", None), (None, "cust-1"), ("b@x.io", "c-2")]
)
def test_an_identified_profile_is_the_same_profile_as_one_built_by_its_fields(
    email: str | None, external_id: str | None
) -> None:
    quick = ProfileInput.identified(email, external_id)
    built = ProfileInput(email=email, external_id=external_id)
    assert quick == built and repr(quick) == repr(built)
    assert encode_body(profile_import_body(quick)) == encode_body(profile_import_body(built))


@pytest.mark.parametrize(
    "values",
    [
        ["plain@example.com"],
        ['quo"te@example.com', "back\\slash", "comma,and]bracket", "it's", "ünïcødé"],
        [")", "(", "[", "]", ""],
    ],
)
def test_filter_values_survive_quoting(values: list[str]) -> None:
    parsed = parse_filter(any_filter("email", values))
    assert (parsed.op, parsed.field, list(parsed.values)) == ("any", "email", values)


# -- Retry-After and rounding --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("3", 3.0),
        ("0.35", 0.35),
        (" 12 ", 12.0),
        ("-4", 0.0),
        ("soon", None),
        (None, None),
        ("nan", None),
    ],
)
def test_parse_retry_after(raw: str | None, seconds: float | None) -> None:
    assert parse_retry_after(raw) == seconds


def test_parse_retry_after_http_date() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0


# -- error classification ------------------------------------------------------------------------

JSONAPI = {"content-type": "application/vnd.api+json"}


def _body(*pointers: str, detail: str = "Invalid input.") -> bytes:
    import json

    return json.dumps(
        {
            "errors": [
                {
                    "id": "1",
                    "code": "invalid",
                    "title": "Invalid input.",
                    "detail": detail,
                    "source": {"pointer": p},
                }
                for p in pointers
            ]
        }
    ).encode()


@pytest.mark.parametrize(
    ("status", "headers", "body", "cls", "permanent"),
    [
        (400, JSONAPI, _body("/data"), InvalidRequest, True),
        (
            400,
            JSONAPI,
            _body("/data", detail="Missing or invalid private API key."),
            CredentialsRejected,
            True,
        ),
        (401, JSONAPI, _body("/data"), CredentialsRejected, True),
        (403, JSONAPI, _body("/data"), PermissionDenied, True),
        (
            403,
            {"content-type": "text/html", "cf-mitigated": "challenge"},
            b"<html>",
            TransientError,
            False,
        ),
        (403, {"content-type": "text/html"}, b"<html>", TransientError, False),
        (404, JSONAPI, _body("/data"), NotFound, True),
        (409, JSONAPI, _body("/data"), Conflict, True),
        (415, JSONAPI, _body("/data"), InvalidRequest, True),
        (422, JSONAPI, _body("/data"), InvalidRequest, True),
        (429, {**JSONAPI, "retry-after": "7"}, _body("/data"), RateLimited, False),
        (500, {}, b"", TransientError, False),
        (502, {"content-type": "text/html"}, b"<html>bad gateway</html>", TransientError, False),
        (503, JSONAPI, _body("/data"), TransientError, False),
        (410, JSONAPI, _body("/data"), UnexpectedStatus, True),
    ],
)
def test_error_classification(
    status: int, headers: dict[str, str], body: bytes, cls: type[KlaviyoError], permanent: bool
) -> None:
    error = error_from_response(status, headers, body, endpoint=Endpoint.GET_LIST, secret=None)
    assert type(error) is cls
    assert error.permanent is permanent
    assert error.status == status
    if isinstance(error, RateLimited):
        assert error.retry_after == 7.0


def test_profile_indexes_from_pointers() -> None:
    error = error_from_response(
        400,
        JSONAPI,
        _body(
            "/data/attributes/profiles/data/3/attributes/email",
            "/data/attributes/profiles/data/12",
            "/data/7",
            "/data/8/id",
            "/data/",
            "/data/attributes/profiles",
        ),
        endpoint=None,
        secret=None,
    )
    assert isinstance(error, InvalidRequest)
    assert error.profile_indexes() == {3, 12, 7, 8}


def test_conflict_exposes_the_duplicate() -> None:
    error = Conflict(
        "dup",
        status=409,
        errors=[
            ApiErrorItem(
                "duplicate_profile", "Conflict.", "dup", meta={"duplicate_profile_id": "01X"}
            )
        ],
    )
    assert error.duplicate_profile_id == "01X"


def test_error_text_is_for_people() -> None:
    error = error_from_response(
        404,
        JSONAPI,
        _body("/data", detail="A list with id X does not exist."),
        endpoint=None,
        secret=None,
    )
    assert str(error) == (
        "Klaviyo does not know this resource (HTTP 404): A list with id X does not exist. [/data]"
    )


def test_default_timeouts_and_repr() -> None:
    from segops_sync.klaviyo import KlaviyoClient

    key = "pk_" + "r" * 34
    with KlaviyoClient(key) as client:
        timeout = client._http.timeout
        assert (timeout.connect, timeout.read) == (5.0, 30.0)
        assert key not in repr(client) and repr(client).endswith("api_key='pk_…rrrr')")
        assert client.base_url == "https://a.klaviyo.com"
