"""Data privacy: POST /api/data-privacy-deletion-jobs, Klaviyo's request to delete a profile.

Klaviyo answers 202 at once and deletes later: here the profiles the request names are deleted
``job_delay`` after it (as a bulk job is applied), then their ids are unknown and they are on no
list. Choices where Klaviyo's behaviour is unconfirmed (see docs/klaviyo.md#not-confirmed) are
marked "choice:".
"""

from __future__ import annotations

from typing import Any

from segops_sync.klaviyo_sim.profiles import ProfilesMixin, norm_email
from segops_sync.klaviyo_sim.responses import error_response
from segops_sync.klaviyo_sim.state import Ctx, Reject, SimHttpResponse


class PrivacyMixin(ProfilesMixin):
    def _h_request_deletion(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        account = ctx.account
        assert account is not None
        profile = body["data"]["attributes"]["profile"]["data"]
        attrs = profile.get("attributes") or {}
        given = {
            name: value
            for name, value in (
                ("id", profile.get("id")),
                ("email", attrs.get("email")),
                ("phone_number", attrs.get("phone_number")),
            )
            if value
        }
        if len(given) != 1:
            # "If multiple identifiers are provided, we will return an error" (and none names
            # nobody)
            raise Reject(
                error_response(
                    400,
                    detail="Provide exactly one of id, email or phone_number.",
                    pointer="/data/attributes/profile/data",
                )
            )
        [(name, value)] = given.items()
        if name == "id":
            found = value if value in account.profiles else None
        elif name == "email":
            found = account.by_email.get(norm_email(value))
        else:
            found = account.by_phone.get(value)
        # choice: an identifier no profile has is accepted too (nothing to delete); Klaviyo's
        # answer for it is undocumented, and the request is asynchronous anyway.
        if found is not None:
            self._pending_deletions.append((ctx.now + self.job_delay, found))
        return SimHttpResponse(202, {})

    def _apply_due_deletions(self, now: float) -> None:
        if not self._pending_deletions:
            return
        due = [pid for at, pid in self._pending_deletions if at <= now]
        self._pending_deletions = [(at, pid) for at, pid in self._pending_deletions if at > now]
        for pid in due:
            found = self._profile_index.get(pid)
            if found is None:
                continue  # deleted or merged meanwhile
            self._drop_profile(self._account(found.account_id), found)
            for lst in self._lists.values():
                if lst.members.pop(pid, None) is not None:
                    lst.changes += 1
