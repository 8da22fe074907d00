"""An admin client for a simulator running in another process (``segops-sync klaviyo-sim``)."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import httpx

from segops_sync.klaviyo.endpoints import Endpoint


class RemoteSimulator:
    """Mirrors the Simulator's setup/inspection/fault methods over its /_sim JSON API."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteSimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.post(path, json=body or {})
        response.raise_for_status()
        return response.json() if response.content else None

    def _get(self, path: str, **params: Any) -> Any:
        response = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        response.raise_for_status()
        return response.json()

    def create_account(self, *, account_id: str | None = None) -> str:
        return str(self._post("/_sim/accounts", {"account_id": account_id})["account_id"])

    def create_key(self, account_id: str, *, scopes: Iterable[str] | None = None) -> str:
        body = {"scopes": list(scopes)} if scopes is not None else {}
        return str(self._post(f"/_sim/accounts/{account_id}/keys", body)["key"])

    def revoke_key(self, key: str) -> None:
        self._post("/_sim/keys/revoke", {"key": key})

    def create_list(
        self, account_id: str, name: str = "List", *, list_id: str | None = None
    ) -> str:
        body = {"name": name, "list_id": list_id}
        return str(self._post(f"/_sim/accounts/{account_id}/lists", body)["list_id"])

    def list_member_ids(self, list_id: str) -> set[str]:
        return set(self._get(f"/_sim/lists/{list_id}/members")["member_ids"])

    def list_members(self, list_id: str) -> list[dict[str, Any]]:
        members: list[dict[str, Any]] = self._get(f"/_sim/lists/{list_id}/members")["members"]
        return members

    def profiles(self, account_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._get(f"/_sim/accounts/{account_id}/profiles")["profiles"]
        return found

    def requests(
        self, *, endpoint: Endpoint | None = None, status: int | None = None
    ) -> list[dict[str, Any]]:
        doc = self._get(
            "/_sim/requests", endpoint=endpoint.value if endpoint else None, status=status
        )
        found: list[dict[str, Any]] = doc["requests"]
        return found

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._get("/_sim/stats")
        return doc

    def count_429(self) -> int:
        return int(self.stats()["count_429"])

    def early_retries(self) -> int:
        return int(self.stats()["early_retries"])

    def subscription_calls(self) -> int:
        return int(self.stats()["subscription_calls"])

    def max_rate(self, account_id: str, endpoint: Endpoint, window_seconds: float) -> int:
        doc = self._get(
            "/_sim/max-rate", account_id=account_id, endpoint=endpoint.value, window=window_seconds
        )
        return int(doc["max_rate"])

    def set_faults(
        self,
        *,
        error_rate: float = 0.0,
        drop_rate: float = 0.0,
        latency: float = 0.0,
        challenge_rate: float = 0.0,
    ) -> None:
        self._post(
            "/_sim/faults",
            {
                "error_rate": error_rate,
                "drop_rate": drop_rate,
                "latency": latency,
                "challenge_rate": challenge_rate,
            },
        )

    def force_429(self, count: int, retry_after: float) -> None:
        self._post("/_sim/force-429", {"count": count, "retry_after": retry_after})

    def expire_job(self, job_id: str) -> None:
        self._post(f"/_sim/jobs/{job_id}/expire")

    def lose_job(self, job_id: str) -> None:
        self._post(f"/_sim/jobs/{job_id}/lose")
