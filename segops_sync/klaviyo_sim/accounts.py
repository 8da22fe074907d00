"""Accounts and their private API keys: setup, who a request's key belongs to, GET /api/accounts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from segops_sync.klaviyo_sim.base import SimState
from segops_sync.klaviyo_sim.ids import key_fingerprint, private_key, short_id
from segops_sync.klaviyo_sim.responses import ok_response, self_link
from segops_sync.klaviyo_sim.state import AccountRecord, Ctx, KeyRecord, SimHttpResponse

# data-privacy:write: `members forget --klaviyo-delete` (a key without it gets Klaviyo's 403)
DEFAULT_SCOPES: frozenset[str] = frozenset(
    {
        "accounts:read",
        "lists:read",
        "lists:write",
        "profiles:read",
        "profiles:write",
        "data-privacy:write",
    }
)


class AccountsMixin(SimState):
    def create_account(self, *, account_id: str | None = None) -> str:
        with self._lock:
            account_id = account_id or self._fresh(lambda: short_id(self._rng), self._accounts)
            if account_id in self._accounts:
                raise ValueError(f"account {account_id} exists")
            self._accounts[account_id] = AccountRecord(account_id)
            return account_id

    def create_key(self, account_id: str, *, scopes: Iterable[str] = DEFAULT_SCOPES) -> str:
        with self._lock:
            self._account(account_id)
            key = self._fresh(lambda: private_key(self._rng), self._keys)
            self._keys[key] = KeyRecord(account_id, frozenset(scopes), key_fingerprint(key))
            return key

    def revoke_key(self, key: str) -> None:
        """Choice: a revoked key gets 401 (as an unknown key does), Klaviyo's status for a key
        that no longer authenticates; 403 is kept for a valid key lacking a scope."""
        with self._lock:
            record = self._keys.get(key)
            if record is None:
                raise KeyError("unknown key")
            record.revoked = True

    def _key_of(self, headers: Mapping[str, str]) -> KeyRecord | None:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "klaviyo-api-key":
            return None
        return self._keys.get(value.strip())

    def _h_accounts(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        assert ctx.account is not None
        account_id = ctx.account.id
        resource = {
            "type": "account",
            "id": account_id,
            "attributes": {
                "test_account": True,
                "contact_information": {
                    "default_sender_name": "segops-sync simulator",
                    "default_sender_email": "sim@example.invalid",
                    "website_url": "https://example.invalid",
                    "organization_name": "Simulator",
                    "street_address": {
                        "address1": "",
                        "address2": "",
                        "city": "",
                        "region": "",
                        "country": "",
                        "zip": "",
                    },
                },
                "industry": None,
                "timezone": "UTC",
                "preferred_currency": "USD",
                "public_api_key": account_id,
                "locale": "en-US",
            },
            "links": {"self": f"{ctx.req.base_url}/api/accounts/{account_id}"},
        }
        return ok_response({"data": [resource], "links": {"self": self_link(ctx)}})
