"""The connector service: validate, check live with Klaviyo, encrypt the key, then write.

It sits on top of ``sync/`` (a new list id forgets the ledger) and below the faces (CLI, API).
Lookups live in ``db/queries.py``, the fields' rules and JSON shapes in ``shapes.py``, the
errors in ``errors.py``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.models import Connector
from segops_sync.db.queries import get_connector
from segops_sync.errors import InputError
from segops_sync.klaviyo import (
    CredentialsRejected,
    KlaviyoClient,
    KlaviyoError,
    KlaviyoList,
    NotFound,
    PermissionDenied,
    RateLimited,
    redact_key,
    scrub,
)
from segops_sync.secrets import decrypt_api_key, encrypt_api_key
from segops_sync.shapes import (
    API_KEY_PATTERN,
    CONNECTOR_TYPES,
    LIST_ID_PATTERN,
    SEGMENT_ID_MAX,
    SETTABLE_STATUSES,
)
from segops_sync.states import ConnectorStatus, Trigger
from segops_sync.sync.inputs.traits import BadTraits, parse_trait_names
from segops_sync.sync.ledger import forget_ledger
from segops_sync.sync.outcomes import describe_for_person

# The rules are shapes.py's, which the API's request schemas publish; the checks are here.
LIST_ID_RE = re.compile(LIST_ID_PATTERN)
API_KEY_RE = re.compile(API_KEY_PATTERN)
# The list picker counts the members of this many lists at most: a count is one call in
# Klaviyo's XS tier (1/s, 15/m), so ten stay within a minute's budget.
COUNTED_LISTS = 10
# A count Klaviyo would make us wait longer for is left out (shown as not counted).
MAX_COUNT_WAIT = 5.0
# our own bound for --create-list (Klaviyo documents none)
LIST_NAME_MAX = 255


class KlaviyoUnavailable(Exception):
    """Klaviyo did not answer a call the person is waiting on (network, 5xx, rate limit): not
    their input. The message never holds the key."""


def _one_of(values: tuple[str, ...]) -> str:
    return " or ".join(f"'{v}'" for v in values)


def validate_list_id(list_id: str) -> str:
    if not LIST_ID_RE.fullmatch(list_id or ""):
        # Never echo a refused value: a key pasted into the wrong field would come back.
        raise InputError(
            "list id is malformed: a Klaviyo list id is exactly 6 letters or digits "
            "(case-sensitive; copy it from klaviyo.com/list/<ID>/)"
        )
    return list_id


def validate_api_key(api_key: str) -> str:
    if not api_key:
        raise InputError("API key is required: a Klaviyo private API key starts with 'pk_'")
    if not API_KEY_RE.fullmatch(api_key):
        # Never echo the key: it may be a real key pasted with a typo.
        raise InputError(
            "API key is malformed: a Klaviyo private API key starts with 'pk_' "
            "followed by letters and digits"
        )
    return api_key


def validate_segment_id(segment_id: str) -> str:
    if not segment_id or len(segment_id) > SEGMENT_ID_MAX or segment_id != segment_id.strip():
        raise InputError(
            f"segment id is malformed: 1 to {SEGMENT_ID_MAX} characters without spaces around them"
        )
    return segment_id


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    warning: str | None = None
    opt_in_process: str | None = None


def validate_traits(traits: str | list[str]) -> list[str]:
    try:
        return parse_trait_names(traits)
    except BadTraits as exc:
        raise InputError(str(exc)) from None


def opt_in_warning(list_id: str, opt_in_process: str | None) -> str | None:
    """Consent pre-flight: on a double opt-in list, API membership reaches nobody's inbox."""
    if opt_in_process != "double_opt_in":
        return None
    return (
        f"warning: Klaviyo list {list_id} uses double opt-in: profiles this connector adds are "
        "list members, not subscribers (adding by API subscribes nobody and sends no "
        "confirmation); they get marketing email only once they subscribe themselves"
    )


def live_check(api_key: str, list_id: str, base_url: str) -> CheckResult:
    """One ``GET /api/lists/{id}``: checks the key and the list id together (L tier)."""
    try:
        with KlaviyoClient(api_key, base_url) as client:
            found = client.get_list(list_id)
    except (CredentialsRejected, PermissionDenied, NotFound) as exc:
        raise InputError(scrub(describe_for_person(exc, list_id), api_key)) from None
    except KlaviyoError as exc:
        detail = scrub(str(exc.detail), api_key)
        return CheckResult(
            ok=False,
            warning=f"warning: could not reach Klaviyo to check the key and list ({detail}); saved unchecked",
        )
    return CheckResult(
        ok=True,
        warning=opt_in_warning(list_id, found.opt_in_process),
        opt_in_process=found.opt_in_process,
    )


