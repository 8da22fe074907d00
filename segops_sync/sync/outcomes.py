"""What the product does with each Klaviyo failure, decided in one table.

The ``klaviyo/`` errors are facts (what Klaviyo answered); this module decides. Read ``RULES``
top to bottom: the first row whose error class matches wins.

| failure                               | action          | why                                    |
| ------------------------------------- | --------------- | -------------------------------------- |
| our limiter has no token (Throttled)  | wait            | not an error: the budget refills       |
| 429 RateLimited                       | wait            | Retry-After, else exponential backoff  |
| 5xx, timeout, dropped connection      | retry           | counts against the batch's budget      |
| 401 CredentialsRejected               | fail the run    | a person must replace the key          |
| 403 PermissionDenied                  | fail the run    | a person must grant the scopes         |
| 404 NotFound                          | fail the run    | a person must fix the list id          |
| 400/409/422 naming members            | reject members  | drop those members, send the others    |
| 400/409/422 naming nobody             | fail the run    | the request itself is wrong            |
| anything else                         | by its flag     | ``permanent`` fails, else retry        |
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from segops_sync.klaviyo import (
    ApiErrorItem,
    CredentialsRejected,
    Endpoint,
    InvalidRequest,
    KlaviyoError,
    NotFound,
    PermissionDenied,
    ProfileInput,
    RateLimited,
    TransientError,
)
from segops_sync.observability.logging import mask_member_data
from segops_sync.sync.fleet.access import Throttled


class Action(StrEnum):
    WAIT = "wait"  # come back later; not a failure
    RETRY = "retry"  # transient: exponential backoff within the batch's budget
    REJECT_MEMBERS = "reject-members"  # Klaviyo named the members it refused
    FAIL_RUN = "fail-run"  # only a person can fix it


@dataclass(frozen=True)
class Decision:
    action: Action
    # FAIL_RUN: what a person must fix; RETRY: what went wrong (both without the key).
    message: str = ""
    # WAIT: seconds Klaviyo or the limiter asked for (None: back off exponentially).
    wait: float | None = None
    # REJECT_MEMBERS: index of each refused member in the body that was sent -> Klaviyo's reason.
    members: dict[int, str] = field(default_factory=dict)


def _bad_key(exc: BaseException, list_id: str) -> str:
    return (
        "Klaviyo rejected the API key (401): it is invalid or was revoked; "
        "create a private key with Lists and Profiles read/write and update the connector"
    )


def _missing_scope(exc: BaseException, list_id: str) -> str:
    # Klaviyo names the scope; the words still go through the mask, as every kept message does.
    detail = mask_member_data(exc.detail if isinstance(exc, KlaviyoError) else str(exc))
    return (
        f"Klaviyo refused the API key (403: {detail}): the key was revoked or lacks a scope; "
        "it needs Lists read/write and Profiles read/write"
    )


def _unknown_list(exc: BaseException, list_id: str) -> str:
    return (
        f"Klaviyo has no list with id {list_id!r} in this account (404); list ids are "
        "case-sensitive and exactly 6 characters: copy it from klaviyo.com/list/<ID>/"
    )


# Requests whose body or filter carries members' identifiers (profile ids included, which a
# forget counts as the member's): when Klaviyo refuses one whole, its detail may quote one (a
# malformed email in a lookup's filter, say).
CARRIES_MEMBERS = frozenset(
    {
        Endpoint.ADD_LIST_PROFILES,
        Endpoint.REMOVE_LIST_PROFILES,
        Endpoint.GET_LIST_PROFILES,
        Endpoint.GET_LIST_MEMBERS,
        Endpoint.GET_PROFILES,
        Endpoint.PROFILE_IMPORT,
        Endpoint.CREATE_BULK_IMPORT_JOB,
        Endpoint.REQUEST_PROFILE_DELETION,
    }
)


def _refused(exc: BaseException, list_id: str) -> str:
    """A refused request that names no member. The message ends in a run's error, the
    connector's last_error and alerts, which outlive a forget: Klaviyo's detail is left out
    where the request carried members, and its emails and phone numbers masked elsewhere."""
    if not isinstance(exc, KlaviyoError):
        return f"Klaviyo refused the request: {mask_member_data(str(exc))}"
    if exc.endpoint in CARRIES_MEMBERS:
        return (
            f"Klaviyo refused {exc.endpoint} ({_status_and_codes(exc, 'refused')}); its "
            "detail is not kept, since it may quote a member's data"
        )
    return f"Klaviyo refused the request: {mask_member_data(exc.detail)}"


def _passing(exc: BaseException) -> str:
    """What a transient failure said. It becomes the run's error when the retries run out, so
    it is kept as _refused keeps a refusal: Klaviyo's status, code and title where the request
    carried members, emails and phone numbers masked elsewhere (a transport error's text
    included)."""
    if isinstance(exc, KlaviyoError) and exc.endpoint in CARRIES_MEMBERS and exc.errors:
        return _status_and_codes(exc, "failed")
    return mask_member_data(exc.detail if isinstance(exc, KlaviyoError) else str(exc))


def _status_and_codes(exc: KlaviyoError, without_status: str) -> str:
    """``HTTP 400: invalid Invalid input. at /data/...``: what Klaviyo said, none of it a
    member's value (blank items left out)."""
    said = "; ".join(dict.fromkeys(c for c in map(_code_and_place, exc.errors) if c))
    status = f"HTTP {exc.status}" if exc.status is not None else without_status
    return f"{status}: {said}" if said else status


