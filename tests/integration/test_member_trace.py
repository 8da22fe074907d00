"""``segops-sync members trace`` and ``GET /v1/members/{user_id}`` on the real stack: a worker
syncs, the CLI process and the API answer the same JSON, and refuse an ill-formed id."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx

from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    cli,
    cli_json,
    create_connector,
    new_segment,
    recompute,
    wait_idle,
)
from tests.integration.test_api import api

__all__ = ["api"]  # the API fixture, served once per module


def test_the_cli_and_the_api_trace_a_synced_member(
    worker: WorkerProcess, klaviyo: Klaviyo, api: httpx.Client, tmp_path: Path
) -> None:
    segment = new_segment()
    tag = uuid.uuid4().hex[:6]
    member, leaver = f"ada/{tag}", f"bob-{tag}@example.com"  # a "/" travels in the API's path
    connector_id = create_connector(klaviyo, segment)
    recompute(segment, [member, leaver], tmp_path)
    wait_idle(connector_id)
    recompute(segment, [member], tmp_path)
    wait_idle(connector_id, runs_at_least=2)

    doc = cli_json("members", "trace", leaver)
    [traced] = doc["connectors"]
    assert (traced["connector_id"], traced["in_segment"], traced["on_list"]) == (
        connector_id,
        False,
        False,
    )
    assert [r["action"] for r in traced["runs"]] == ["removed", "added"]
    answer = api.get(f"/v1/members/{quote(leaver, safe='')}")
    assert answer.status_code == 200 and answer.json() == doc

    on_list = api.get(f"/v1/members/{quote(member, safe='')}").json()
    [traced] = on_list["connectors"]
    assert (traced["in_segment"], traced["on_list"], traced["ledger"]["confirmed"]) == (
        True,
        True,
        True,
    )
    assert [r["action"] for r in traced["runs"]] == ["added"]
    shown = cli("members", "trace", member, check=True).stdout
    assert f"connector {connector_id}" in shown and "added" in shown
    assert klaviyo.api_key not in shown + json.dumps(doc) + json.dumps(on_list)

    nobody = f"nobody-{tag}"
    assert cli("members", "trace", nobody, check=True).stdout == f"no trace of {nobody}\n"
    assert api.get(f"/v1/members/{nobody}").json()["connectors"] == []


def test_an_ill_formed_user_id_is_refused(api: httpx.Client) -> None:
    for bad in ("", "a\tb", "x" * 1001):
        refused = cli("members", "trace", bad)
        assert refused.returncode == 2 and refused.stdout == ""
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "user_id must be" in refused.stderr
    for path in ("/v1/members/", "/v1/members/a%0Ab", f"/v1/members/{'x' * 1001}"):
        answer = api.get(path)
        assert answer.status_code == 422, path
        assert "user_id must be" in answer.json()["error"]