def validate_list_name(name: str) -> str:
    if not name or not name.strip() or len(name) > LIST_NAME_MAX or not name.isprintable():
        raise InputError(
            f"list name is malformed: 1 to {LIST_NAME_MAX} printable characters, not only spaces"
        )
    return name


def _key_refused(exc: KlaviyoError, api_key: str) -> InputError:
    if isinstance(exc, CredentialsRejected):
        return InputError("Klaviyo rejected the API key (401): it is invalid or was revoked")
    return InputError(
        scrub(
            f"Klaviyo refused the API key (HTTP {exc.status}: {exc.detail}): it needs Lists "
            "read/write and Profiles read/write",
            api_key,
        )
    )


def _unavailable(what: str, exc: KlaviyoError, api_key: str) -> KlaviyoUnavailable:
    return KlaviyoUnavailable(scrub(f"could not {what} in Klaviyo: {exc}", api_key))


def key_lists(
    api_key: str,
    base_url: str,
    *,
    counted: int = COUNTED_LISTS,
    sleep: Callable[[float], None] = time.sleep,
) -> list[KlaviyoList]:
    """The key's lists by name (GET /api/lists, every page), the first ``counted`` with their
    member count (one GET /api/lists/{id}?additional-fields[list]=profile_count each: GET
    /api/lists has no count). A count Klaviyo will not give soon stays None, as do the rest."""
    validate_api_key(api_key)
    try:
        with KlaviyoClient(api_key, base_url) as client:
            lists = list(client.iter_lists())
            for index, found in enumerate(lists[:counted]):
                count = _profile_count(client, found.id, sleep)
                if count is None:
                    break  # out of budget: the others would wait as long
                lists[index] = replace(found, profile_count=count)
    except (CredentialsRejected, PermissionDenied) as exc:
        raise _key_refused(exc, api_key) from None
    except KlaviyoError as exc:
        raise _unavailable("list the key's lists", exc, api_key) from None
    return lists


def _profile_count(
    client: KlaviyoClient, list_id: str, sleep: Callable[[float], None]
) -> int | None:
    for _ in range(3):
        try:
            return client.get_list(list_id, profile_count=True).profile_count
        except RateLimited as exc:
            if exc.retry_after is None or exc.retry_after > MAX_COUNT_WAIT:
                return None
            sleep(exc.retry_after)
        except KlaviyoError:
            return None  # a count is a courtesy: a list deleted meanwhile, a 5xx: not counted
    return None


def create_klaviyo_list(api_key: str, name: str, base_url: str) -> KlaviyoList:
    """A new list in the key's account (POST /api/lists). A name one of the key's lists already
    has is refused: Klaviyo would make a second list of that name, which nobody tells apart."""
    validate_api_key(api_key)
    validate_list_name(name)
    try:
        with KlaviyoClient(api_key, base_url) as client:
            taken = next((found for found in client.iter_lists() if found.name == name), None)
            if taken is not None:
                raise InputError(
                    f"the key already has a list named {name!r} ({taken.id}): "
                    f"use --list-id {taken.id}"
                )
            return client.create_list(name)
    except (CredentialsRejected, PermissionDenied) as exc:
        raise _key_refused(exc, api_key) from None
    except KlaviyoError as exc:
        raise _unavailable(f"create the list {name!r}", exc, api_key) from None


def api_key_of(connector: Connector, settings: Settings) -> str:
    return decrypt_api_key(connector.api_key_encrypted, settings.require_secret_key())


def validate_new_connector(
    settings: Settings,
    *,
    segment_id: str,
    list_id: str | None,
    api_key: str,
    connector_type: str = CONNECTOR_TYPES[0],
    traits: str | list[str] | None = None,
) -> list[str]:
    """Every check of a new connector that needs no Klaviyo; ``list_id`` None: the list is yet
    to be made (--create-list) or picked, so nothing is made or asked for before these pass.
    Returns the trait names."""
    if connector_type not in CONNECTOR_TYPES:
        raise InputError(f"connector type is not supported: use {_one_of(CONNECTOR_TYPES)}")
    validate_segment_id(segment_id)
    if list_id is not None:
        validate_list_id(list_id)
    validate_api_key(api_key)
    names = validate_traits(traits) if traits is not None else []
    settings.require_secret_key()
    return names


