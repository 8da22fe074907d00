"""Connector management: validation, the live check, key encryption, redaction, JSON shape."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.models import Connector, SyncRun
from segops_sync.klaviyo import (
    CredentialsRejected,
    KlaviyoClient,
    KlaviyoError,
    NotFound,
    PermissionDenied,
)
from segops_sync.secrets import decrypt_api_key, encrypt_api_key, redact_api_key, scrub
from segops_sync.sync.rejected import rejected_members_url

LIST_ID_RE = re.compile(r"^[A-Za-z0-9]{6}$")
API_KEY_RE = re.compile(r"^pk_[A-Za-z0-9_]{8,}$")
SEGMENT_ID_MAX = 200
STATUSES = ("inactive", "active", "error")


class InputError(Exception):
    """Bad input from a person or a script: one line that says what is wrong."""


class UnknownConnector(InputError):
    def __init__(self, connector_id: str) -> None:
        super().__init__(f"unknown connector id {connector_id!r}")


def validate_list_id(list_id: str) -> str:
    if not LIST_ID_RE.fullmatch(list_id or ""):
        raise InputError(
            f"list id {list_id!r} is malformed: a Klaviyo list id is exactly 6 letters or digits "
            "(case-sensitive; copy it from klaviyo.com/list/<ID>/)"
        )
    return list_id


def validate_api_key(api_key: str) -> str:
    if not API_KEY_RE.fullmatch(api_key or ""):
        # Never echo the key: it may be a real key pasted with a typo.
        raise InputError(
            "API key is malformed: a Klaviyo private API key starts with 'pk_' "
            "followed by letters and digits"
        )
    return api_key


def validate_segment_id(segment_id: str) -> str:
    if not segment_id or len(segment_id) > SEGMENT_ID_MAX or segment_id != segment_id.strip():
        raise InputError(
            f"segment id {segment_id!r} is malformed: a non-empty id without spaces around it"
        )
    return segment_id


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    warning: str | None = None
    opt_in_process: str | None = None


def validate_traits(traits: str | list[str]) -> list[str]:
    from segops_sync.sync.traits import BadTraits, parse_trait_names

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


def describe_klaviyo_error(exc: KlaviyoError, list_id: str) -> str:
    """What a person must fix, in one line, never with the key."""
    if isinstance(exc, CredentialsRejected):
        return (
            "Klaviyo rejected the API key (401): it is invalid or was revoked; "
            "create a private key with Lists and Profiles read/write and update the connector"
        )
    if isinstance(exc, PermissionDenied):
        return (
            f"Klaviyo refused the API key (403: {exc.detail}): the key was revoked or lacks a scope; "
            "it needs Lists read/write and Profiles read/write"
        )
    if isinstance(exc, NotFound):
        return (
            f"Klaviyo has no list with id {list_id!r} in this account (404); list ids are "
            "case-sensitive and exactly 6 characters: copy it from klaviyo.com/list/<ID>/"
        )
    return f"Klaviyo error: {exc.detail}"


def live_check(api_key: str, list_id: str, base_url: str) -> CheckResult:
    """One ``GET /api/lists/{id}``: checks the key and the list id together (L tier)."""
    try:
        with KlaviyoClient(api_key, base_url) as client:
            found = client.get_list(list_id)
    except (CredentialsRejected, PermissionDenied, NotFound) as exc:
        raise InputError(scrub(describe_klaviyo_error(exc, list_id), api_key)) from None
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


def connector_json(connector: Connector, settings: Settings) -> dict[str, Any]:
    return {
        "id": connector.id,
        "type": connector.type,
        "segment_id": connector.segment_id,
        "list_id": connector.list_id,
        "status": connector.status,
        "last_synced_at": _iso(connector.last_synced_at),
        "last_error": connector.last_error,
        "api_key": connector.api_key_hint,
        "traits": list(connector.traits or []),
        # as Klaviyo last reported it (null: not checked yet)
        "opt_in_process": connector.opt_in_process,
    }


def run_json(run: SyncRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "connector_id": run.connector_id,
        "trigger": run.trigger,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "status": run.status,
        "added": run.added,
        "removed": run.removed,
        "rejected": run.rejected,
        "error": run.error,
        # beyond the contract's fields (issue 14)
        "updated": run.updated,
        "traits_dropped": run.traits_dropped,
        "suppressed": run.suppressed,
        "rejected_members": rejected_members_url(run.connector_id, run),
        "verify": (
            {
                "in_list": run.verify_in_list,
                "expected": run.verify_expected,
                "missing": run.verify_missing,
                "extra": run.verify_extra,
            }
            if run.verify_in_list is not None
            else None
        ),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def get_connector(session: Session, connector_id: str, *, lock: bool = False) -> Connector:
    stmt = select(Connector).where(Connector.id == connector_id)
    if lock:
        stmt = stmt.with_for_update()
    connector = session.scalars(stmt).one_or_none()
    if connector is None:
        raise UnknownConnector(connector_id)
    return connector


def list_connectors(session: Session) -> list[Connector]:
    return list(session.scalars(select(Connector).order_by(Connector.created_at, Connector.id)))


def api_key_of(connector: Connector, settings: Settings) -> str:
    return decrypt_api_key(connector.api_key_encrypted, settings.require_secret_key())


def create_connector(
    session: Session,
    settings: Settings,
    *,
    segment_id: str,
    list_id: str,
    api_key: str,
    connector_type: str = "klaviyo",
    verify: bool = True,
    traits: str | list[str] | None = None,
) -> tuple[Connector, str | None]:
    """Validate, check with Klaviyo, then write. Returns the connector and any warning."""
    if connector_type != "klaviyo":
        raise InputError(f"connector type {connector_type!r} is not supported: use 'klaviyo'")
    validate_segment_id(segment_id)
    validate_list_id(list_id)
    validate_api_key(api_key)
    names = validate_traits(traits) if traits is not None else []
    secret = settings.require_secret_key()
    check = live_check(api_key, list_id, settings.klaviyo_base_url) if verify else None
    warning = check.warning if check else None
    connector = Connector(
        traits=names,
        opt_in_process=check.opt_in_process if check else None,
        id=str(uuid.uuid4()),
        type="klaviyo",
        segment_id=segment_id,
        list_id=list_id,
        api_key_encrypted=encrypt_api_key(api_key, secret),
        api_key_hint=redact_api_key(api_key),
        status="inactive",
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
    names = validate_traits(traits) if traits is not None else None
    if list_id is not None:
        validate_list_id(list_id)
    if api_key is not None:
        validate_api_key(api_key)
    if status is not None and status not in ("active", "inactive"):
        raise InputError(f"status {status!r} is not allowed: use 'active' or 'inactive'")
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
    if list_id is not None and list_id != connector.list_id:
        connector.list_id = list_id
        # A new list starts empty for us: forget what the old list held.
        from segops_sync.sync.ledger import forget_ledger

        forget_ledger(session, connector.id)
    if api_key is not None:
        connector.api_key_encrypted = encrypt_api_key(api_key, settings.require_secret_key())
        connector.api_key_hint = redact_api_key(api_key)
    if (list_id is not None or api_key is not None) and connector.status == "error":
        # The fix is in; the next sync decides whether it worked.
        connector.status = "active"
    if status is not None:
        connector.status = status
        if status == "inactive":
            connector.resync_requested = False
    session.flush()
    return connector, warning


def set_status(session: Session, connector_id: str, status: str) -> Connector:
    connector = get_connector(session, connector_id, lock=True)
    connector.status = status
    if status == "inactive":
        connector.resync_requested = False
    return connector


def delete_connector(session: Session, connector_id: str) -> None:
    connector = get_connector(session, connector_id, lock=True)
    session.delete(connector)


def list_runs(session: Session, connector_id: str, limit: int = 100) -> list[SyncRun]:
    get_connector(session, connector_id)
    stmt = (
        select(SyncRun)
        .where(SyncRun.connector_id == connector_id)
        .order_by(SyncRun.started_at.desc(), SyncRun.id.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))
