"""Profiles: identity matching (email, then external_id, then phone), upserts, GET /api/profiles,
POST /api/profile-import, and why Klaviyo would refuse a profile.

Choices where Klaviyo's behaviour is unconfirmed (see docs/klaviyo.md#not-confirmed) are marked "choice:".
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from segops_sync.klaviyo_sim.base import SimState
from segops_sync.klaviyo_sim.responses import (
    error_item,
    error_response,
    errors_response,
    iso,
    ok_response,
    page_links,
    query_filter,
)
from segops_sync.klaviyo_sim.state import (
    AccountRecord,
    Ctx,
    ProfileRecord,
    Reject,
    SimHttpResponse,
    SimProfile,
)

MAX_PROFILE_BYTES = 100 * 1024
MAX_EXTERNAL_ID = 255  # choice: Segment's limit; Klaviyo's own is unconfirmed
# One encoder, not one per call (json.dumps builds one for any non-default option); its output
# is ASCII (ensure_ascii), so its length in characters is its length in bytes.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
_EMAIL_RE = re.compile(r"^[^@\s\"(),:;<>\[\]\\]+@[^@\s\"(),:;<>\[\]\\]+\.[^@\s\"(),:;<>\[\]\\]+$")
PHONE_RE = re.compile(r"^\+[1-9]\d{6,14}$")
_PROFILE_ATTRS = (
    "email",
    "phone_number",
    "external_id",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)
_PROFILE_SORTS = frozenset(
    {"id", "-id", "created", "-created", "email", "-email", "updated", "-updated"}
)


class ProfilesMixin(SimState):
    def suppress(self, profile_id: str) -> None:
        """The profile's email is suppressed (an unsubscribe, a bounce): lists keep it."""
        with self._lock:
            found = self._profile_index.get(profile_id)
            if found is None:
                raise KeyError(f"unknown profile {profile_id}")
            found.suppressed = True

    def merge_profile(self, profile_id: str) -> str:
        """Klaviyo merges the profile into another (a merge in its UI): the id is unknown from
        now on, and a new profile with the same identifiers, attributes and list memberships
        takes its place. Returns the new id (no request, no rate limit)."""
        with self._lock:
            old = self._profile_index.get(profile_id)
            if old is None:
                raise KeyError(f"unknown profile {profile_id}")
            account = self._account(old.account_id)
            new = ProfileRecord(
                self._ulid.new(),
                account.id,
                old.created_at,
                datetime.now(UTC),
                visible_at=self._clock(),
                attrs=dict(old.attrs),
                suppressed=old.suppressed,
            )
            self._drop_profile(account, old)
            account.profiles[new.id] = new
            self._profile_index[new.id] = new
            self._index(account, new)
            for lst in self._lists.values():
                if old.id in lst.members:
                    lst.members[new.id] = lst.members.pop(old.id)
                    lst.changes += 1
            return new.id

    def delete_profile(self, profile_id: str) -> None:
        """Someone deletes the profile in Klaviyo: its id is unknown from now on and it is on no
        list (no request, no rate limit)."""
        with self._lock:
            found = self._profile_index.get(profile_id)
            if found is None:
                raise KeyError(f"unknown profile {profile_id}")
            self._drop_profile(self._account(found.account_id), found)
            for lst in self._lists.values():
                if lst.members.pop(profile_id, None) is not None:
                    lst.changes += 1

    def _drop_profile(self, account: AccountRecord, profile: ProfileRecord) -> None:
        self._unindex(account, profile)
        del account.profiles[profile.id]
        del self._profile_index[profile.id]

    def add_profile(
        self,
        account_id: str,
        *,
        email: str | None = None,
        external_id: str | None = None,
        visible: bool = True,
    ) -> str:
        """Seeds a profile directly (no request, no rate limit)."""
        with self._lock:
            account = self._account(account_id)
            now = self._clock()
            attrs = {k: v for k, v in (("email", email), ("external_id", external_id)) if v}
            profile, _ = self._upsert(account, attrs, now, clear_nulls=False)
            if visible:
                profile.visible_at = now
            return profile.id

    def profile(self, profile_id: str) -> SimProfile | None:
        with self._lock:
            self._advance(self._clock())
            found = self._profile_index.get(profile_id)
            return found.snapshot() if found else None

    def profiles(self, account_id: str) -> list[SimProfile]:
        with self._lock:
            self._advance(self._clock())
            account = self._account(account_id)
            return [account.profiles[pid].snapshot() for pid in sorted(account.profiles)]

    def _resolve(
        self, account: AccountRecord, attrs: Mapping[str, Any]
    ) -> tuple[ProfileRecord | None, str | None]:
        """Identity matching: email first, then external_id, then phone. Returns the profile and,
        when the identifiers belong to two different profiles, the other one's id."""
        by_email = by_ext = by_phone = None
        if attrs.get("email"):
            by_email = account.by_email.get(norm_email(attrs["email"]))
        if attrs.get("external_id"):
            by_ext = account.by_external_id.get(attrs["external_id"])
        if attrs.get("phone_number"):
            by_phone = account.by_phone.get(attrs["phone_number"])
        if by_email and by_ext and by_email != by_ext:
            return account.profiles[by_email], by_ext
        chosen = by_email or by_ext or by_phone
        return (account.profiles[chosen] if chosen else None), None

    def _upsert(
        self,
        account: AccountRecord,
        attrs: Mapping[str, Any],
        now: float,
        *,
        clear_nulls: bool,
        found: tuple[ProfileRecord | None, datetime] | None = None,
    ) -> tuple[ProfileRecord, bool]:
        """``found``: the profile the caller already resolved for these attrs, and the time
        to stamp (a job resolves each profile first, to check conflicts, and stamps once)."""
        if found is None:
            profile, stamp = self._resolve(account, attrs)[0], datetime.now(UTC)
        else:
            profile, stamp = found
        created = profile is None
        if profile is None:
            profile = ProfileRecord(
                self._ulid.new(), account.id, stamp, stamp, visible_at=now + self.indexing_delay
            )
            account.profiles[profile.id] = profile
            self._profile_index[profile.id] = profile
        else:  # a new profile is in no index yet (a first sync creates a million)
            self._unindex(account, profile)
        for name, value in attrs.items():
            if value is None:
                if clear_nulls:
                    profile.attrs.pop(name, None)
                continue  # bulk import never clears a field with null
            if name == "properties" and isinstance(value, dict):
                # custom properties merge: the keys sent are set, the others stay
                merged = dict(profile.attrs.get("properties") or {})
                merged.update(value)
                profile.attrs[name] = merged
                continue
            profile.attrs[name] = norm_email(value) if name == "email" else value
        profile.updated_at = stamp
        self._index(account, profile)
        return profile, created

    def _index(self, account: AccountRecord, profile: ProfileRecord) -> None:
        if profile.attrs.get("email"):
            account.by_email[profile.attrs["email"]] = profile.id
        if profile.attrs.get("external_id"):
            account.by_external_id[profile.attrs["external_id"]] = profile.id
        if profile.attrs.get("phone_number"):
            account.by_phone[profile.attrs["phone_number"]] = profile.id

    def _unindex(self, account: AccountRecord, profile: ProfileRecord) -> None:
        for index, name in (
            (account.by_email, "email"),
            (account.by_external_id, "external_id"),
            (account.by_phone, "phone_number"),
        ):
            value = profile.attrs.get(name)
            if value and index.get(value) == profile.id:
                del index[value]

    def _h_get_profiles(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        account = ctx.account
        assert account is not None
        size = self._page_size(ctx)
        after = ctx.query.get("page[cursor]", "")
        sort = ctx.query.get("sort", "id")
        if sort not in _PROFILE_SORTS:
            raise Reject(error_response(400, detail="Invalid sort.", parameter="sort"))
        if "filter" in ctx.query:
            filt = query_filter(ctx, {"email", "external_id", "id", "phone_number"})
            ids = set()
            for value in filt.values:
                if filt.field == "email":
                    pid = account.by_email.get(norm_email(value))
                elif filt.field == "external_id":
                    pid = account.by_external_id.get(value)
                elif filt.field == "phone_number":
                    pid = account.by_phone.get(value)
                else:
                    pid = value if value in account.profiles else None
                if pid:
                    ids.add(pid)
            candidates = sorted(ids)
        else:
            candidates = sorted(account.profiles)
        # Klaviyo indexes new profiles asynchronously: lookups miss them for a while.
        visible = [
            pid for pid in candidates if account.profiles[pid].visible_at <= ctx.now and pid > after
        ]
        page = visible[:size]
        data = [profile_resource(ctx, account.profiles[pid]) for pid in page]
        nxt = page[-1] if len(visible) > size else None
        return ok_response({"data": data, "links": page_links(ctx, nxt)})

    def _h_profile_import(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        account = ctx.account
        assert account is not None
        item = body["data"]
        attrs = {
            k: v
            for k, v in item["attributes"].items()
            if k in _PROFILE_ATTRS or k in ("properties", "location")
        }
        if len(json.dumps(item).encode()) > MAX_PROFILE_BYTES:
            raise Reject(error_response(400, detail="The profile exceeds 100 KB.", pointer="/data"))
        rejection = profile_rejection(item, attrs, "/data", whole=True)
        if rejection is not None:
            source = rejection["attributes"]["source"]
            raise Reject(
                error_response(
                    400, detail=rejection["attributes"]["detail"], pointer=source["pointer"]
                )
            )
        target: ProfileRecord | None = None
        if item.get("id"):
            target = account.profiles.get(item["id"])
            if target is None:
                raise Reject(
                    error_response(
                        404,
                        detail=f"A profile with id {item['id']} was not found.",
                        pointer="/data/id",
                    )
                )
        else:
            _, conflict = self._resolve(account, attrs)
            if conflict is not None:
                raise Reject(
                    errors_response(
                        409,
                        [
                            error_item(
                                409,
                                detail="A profile already exists with one of these identifiers.",
                                pointer="/data/attributes",
                                meta={"duplicate_profile_id": conflict},
                            )
                        ],
                    )
                )
        if target is not None:
            self._unindex(account, target)
            for name, value in attrs.items():
                if value is None:
                    target.attrs.pop(name, None)
                else:
                    target.attrs[name] = norm_email(value) if name == "email" else value
            self._index(account, target)
            profile, created = target, False
        else:
            profile, created = self._upsert(account, attrs, ctx.now, clear_nulls=True)
        doc = {"data": profile_resource(ctx, profile)}
        return ok_response(doc, status=201 if created else 200)


def profile_resource(ctx: Ctx, profile: ProfileRecord) -> dict[str, Any]:
    attrs: dict[str, Any] = {name: profile.attrs.get(name) for name in _PROFILE_ATTRS}
    attrs.update(
        {
            "created": iso(profile.created_at),
            "updated": iso(profile.updated_at),
            "last_event_date": None,
            "location": profile.attrs.get("location"),
            "properties": profile.attrs.get("properties") or {},
        }
    )
    if ctx.query.get("additional-fields[profile]") == "subscriptions":
        attrs["subscriptions"] = _subscriptions(profile)
    wanted = ctx.query.get("fields[profile]")
    if wanted:
        names = {n.strip() for n in wanted.split(",")}
        if "subscriptions" in attrs:
            names.add("subscriptions")  # additional fields come whatever fields[] says
        attrs = {k: v for k, v in attrs.items() if k in names}
    return {
        "type": "profile",
        "id": profile.id,
        "attributes": attrs,
        "links": {"self": f"{ctx.req.base_url}/api/profiles/{profile.id}"},
    }


def valid_email(value: str) -> bool:
    return len(value) <= 254 and bool(_EMAIL_RE.match(value.strip()))


def norm_email(value: str) -> str:
    return value.strip().lower()


def profile_rejection(
    item: dict[str, Any], attrs: Mapping[str, Any], where: str, *, whole: bool = False
) -> dict[str, Any] | None:
    """Why Klaviyo would refuse this (schema-valid) profile, as an import-error resource."""
    email, ext, phone = attrs.get("email"), attrs.get("external_id"), attrs.get("phone_number")
    if whole and email is not None and not valid_email(email):
        return import_error(
            "invalid",
            "Invalid input.",
            f"Invalid email address: {email!r}.",
            f"{where}/attributes/email",
        )
    if whole and phone is not None and not PHONE_RE.match(phone):
        return import_error(
            "invalid",
            "Invalid input.",
            "Invalid phone number format (expected E.164).",
            f"{where}/attributes/phone_number",
        )
    if ext is not None and len(ext) > MAX_EXTERNAL_ID:
        return import_error(
            "invalid",
            "Invalid input.",
            f"external_id must be at most {MAX_EXTERNAL_ID} characters.",
            f"{where}/attributes/external_id",
        )
    if not email and not ext:
        detail = (
            "A phone number alone needs SMS to be set up; add an email or external_id."
            if phone
            else "A profile needs an email, phone_number or external_id."
        )
        return import_error("invalid", "Invalid input.", detail, f"{where}/attributes")
    if (
        not whole
        and not _surely_small(item)
        and len(_COMPACT_JSON.encode(item)) > MAX_PROFILE_BYTES
    ):
        return import_error("invalid", "Invalid input.", "The profile exceeds 100 KB.", where)
    return None


def _surely_small(item: Mapping[str, Any]) -> bool:
    """A profile of a few strings is far below 100 KB: no need to serialize it to know (12
    characters per character bounds JSON's escaping, a surrogate pair included)."""
    attrs = item.get("attributes")
    if len(item) > 2 or not isinstance(attrs, dict):
        return False
    size = 64
    for name, value in attrs.items():
        if not isinstance(value, str):
            return False
        size += 12 * (len(name) + len(value)) + 8
    return size < MAX_PROFILE_BYTES


def _subscriptions(profile: ProfileRecord) -> dict[str, Any]:
    """The shape of Klaviyo's profile ``subscriptions`` additional field (email part)."""
    suppression = (
        [{"reason": "USER_SUPPRESSED", "timestamp": iso(profile.updated_at)}]
        if profile.suppressed
        else []
    )
    return {
        "email": {
            "marketing": {
                "can_receive_email_marketing": not profile.suppressed,
                "consent": "NEVER_SUBSCRIBED",
                "suppression": suppression,
                "list_suppressions": [],
            }
        }
    }


def import_error(code: str, title: str, detail: str, pointer: str) -> dict[str, Any]:
    return {
        "type": "import-error",
        "id": str(uuid.uuid4()),
        "attributes": {
            "code": code,
            "title": title,
            "detail": detail,
            "source": {"pointer": pointer},
            "original_payload": None,
        },
    }
