"""``connectors plan ID [--json]`` as a person runs it: what the next sync would do, from the
planner and the cost model, without a request to Klaviyo or a row written."""

from __future__ import annotations

from sqlalchemy import text

from segops_sync.config import get_settings
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import Endpoint
from segops_sync.sync.approvals import approve_mass_removal
from segops_sync.sync.costs import Delta, expected_requests, goes_direct
from tests.integration.helpers import (
    Klaviyo,
    cli,
    cli_json,
    create_connector,
    new_segment,
    row_counts,
)


def _with_delta(klaviyo: Klaviyo, *, stay: int, joiners: int, leavers: int) -> str:
    """An inactive connector (nothing syncs it) whose ledger holds ``stay`` members still in
    the segment and ``leavers`` who left it (half with a known profile id, half by external
    id), and whose segment gained ``joiners``."""
    segment = new_segment()
    connector_id = create_connector(klaviyo, segment, activate=False)
    kept = [f"k{i:04d}" for i in range(stay)]
    gone = [f"g{i:04d}" for i in range(leavers)]
    with session_scope() as s:
        s.execute(
            text("INSERT INTO segment_members SELECT :s, unnest(CAST(:m AS text[]))"),
            {"s": segment, "m": kept + [f"j{i:04d}" for i in range(joiners)]},
        )
        s.execute(
            text(
                "INSERT INTO connector_members (connector_id, user_id, external_id, profile_id) "
                "SELECT :c, u, u, CASE WHEN u LIKE 'g%' AND right(u, 1) IN ('0', '2', '4', '6', '8') "
                "THEN NULL ELSE 'P' || u END "
                "FROM unnest(CAST(:m AS text[])) u"
            ),
            {"c": connector_id, "m": kept + gone},
        )
    return connector_id


def test_plan_json_reports_counts_guard_and_requests_without_touching_anything(
    stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    connector_id = _with_delta(klaviyo, stay=300, joiners=40, leavers=200)
    requests_before, rows_before = len(klaviyo.sim.requests()), row_counts()

    doc = cli_json("connectors", "plan", connector_id)

    assert len(klaviyo.sim.requests()) == requests_before
    assert row_counts() == rows_before
    assert (doc["joiners"], doc["leavers"], doc["updates"], doc["adds"]) == (40, 200, 0, 40)
    assert doc["guard"]["verdict"] == "passes" and doc["guard"]["held"] is False
    direct = goes_direct(40, get_settings())
    assert doc["path"] == ("direct" if direct else "bulk")
    # the even-numbered leavers' ids are unknown: 100 external-id lookups, one call a 100
    leavers = [f"g{i:04d}" for i in range(200)]
    keys = [(u, "external_id" if i % 2 == 0 else "id") for i, u in enumerate(leavers)]
    expected = expected_requests(Delta.of(40, keys), direct=direct).by_endpoint  # type: ignore[arg-type]
    assert doc["requests"] == {str(e): n for e, n in expected.items()}
    assert doc["requests"][str(Endpoint.GET_PROFILES)] == 1
    assert doc["unknown"]["leaver_ids_unknown"] == 100
    assert doc["unknown"]["rejections"] is None
    duration = doc["duration"]
    assert duration["job_seconds_assumed"] > 0
    assert duration["seconds_at_headroom"] >= duration["seconds_at_published_limits"] >= 0


def test_plan_text_says_what_it_knows_and_what_it_cannot(
    stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    connector_id = _with_delta(klaviyo, stay=2, joiners=3, leavers=10)  # 10 of 12 leave: held
    result = cli("connectors", "plan", connector_id, check=True)
    out = result.stdout
    assert "3 to add" in out and "10 to remove" in out
    assert "mass-removal guard: held:" in out and "--allow-mass-removal" in out
    assert str(Endpoint.REMOVE_LIST_PROFILES) in out
    assert "expected duration: at least" in out and "bulk import job in" in out
    assert "Klaviyo will reject" in out and "5 leavers' profile ids are not known yet" in out
    assert result.stderr == ""

    with session_scope() as s:  # as `connectors resync --allow-mass-removal --by ops` records
        approve_mass_removal(s, connector_id, by="ops")
    out = cli("connectors", "plan", connector_id, check=True).stdout
    assert "would hold, but the approval by ops" in out
    doc = cli_json("connectors", "plan", connector_id)
    assert doc["guard"]["verdict"] == "approved" and doc["guard"]["approval"]["by"] == "ops"
