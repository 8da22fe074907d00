"""The HTTP API of docs/contract.md#http-api, served by uvicorn on 127.0.0.1, against the real database."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.helpers import Klaviyo, new_segment, row_counts


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str], api_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {stack_env['SEGOPS_API_TOKEN']}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


def test_requires_the_bearer_token(api: httpx.Client) -> None:
    before = row_counts()
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        assert api.get("/v1/connectors", headers=headers).status_code == 401
        answer = api.post("/v1/connectors", headers=headers, json={"segment_id": "s"})
        assert answer.status_code == 401
    assert row_counts() == before


def test_connector_lifecycle_over_http(api: httpx.Client, klaviyo: Klaviyo) -> None:
    body = {
        "type": "klaviyo",
        "segment_id": new_segment(),
        "list_id": klaviyo.list_id,
        "api_key": klaviyo.api_key,
    }
    created = api.post("/v1/connectors", json=body)
    assert created.status_code == 201, created.text
    doc = created.json()
    assert doc["status"] == "inactive" and doc["api_key"].startswith("pk_…")
    assert klaviyo.api_key not in created.text
    cid = doc["id"]

    assert api.get(f"/v1/connectors/{cid}").json() == doc
    assert cid in [c["id"] for c in api.get("/v1/connectors").json()["connectors"]]
    patched = api.patch(f"/v1/connectors/{cid}", json={"status": "active"})
    assert patched.status_code == 200 and patched.json()["status"] == "active"
    assert api.post(f"/v1/connectors/{cid}/resync").status_code == 202
    assert isinstance(api.get(f"/v1/connectors/{cid}/runs").json()["runs"], list)
    assert api.delete(f"/v1/connectors/{cid}").status_code == 204
    assert api.get(f"/v1/connectors/{cid}").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"type": "klaviyo", "segment_id": "s", "list_id": "bad", "api_key": "pk_" + "a" * 30},
        {"type": "klaviyo", "segment_id": "s", "list_id": "AbC123", "api_key": "nope"},
        {"type": "mailchimp", "segment_id": "s", "list_id": "AbC123", "api_key": "pk_" + "a" * 30},
        {"type": "klaviyo", "list_id": "AbC123", "api_key": "pk_" + "a" * 30},
        {"type": "klaviyo", "segment_id": 5, "list_id": "AbC123", "api_key": "pk_" + "a" * 30},
    ],
)
def test_validation_failures_answer_422_and_write_nothing(
    api: httpx.Client, body: dict[str, object]
) -> None:
    before = row_counts()
    answer = api.post("/v1/connectors", json=body)
    assert answer.status_code == 422
    assert answer.json()["error"]
    assert row_counts() == before


def test_key_rejected_by_klaviyo_is_422_without_the_key(
    api: httpx.Client, klaviyo: Klaviyo
) -> None:
    bogus = "pk_" + "z" * 34
    answer = api.post(
        "/v1/connectors",
        json={"type": "klaviyo", "segment_id": "s", "list_id": klaviyo.list_id, "api_key": bogus},
    )
    assert answer.status_code == 422 and bogus not in answer.text


def test_unknown_connector_is_404(api: httpx.Client) -> None:
    assert api.get("/v1/connectors/nope").status_code == 404
    assert api.patch("/v1/connectors/nope", json={"status": "active"}).status_code == 404
    assert api.delete("/v1/connectors/nope").status_code == 404
