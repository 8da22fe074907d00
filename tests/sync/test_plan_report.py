"""The plan of a connector's next sync (sync/plan_report.py) on the real PostgreSQL, without a
broker or Klaviyo: its counts, guard verdict and costs come from the planner and the cost model,
and making it writes nothing."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, text

from segops_sync.config import get_settings
from segops_sync.connectors import create_connector
from segops_sync.db.models import MassRemovalApproval
from segops_sync.db.session import session_scope
from segops_sync.errors import InputError
from segops_sync.klaviyo import Endpoint
from segops_sync.states import ConnectorStatus
from segops_sync.sync.approvals import approve_mass_removal
from segops_sync.sync.costs import Delta, expected_requests, floor_seconds, goes_direct
from segops_sync.sync.plan_report import ASSUMED_JOB_SECONDS, plan_report

KEY = "pk_" + "p" * 30
Row = tuple[str, str | None, str | None, str | None]  # user_id, email, external_id, profile_id


def _tables() -> dict[str, int]:
    names = ("connector_members", "sync_runs", "sync_batches", "mass_removal_approvals")
    with session_scope() as s:
        return {t: int(s.scalar(text(f"SELECT count(*) FROM {t}")) or 0) for t in names}


def _connector(
    segment: list[str], ledger: list[tuple[str, str | None, str | None, str | None]]
) -> str:
    """A connector on a new segment of ``segment``, its ledger holding ``ledger`` as
    (user_id, email, external_id, profile_id), every row confirmed."""
    segment_id = f"plan-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        connector, _ = create_connector(
            s, get_settings(), segment_id=segment_id, list_id="PlAn12", api_key=KEY, verify=False
        )
        connector.status = ConnectorStatus.ACTIVE
        s.flush()
        if segment:
            s.execute(
                text("INSERT INTO segment_members SELECT :s, unnest(CAST(:m AS text[]))"),
                {"s": segment_id, "m": segment},
            )
        for user_id, email, external_id, profile_id in ledger:
            s.execute(
                text(
                    "INSERT INTO connector_members (connector_id, user_id, email, external_id, "
                    "profile_id) VALUES (:c, :u, :e, :x, :p)"
                ),
                {"c": connector.id, "u": user_id, "e": email, "x": external_id, "p": profile_id},
            )
        return connector.id


@pytest.fixture(autouse=True)
def _env(segops_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import _reset_settings

    monkeypatch.delenv("SEGOPS_DIRECT_ADD_LIMIT", raising=False)
    _reset_settings()


def test_plan_counts_members_and_prices_leavers_by_what_the_ledger_knows() -> None:
    stay = [f"s{i:04d}" for i in range(400)]
    joiners = [f"j{i:04d}" for i in range(250)]
    ledger: list[Row] = [(u, None, u, f"P{u}") for u in stay]
    ledger += [(f"la{i:03d}", None, None, f"PID{i}") for i in range(150)]  # id known
    ledger += [(f"lb{i:03d}", f"b{i}@x.io", f"ext{i}", None) for i in range(120)]  # external id
    ledger += [(f"lc{i:03d}", f"c{i}@x.io", None, None) for i in range(30)]  # email only
    ledger += [(f"ld{i:03d}", None, None, None) for i in range(5)]  # nothing to look up by
    connector_id = _connector(stay + joiners, ledger)
    before = _tables()

    with session_scope() as s:
        report = plan_report(s, connector_id, get_settings())

    assert _tables() == before, "a plan wrote something"
    assert (report.joiners, report.leavers, report.updates) == (250, 305, 0)
    assert (report.leavers_by_id, report.leavers_by_external_id) == (150, 120)
    assert (report.leavers_by_email, report.leavers_unfindable) == (30, 5)
    assert report.ids_unknown == 155
    assert report.guard.verdict == "passes" and not report.guard.held
    settings = get_settings()
    assert report.direct == goes_direct(250, settings)
    known = [(u, "id") for u, *_ in ledger[400:550]]
    known += [(u, "external_id") for u, *_ in ledger[550:670]]
    known += [(u, "email") for u, *_ in ledger[670:700]]
    of = Delta.of(250, known)  # type: ignore[arg-type]
    delta = Delta(250, of.removes + 5, of.lookup_calls, of.list_lookup_calls)
    expected = expected_requests(delta, direct=report.direct).by_endpoint
    assert report.requests == {str(e): n for e, n in expected.items()}
    assert report.requests[str(Endpoint.GET_PROFILES)] == 2  # 120 external ids, 100 a call
    assert report.requests[str(Endpoint.GET_LIST_MEMBERS)] == 1  # 30 emails
    assert report.requests[str(Endpoint.REMOVE_LIST_PROFILES)] == 1
    assert report.seconds_at_published_limits == floor_seconds(
        delta, job_seconds=ASSUMED_JOB_SECONDS, direct=report.direct
    )
    assert report.seconds_at_headroom == floor_seconds(
        delta,
        job_seconds=ASSUMED_JOB_SECONDS,
        direct=report.direct,
        headroom=settings.limiter_headroom,
    )
    doc = report.as_json()
    assert doc["unknown"]["rejections"] is None
    assert doc["unknown"]["leaver_ids_unknown"] == 155
    assert doc["requests_total"] == sum(expected.values())


def test_plan_says_the_guard_holds_and_that_a_waiting_approval_would_lift_it() -> None:
    ledger: list[Row] = [(f"gone{i}", None, None, f"P{i}") for i in range(10)]
    connector_id = _connector([], ledger)
    with session_scope() as s:
        held = plan_report(s, connector_id, get_settings())
    assert held.leavers == 10
    assert held.guard.verdict == "held" and held.guard.held
    assert held.guard.reason and "--allow-mass-removal" in held.guard.reason
    # the cost of the removal is still told: what an approval would let through
    assert held.requests == {str(Endpoint.REMOVE_LIST_PROFILES): 1}

    with session_scope() as s:
        approve_mass_removal(s, connector_id, by="plan-test")
    with session_scope() as s:
        approved = plan_report(s, connector_id, get_settings())
    assert approved.guard.verdict == "approved" and not approved.guard.held
    assert approved.guard.approved_by == "plan-test"
    with session_scope() as s:  # the plan left the approval for the run
        taken = s.scalar(
            select(MassRemovalApproval.run_id).where(
                MassRemovalApproval.connector_id == connector_id
            )
        )
    assert taken is None


def test_plan_of_an_unknown_connector_is_bad_input() -> None:
    with session_scope() as s, pytest.raises(InputError):
        plan_report(s, str(uuid.uuid4()), get_settings())
