"""The error table: one row per kind of Klaviyo failure, no database, no HTTP."""

from __future__ import annotations

import pytest

from segops_sync.klaviyo import (
    ApiErrorItem,
    Conflict,
    CredentialsRejected,
    Endpoint,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    TransientError,
    UnexpectedStatus,
)
from segops_sync.sync.fleet.access import Throttled
from segops_sync.sync.outcomes import MEMBER_PLACEHOLDER, Action, decide, rejection_reason


def _pointer(index: int, detail: str = "Invalid email") -> ApiErrorItem:
    return ApiErrorItem(
        code="invalid",
        title="Invalid input.",
        detail=detail,
        pointer=f"/data/attributes/profiles/data/{index}/attributes/email",
    )


def test_our_limiter_and_a_429_wait_without_counting_as_failures() -> None:
    assert decide(Throttled(1.5, "GET /api/profiles"), list_id="AbC123").wait == 1.5
    waited = decide(RateLimited("slow down", retry_after=7.0), list_id="AbC123")
    assert (waited.action, waited.wait) == (Action.WAIT, 7.0)
    # No Retry-After: the caller backs off exponentially.
    assert decide(RateLimited("slow down"), list_id="AbC123").wait is None


def test_transient_failures_retry_within_the_budget() -> None:
    decision = decide(TransientError("502 from upstream", status=502), list_id="AbC123")
    assert (decision.action, decision.message) == (Action.RETRY, "502 from upstream")


def test_a_transient_failure_keeps_no_members_data() -> None:
    """Its words become the run's error once the retries run out."""
    quoted = ApiErrorItem(
        code="server_error", title="Server error.", detail="while reading ann@x.example"
    )
    lookup = TransientError(
        "while reading ann@x.example", status=503, endpoint=Endpoint.GET_PROFILES, errors=(quoted,)
    )
    assert decide(lookup, list_id="AbC123").message == "HTTP 503: server_error Server error."
    blank = ApiErrorItem(code="", title="", detail="ann@x.example")
    bare = TransientError("x", status=503, endpoint=Endpoint.GET_PROFILES, errors=(blank,))
    assert decide(bare, list_id="AbC123").message == "HTTP 503"
    elsewhere = TransientError("reset after ann@x.example, +14155552671", status=503)
    message = decide(elsewhere, list_id="AbC123").message or ""
    assert "ann@x.example" not in message and "+14155552671" not in message
    assert message.startswith("reset after ")


def test_a_missing_scope_keeps_klaviyos_words_but_no_members_data() -> None:
    refused = PermissionDenied("missing scope lists:write for ann@x.example", status=403)
    message = decide(refused, list_id="AbC123").message or ""
    assert "lists:write" in message and "ann@x.example" not in message


def test_a_status_without_a_class_follows_the_taxonomys_permanent_flag() -> None:
    decision = decide(UnexpectedStatus("gone", status=410), list_id="AbC123")
    assert (decision.action, decision.message) == (Action.FAIL_RUN, "Klaviyo error 410: gone")


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (CredentialsRejected("bad key", status=401), "invalid or was revoked"),
        (PermissionDenied("missing scope lists:write", status=403), "lists:write"),
        (NotFound("no such list", status=404), "no list with id 'AbC123'"),
    ],
)
def test_what_only_a_person_can_fix_fails_the_run_with_what_to_do(
    error: Exception, says: str
) -> None:
    decision = decide(error, list_id="AbC123")
    assert decision.action is Action.FAIL_RUN
    assert says in decision.message


def test_a_request_that_names_members_rejects_just_them_with_klaviyos_reasons() -> None:
    error = InvalidRequest(
        "bad profiles",
        status=400,
        errors=[_pointer(3), _pointer(3, "second error, same member"), _pointer(7, "Too long")],
    )
    decision = decide(error, list_id="AbC123")
    assert decision.action is Action.REJECT_MEMBERS
    assert decision.members == {3: "Invalid input.: Invalid email", 7: "Invalid input.: Too long"}
    relationship = Conflict(
        "stale ids", status=409, errors=[ApiErrorItem("x", "", "gone", pointer="/data/2/id")]
    )
    assert decide(relationship, list_id="AbC123").members == {2: "gone"}


def test_a_refused_request_that_names_nobody_fails_the_run() -> None:
    error = InvalidRequest("malformed body", status=400, errors=[ApiErrorItem("x", "", "bad")])
    decision = decide(error, list_id="AbC123")
    assert decision.action is Action.FAIL_RUN
    assert decision.message == "Klaviyo refused the request: malformed body"


