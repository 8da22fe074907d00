"""``connectors history`` shows every run of a connector, newest first; the API the newest 100."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text

from segops_sync.db.session import session_scope
from tests.integration.helpers import Klaviyo, cli_json, create_connector, new_segment


@pytest.fixture
def api(redis_stack_env: dict[str, str], api_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {redis_stack_env['SEGOPS_API_TOKEN']}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=30) as client:
        yield client


def test_history_lists_every_run_newest_first_and_the_api_the_newest_100(
    klaviyo: Klaviyo, api: httpx.Client
) -> None:
    connector_id = create_connector(klaviyo, new_segment(), activate=False)
    with session_scope() as s:  # 101 finished runs, an hour apart
        s.execute(
            text(
                "INSERT INTO sync_runs (id, connector_id, trigger, status, phase, started_at, "
                "finished_at) SELECT :c || '-run-' || i, :c, 'resync', 'succeeded', 'finished', "
                "now() - interval '1 hour' * i, now() - interval '1 hour' * i "
                "FROM generate_series(1, 101) i"
            ),
            {"c": connector_id},
        )
    expected = [f"{connector_id}-run-{i}" for i in range(1, 102)]
    assert [run["id"] for run in cli_json("connectors", "history", connector_id)] == expected
    answer = api.get(f"/v1/connectors/{connector_id}/runs")
    assert answer.status_code == 200, answer.text
    assert [run["id"] for run in answer.json()["runs"]] == expected[:100]