def _code_and_place(error: ApiErrorItem) -> str:
    """Klaviyo's code and title, and what it pointed at (a JSON pointer or a parameter name),
    which hold no member's value."""
    place = error.pointer or error.parameter
    return " ".join(x for x in (error.code, error.title) if x) + (f" at {place}" if place else "")


Describe = Callable[[BaseException, str], str]


@dataclass(frozen=True)
class Rule:
    error: type[BaseException]
    action: Action
    describe: Describe | None = None


RULES: tuple[Rule, ...] = (
    Rule(Throttled, Action.WAIT),
    Rule(RateLimited, Action.WAIT),
    Rule(TransientError, Action.RETRY),
    Rule(CredentialsRejected, Action.FAIL_RUN, _bad_key),
    Rule(PermissionDenied, Action.FAIL_RUN, _missing_scope),
    Rule(NotFound, Action.FAIL_RUN, _unknown_list),
    Rule(InvalidRequest, Action.REJECT_MEMBERS, _refused),
)


def decide(exc: BaseException, *, list_id: str) -> Decision:
    """The one place that turns a failure into what happens next."""
    for rule in RULES:
        if isinstance(exc, rule.error):
            return _apply(rule, exc, list_id)
    if isinstance(exc, KlaviyoError):  # a status the taxonomy has no class for
        if exc.endpoint in CARRIES_MEMBERS and exc.permanent:
            return Decision(Action.FAIL_RUN, _refused(exc, list_id))
        if exc.permanent:
            return Decision(
                Action.FAIL_RUN, f"Klaviyo error {exc.status}: {mask_member_data(exc.detail)}"
            )
        return Decision(Action.RETRY, _passing(exc))
    raise TypeError(f"not a Klaviyo failure: {type(exc).__name__}")


def _apply(rule: Rule, exc: BaseException, list_id: str) -> Decision:
    if rule.action is Action.WAIT:
        if isinstance(exc, Throttled):
            return Decision(Action.WAIT, f"throttled on {exc.endpoint}", wait=exc.wait)
        assert isinstance(exc, RateLimited)
        return Decision(Action.WAIT, "429 from Klaviyo", wait=exc.retry_after)
    if rule.action is Action.RETRY:
        return Decision(Action.RETRY, _passing(exc))
    assert rule.describe is not None
    message = rule.describe(exc, list_id)
    if rule.action is Action.REJECT_MEMBERS:
        assert isinstance(exc, InvalidRequest)
        members = exc.reasons_by_index()
        if not members:  # it names nobody: the request itself is wrong
            return Decision(Action.FAIL_RUN, message)
        return Decision(Action.REJECT_MEMBERS, message, members=members)
    return Decision(rule.action, message)


def describe_for_person(exc: KlaviyoError, list_id: str) -> str:
    """The one-line message a person sees for a failure that stops a run (never with the key)."""
    decision = decide(exc, list_id=list_id)
    return decision.message or f"Klaviyo error: {exc.detail}"


MEMBER_PLACEHOLDER = "<the member's identifier>"
SENT_PLACEHOLDER = "<a value sent>"


def rejection_reason(
    title: str | None, detail: str, identifiers: Iterable[object], sent: Iterable[object] = ()
) -> str:
    """Klaviyo's words for a rejected member, without the member's own values: its identifiers
    (user id, email, external id) become MEMBER_PLACEHOLDER, any other value sent of it (its
    traits: see member_values) SENT_PLACEHOLDER. Reasons are summed up in a run's error and
    the connector's ``last_error``, which outlive a forget of the member, and Klaviyo may quote
    a bad value. Any other email or phone number is masked as in a log."""
    reason = f"{title}: {detail}" if title else detail
    folded = reason.casefold()

    def quoted(values: Iterable[object]) -> set[str]:
        # only what the reason quotes: a member's traits may be thousands of values
        return {
            v.strip()
            for v in values
            if isinstance(v, str) and len(v.strip()) >= 3 and v.strip().casefold() in folded
        }

    placeholder = {v.casefold(): SENT_PLACEHOLDER for v in quoted(sent)}
    placeholder |= {v.casefold(): MEMBER_PLACEHOLDER for v in quoted(identifiers)}
    if placeholder:
        # One pass, longest first (an email before its local part), so a placeholder is never
        # searched again; whole values only (not "ada" inside "adam"), whatever the case.
        either = "|".join(re.escape(v) for v in sorted(placeholder, key=len, reverse=True))
        reason = re.sub(
            rf"(?<!\w)(?:{either})(?!\w)",
            lambda m: placeholder.get(m.group(0).casefold(), MEMBER_PLACEHOLDER),
            reason,
            flags=re.IGNORECASE,
        )
    return mask_member_data(reason)


def profile_rejection_reason(
    title: str | None, detail: str, user_id: str, profile: ProfileInput
) -> str:
    """rejection_reason for a member refused with the profile we sent of it."""
    identifiers = (user_id, profile.email, profile.external_id)
    return rejection_reason(
        title, detail, identifiers, member_values(profile.fields, profile.properties)
    )


def member_values(*sources: object) -> Iterator[str]:
    """Every value in what was sent of a member (a profile's fields and custom properties,
    nested ones included, or an import payload's attributes) as text, for rejection_reason."""
    for source in sources:
        if isinstance(source, str):
            yield source
        elif isinstance(source, int | float) and not isinstance(source, bool):
            yield str(source)
        elif isinstance(source, Mapping):
            yield from member_values(*source.values())
        elif isinstance(source, list | tuple):
            yield from member_values(*source)
