"""The HTTP API of docs/contract.md#http-api, served by uvicorn on 127.0.0.1, against the real database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    new_segment,
    recompute,
    row_counts,
    wait_idle,
)


@pytest.fixture(scope="module")
def api(redis_stack_env: dict[str, str], api_url: str) -> Iterator[httpx.Client]:
    stack_env = redis_stack_env
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
    assert api.post("/v1/connectors/nope/pause").status_code == 404
    assert api.post("/v1/connectors/nope/resume").status_code == 404


def test_pause_and_resume_over_http(
    api: httpx.Client, klaviyo: Klaviyo, worker: WorkerProcess
) -> None:
    """Each answers the connector; what cannot be done is a 422 that changes nothing."""
    cid = create_connector(klaviyo, new_segment(), activate=False)
    refused = api.post(f"/v1/connectors/{cid}/pause")
    assert refused.status_code == 422 and "inactive" in refused.json()["error"]
    assert api.patch(f"/v1/connectors/{cid}", json={"status": "active"}).status_code == 200
    assert api.post(f"/v1/connectors/{cid}/resume").status_code == 422  # not paused
    for _ in range(2):  # a second pause changes nothing
        paused = api.post(f"/v1/connectors/{cid}/pause")
        assert paused.status_code == 200 and paused.json()["status"] == "paused"
    for answer in (
        api.post(f"/v1/connectors/{cid}/resync"),
        api.patch(f"/v1/connectors/{cid}", json={"status": "active"}),
    ):
        assert answer.status_code == 422 and "paused" in answer.json()["error"]
    assert api.get(f"/v1/connectors/{cid}/runs").json()["runs"] == []
    resumed = api.post(f"/v1/connectors/{cid}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "active"
    wait_idle(cid)  # the catch-up run, of an empty segment
    [run] = api.get(f"/v1/connectors/{cid}/runs").json()["runs"]
    assert (run["trigger"], run["status"]) == ("resume", "succeeded")
    assert api.delete(f"/v1/connectors/{cid}").status_code == 204


def test_a_resync_approves_a_held_mass_removal_in_the_tokens_name(
    api: httpx.Client, klaviyo: Klaviyo, worker: WorkerProcess, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    members = [f"api-approve{i}@example.com" for i in range(10)]
    recompute(segment, members, tmp_path)
    wait_idle(connector_id)
    recompute(segment, members[:2], tmp_path)
    wait_idle(connector_id, runs_at_least=2)
    runs = api.get(f"/v1/connectors/{connector_id}/runs").json()["runs"]
    assert [(r["status"], r["approval"]) for r in runs] == [("held", None), ("succeeded", None)]

    before = row_counts()
    for bad in ({"allow_mass_removal": "yes"}, {"allow_mass_removal": 1}, {"approve": True}):
        answer = api.post(f"/v1/connectors/{connector_id}/resync", json=bad)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]
    assert row_counts() == before

    answer = api.post(f"/v1/connectors/{connector_id}/resync", json={"allow_mass_removal": True})
    assert answer.status_code == 202, answer.text
    wait_idle(connector_id, runs_at_least=3)
    assert set(klaviyo.members()) == set(members[:2])
    newest = api.get(f"/v1/connectors/{connector_id}/runs").json()["runs"][0]
    assert newest["status"] == "succeeded"
    assert newest["approval"]["by"] == "api-token"
    assert newest["approval"]["held_run_id"] == runs[0]["id"]


def test_patching_a_fixed_key_resyncs_and_clears_the_error(
    api: httpx.Client, klaviyo: Klaviyo, worker: WorkerProcess, tmp_path: Path
) -> None:
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment)
    klaviyo.sim.revoke_key(klaviyo.api_key)
    recompute(segment, ["patch1@example.com"], tmp_path)
    broken = wait_idle(connector_id)
    assert broken.status == "error" and broken.last_error and "revoked" in broken.last_error

    fresh_key = klaviyo.sim.create_key(klaviyo.account)
    patched = api.patch(f"/v1/connectors/{connector_id}", json={"api_key": fresh_key})
    assert patched.status_code == 200 and fresh_key not in patched.text
    fixed = wait_idle(connector_id, runs_at_least=2)  # no recompute: the PATCH resynced
    assert (fixed.status, fixed.last_error) == ("active", None)
    assert set(klaviyo.members()) == {"patch1@example.com"}


# -- hard to misuse ---------------------------------------------------------------

NESTED = b"[" * 5000 + b"]" * 5000  # json.loads raised RecursionError on it: a 500


def test_deeply_nested_json_answers_422_not_500(api: httpx.Client, klaviyo: Klaviyo) -> None:
    connector_id = create_connector(klaviyo, new_segment(), activate=False)
    before = row_counts()
    inside_a_field = b'{"segment_id": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    for method, path, body in [
        ("POST", "/v1/connectors", NESTED),
        ("POST", "/v1/connectors", inside_a_field),
        ("PATCH", f"/v1/connectors/{connector_id}", NESTED),
    ]:
        answer = api.request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 422, (method, answer.status_code, answer.text[:200])
        assert "too deeply" in answer.json()["error"]
    assert row_counts() == before


def test_every_json_answer_is_nosniff_and_no_store(api: httpx.Client, klaviyo: Klaviyo) -> None:
    connector_id = create_connector(klaviyo, new_segment(), activate=False)
    key = "pk_" + "a" * 30
    answers = {
        "200": api.get("/v1/connectors"),
        "200 openapi": api.get("/openapi.json"),
        "401": api.get("/v1/connectors", headers={"Authorization": "Bearer wrong"}),
        "404 connector": api.get("/v1/connectors/nope"),
        "404 route": api.get("/v2/nothing"),
        "405": api.put("/v1/connectors"),
        "413": api.post("/v1/connectors", content=b"{" + b" " * 70_000 + b"}"),
        "422": api.post("/v1/connectors", json={"segment_id": "s", "list_id": "x", "api_key": key}),
        "422 nested": api.post("/v1/connectors", content=NESTED),
        "200 patch": api.patch(f"/v1/connectors/{connector_id}", json={}),
    }
    for name, answer in answers.items():
        assert answer.headers["content-type"].startswith("application/json"), name
        assert answer.headers.get("x-content-type-options") == "nosniff", name
        assert answer.headers.get("cache-control") == "no-store", name
    page = api.get("/activations", headers={"Authorization": ""})
    assert page.headers["x-content-type-options"] == "nosniff"


def test_an_unexpected_error_answers_json_with_the_same_headers(
    redis_stack_env: dict[str, str],
) -> None:
    """A 500 is answered by Starlette's outermost layer, outside the API's middleware."""
    import asyncio

    from starlette.routing import Route

    from segops_sync.api import SignInThrottle, create_app

    def boom(request: object) -> None:
        raise RuntimeError("a bug")

    throttle = SignInThrottle(
        redis_stack_env["SEGOPS_LIMITER_REDIS_URL"], redis_stack_env["SEGOPS_REDIS_KEY_PREFIX"]
    )
    app = create_app(redis_stack_env["SEGOPS_API_TOKEN"], throttle=throttle)
    app.router.routes.append(Route("/boom", boom))

    async def get_boom() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            token = redis_stack_env["SEGOPS_API_TOKEN"]
            return await client.get("/boom", headers={"Authorization": f"Bearer {token}"})

    answer = asyncio.run(get_boom())
    assert answer.status_code == 500 and "a bug" not in answer.text
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-store"


KEY_IN_THE_WRONG_FIELD = "pk_LivePrivateKey0123456789abcdef"


@pytest.mark.parametrize(
    "field",
    ["list_id", "segment_id", "type", "traits", "status", "unknown-name", "segment_id-too-long"],
)
def test_a_refused_field_never_comes_back_in_the_error(
    api: httpx.Client, klaviyo: Klaviyo, field: str
) -> None:
    """A Klaviyo key pasted into the wrong field must not be echoed back (nor logged by a
    proxy that logs error bodies)."""
    key = KEY_IN_THE_WRONG_FIELD
    good = {"type": "klaviyo", "segment_id": "s", "list_id": "AbC123", "api_key": "pk_" + "b" * 30}
    if field == "status":
        connector_id = create_connector(klaviyo, new_segment(), activate=False)
        answer = api.patch(f"/v1/connectors/{connector_id}", json={"status": key})
    else:
        body: dict[str, object] = dict(good)
        if field == "traits":
            body["traits"] = ["first_name", key + "!"]
        elif field == "unknown-name":
            body[key] = "x"
        elif field == "segment_id-too-long":
            body["segment_id"] = key * 10
        elif field == "segment_id":
            body["segment_id"] = f" {key} "
        else:
            body[field] = key
        answer = api.post("/v1/connectors", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]
    assert "pk_Live" not in answer.text, answer.text