def test_a_refused_request_that_carried_members_keeps_none_of_klaviyos_detail() -> None:
    """The message outlives a forget (run error, last_error, alerts): a lookup's filter or an
    import's body held members' identifiers, which Klaviyo's detail may quote."""
    lookup = InvalidRequest(
        "Invalid filter: 'ada,l@example.com' or 'user-7f3a' is not valid",
        status=400,
        endpoint=Endpoint.GET_PROFILES,
        errors=[ApiErrorItem("invalid", "Invalid input.", "'user-7f3a' …", parameter="filter")],
    )
    message = decide(lookup, list_id="AbC123").message
    assert message == (
        "Klaviyo refused GET /api/profiles (HTTP 400: invalid Invalid input. at filter); its "
        "detail is not kept, since it may quote a member's data"
    )
    # a request without members' identifiers keeps its detail, any email or phone in it masked
    write = InvalidRequest(
        "list full; ask ops@example.com or +1 555 010 0199", status=400, endpoint=Endpoint.GET_LIST
    )
    said = decide(write, list_id="AbC123").message
    assert said.startswith("Klaviyo refused the request: list full; ask ")
    assert "ops@example.com" not in said and "555" not in said
    # a status the table has no class for, on a request that carried members: no detail either
    odd = UnexpectedStatus("'ada,l@example.com' gone", status=410, endpoint=Endpoint.PROFILE_IMPORT)
    assert "ada" not in decide(odd, list_id="AbC123").message


def test_anything_that_is_not_a_klaviyo_failure_is_not_the_tables_business() -> None:
    with pytest.raises(TypeError):
        decide(ValueError("a bug"), list_id="AbC123")


def test_a_rejection_reason_never_keeps_the_members_identifiers() -> None:
    """Klaviyo may quote the value it refused; the reason outlives a forget of the member (in a
    run's error and the connector's last_error), so the member's identifiers are taken out."""
    reason = rejection_reason(
        "Invalid input.",
        "'Ada.Lovelace@Example.com' is not a valid email; ada.lovelace is taken; call +15550100",
        ("user-17", "ada.lovelace@example.com", "ada.lovelace", "+15550100", None, ""),
    )
    assert reason == (
        f"Invalid input.: '{MEMBER_PLACEHOLDER}' is not a valid email; {MEMBER_PLACEHOLDER} is "
        f"taken; call {MEMBER_PLACEHOLDER}"
    )
    # nothing of the member in it: the reason is Klaviyo's words as they were
    assert rejection_reason(None, "Invalid email address.", ("x@y.io",)) == "Invalid email address."
    # one- and two-character identifiers would blank out ordinary words: left alone
    assert rejection_reason("Bad", "an id", ("an", "a")) == "Bad: an id"
    # whole values only: "ada" is not taken out of "adam" or "canada", but is at a sentence end
    assert rejection_reason(None, "adam in canada; ada.", ("ada",)) == (
        f"adam in canada; {MEMBER_PLACEHOLDER}."
    )
    # one pass: an identifier that is a word of the placeholder does not eat it afterwards
    assert rejection_reason(None, "bad: x@y.io", ("x@y.io", "member", "identifier")) == (
        f"bad: {MEMBER_PLACEHOLDER}"
    )


def test_a_rejection_reason_keeps_no_trait_value_sent_and_no_other_email() -> None:
    from segops_sync.klaviyo import ProfileInput
    from segops_sync.sync.direct import member_problem

    profile = ProfileInput(
        email="ada@example.com",
        external_id="cust-1",
        fields={"first_name": "Augusta", "organization": "Analytical Engines"},
        properties={
            "plan": "enterprise",
            "notes": {"nickname": "Countess"},
            "tags": ["Q7"],
            "zip": 90210,
            "channel": "email",
        },
    )
    refused = InvalidRequest(
        "x",
        status=400,
        errors=(
            ApiErrorItem(
                code="invalid",
                title="Invalid input.",
                detail="'Augusta' of Analytical Engines (Countess, enterprise, 90210) like "
                "bob@b.io, for ada@example.com; Invalid email address",
                pointer="/data/attributes/first_name",
            ),
        ),
    )
    reason = member_problem(refused, "u-1", profile) or ""
    for value in ("Augusta", "Analytical Engines", "Countess", "enterprise", "90210", "bob@b.io"):
        assert value not in reason, reason
    # a trait value is a value sent, the member's email its identifier; an identifier wins
    # where a trait repeats it ("email" the channel is one word of Klaviyo's own, too)
    assert reason == (
        "Invalid input.: '<a value sent>' of <a value sent> (<a value sent>, <a value sent>, "
        "<a value sent>) like [redacted], for <the member's identifier>; Invalid <a value sent> "
        "address"
    )