def create_connector(
    session: Session,
    settings: Settings,
    *,
    segment_id: str,
    list_id: str,
    api_key: str,
    connector_type: str = CONNECTOR_TYPES[0],
    verify: bool = True,
    traits: str | list[str] | None = None,
) -> tuple[Connector, str | None]:
    """Validate, check with Klaviyo, then write. Returns the connector and any warning."""
    names = validate_new_connector(
        settings,
        segment_id=segment_id,
        list_id=list_id,
        api_key=api_key,
        connector_type=connector_type,
        traits=traits,
    )
    secret = settings.require_secret_key()
    check = live_check(api_key, list_id, settings.klaviyo_base_url) if verify else None
    warning = check.warning if check else None
    connector = Connector(
        traits=names,
        opt_in_process=check.opt_in_process if check else None,
        id=str(uuid.uuid4()),
        type=connector_type,
        segment_id=segment_id,
        list_id=list_id,
        api_key_encrypted=encrypt_api_key(api_key, secret),
        api_key_hint=redact_key(api_key),
        status=ConnectorStatus.INACTIVE,
    )
    session.add(connector)
    session.flush()
    return connector, warning


def update_connector(
    session: Session,
    settings: Settings,
    connector_id: str,
    *,
    list_id: str | None = None,
    api_key: str | None = None,
    status: str | None = None,
    verify: bool = True,
    traits: str | list[str] | None = None,
) -> tuple[Connector, str | None]:
    """Validate every field given, check the key and list with Klaviyo, then write."""
    names = validate_traits(traits) if traits is not None else None
    if list_id is not None:
        validate_list_id(list_id)
    if api_key is not None:
        validate_api_key(api_key)
    if status is not None and status not in SETTABLE_STATUSES:
        raise InputError(f"status is not allowed: use {_one_of(SETTABLE_STATUSES)}")
    connector = get_connector(session, connector_id, lock=True)
    warning = None
    if verify and (list_id is not None or api_key is not None):
        key = api_key if api_key is not None else api_key_of(connector, settings)
        target_list = list_id if list_id is not None else connector.list_id
        check = live_check(key, target_list, settings.klaviyo_base_url)
        warning = check.warning
        if check.ok:
            connector.opt_in_process = check.opt_in_process
    elif list_id is not None:
        connector.opt_in_process = None  # a list we did not ask about
    if names is not None:
        # members whose named traits now hash differently are sent again at the next sync
        connector.traits = names
        if verify and warning is None and connector.opt_in_process == "double_opt_in":
            warning = opt_in_warning(
                connector.list_id if list_id is None else list_id, "double_opt_in"
            )
    new_list = list_id is not None and list_id != connector.list_id
    if list_id is not None and new_list:
        connector.list_id = list_id
        # A new list starts empty for us: forget what the old list held.
        forget_ledger(session, connector.id)
    if api_key is not None:
        connector.api_key_encrypted = encrypt_api_key(api_key, settings.require_secret_key())
        connector.api_key_hint = redact_key(api_key)
    fixed = (
        list_id is not None or api_key is not None
    ) and connector.status == ConnectorStatus.ERROR
    if fixed:
        # The fix is in; the next sync decides whether it worked.
        connector.status = ConnectorStatus.ACTIVE
    if status is not None:
        _set(connector, ConnectorStatus(status))
    if (fixed or new_list) and connector.status == ConnectorStatus.ACTIVE:
        # Don't wait for the next recompute: the CLI and the API start this resync after commit.
        connector.resync_requested = True
        connector.resync_trigger = Trigger.RESYNC
    session.flush()
    return connector, warning


def set_status(session: Session, connector_id: str, status: ConnectorStatus) -> Connector:
    connector = get_connector(session, connector_id, lock=True)
    _set(connector, status)
    return connector


def _set(connector: Connector, status: ConnectorStatus) -> None:
    if connector.status == ConnectorStatus.PAUSED and status == ConnectorStatus.ACTIVE:
        # activating would skip the catch-up run that resuming starts (sync/pause.py)
        raise InputError(
            f"connector {connector.id} is paused: resume it instead "
            f"(`segops-sync connectors resume {connector.id}`)"
        )
    connector.status = status
    if status == ConnectorStatus.INACTIVE:
        connector.resync_requested = False  # an inactive connector is never synced


def delete_connector(session: Session, connector_id: str) -> None:
    connector = get_connector(session, connector_id, lock=True)
    session.delete(connector)
