"""Members Klaviyo accepted are ours even when recording them failed.

Real worker processes, PostgreSQL, Redis and the Klaviyo simulator over HTTP, in a database and
a key prefix of each test's own (the runs left failed on purpose must not meet another test's).

* ``test_leavers_go_after_the_ledger_write_failed``: a worker whose ledger write fails right
  after Klaviyo accepted the members (a completed bulk job; a list write answered on the direct
  path) fails the run; the members then leave the segment and a healthy worker's next sync
  removes them from the list.
* ``test_verify_counts_members_of_a_failed_run_as_ours``: after such a failed run, members who
  left the segment without a sync are reported as extra but not foreign, and ``verify
  --repair`` (no ``--remove-extra``) removes them.
* ``test_verify_repair_removes_extra_members_our_history_added``: members this connector added
  to a list, forgotten by its ledger when the connector moved to another list and back, are
  removed by ``verify --repair`` without ``--remove-extra``; a foreign profile stays.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator
from segops_sync.sync.inputs.membership import replace_membership
from tests.conftest import isolated_env
from tests.integration.helpers import (
    cli,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    run_count,
    wait_idle,
)
from tests.integration.test_crash_recovery import Stack, _assert_list_exact, _members, stack

pytestmark = pytest.mark.slow

# The bulk path: no direct adds, even for a few members.
PATHS = {"bulk": {"SEGOPS_DIRECT_ADD_LIMIT": "0"}, "direct": {}}

# What tests.integration.ledger_fault raises. Not imported from there: importing that module
# applies the fault to this process, and every later test in it would meet it.
FAULT = "injected fault: the ledger write after Klaviyo accepted the members failed"


@pytest.fixture
def iso_env(segops_env: dict[str, str], pg_server_url: str) -> Iterator[dict[str, str]]:
    with isolated_env(segops_env, pg_server_url, "accepted") as env:
        yield env


def _failed_run_after_klaviyo_accepted(
    st: Stack, members: list[str], tmp_path: Path
) -> tuple[str, str]:
    """A connector whose first sync fails right after Klaviyo accepted every member (the
    ledger write fails in a worker of its own, stopped afterwards); (connector id, segment)."""
    faulty = st.start_worker(extra_args=["-I", "tests.integration.ledger_fault"])
    segment = new_segment()
    connector_id = create_connector(st.klaviyo, segment)
    recompute(segment, members, tmp_path)
    wait_idle(connector_id, timeout=120)
    run = latest_run(connector_id)
    assert run.status == "failed", f"{run.status}: {run.error}"
    assert FAULT in faulty.log(), "the fault was not injected"
    _assert_list_exact(st.klaviyo, members)  # Klaviyo did accept them all
    faulty.stop()
    return connector_id, segment


@pytest.mark.parametrize("path", sorted(PATHS))
def test_leavers_go_after_the_ledger_write_failed(
    iso_env: dict[str, str], tmp_path: Path, path: str
) -> None:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim, **PATHS[path]) as st:
        members = _members(f"acc-{path}", 40)
        connector_id, segment = _failed_run_after_klaviyo_accepted(st, members, tmp_path)
        runs = run_count(connector_id)

        st.start_worker()
        stay = members[5:15] + members[25:]  # both kinds of identity leave
        recompute(segment, stay, tmp_path)
        wait_idle(connector_id, runs_at_least=runs + 1, timeout=120)
        run = latest_run(connector_id)
        assert run.status == "succeeded", f"{run.status}: {run.error}"
        assert run.removed == len(members) - len(stay)
        _assert_list_exact(st.klaviyo, stay)
        verified = cli("connectors", "verify", connector_id, "--json")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["extra"] == 0


def test_verify_counts_members_of_a_failed_run_as_ours(
    iso_env: dict[str, str], tmp_path: Path
) -> None:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim, **PATHS["bulk"]) as st:
        members = _members("doubt", 30)
        connector_id, segment = _failed_run_after_klaviyo_accepted(st, members, tmp_path)
        st.start_worker()
        stay = members[:10] + members[20:]
        # The segment shrinks without a sync (its recompute message is lost): only the
        # read-back can tell that ten members on the list are ours and in no segment.
        path = tmp_path / f"{uuid.uuid4().hex}.txt"
        path.write_text("".join(f"{m}\n" for m in stay))
        with session_scope() as s:
            replace_membership(s, segment, str(path))

        report = cli("connectors", "verify", connector_id)
        assert report.returncode == 1, report.stdout + report.stderr
        assert "10 extra (0 never added by this connector)" in report.stdout, report.stdout

        repaired = cli("connectors", "verify", connector_id, "--repair", "--json")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        doc = json.loads(repaired.stdout)
        assert (doc["extra"], doc["removed"]) == (10, 10), doc
        _assert_list_exact(st.klaviyo, stay)


def test_verify_repair_removes_extra_members_our_history_added(
    iso_env: dict[str, str], tmp_path: Path
) -> None:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    with stack(iso_env, tmp_path, sim) as st:
        k = st.klaviyo
        st.start_worker()
        segment = new_segment()
        connector_id = create_connector(k, segment)
        members = _members("hist", 30)
        recompute(segment, members, tmp_path)
        wait_idle(connector_id, timeout=120)
        _assert_list_exact(k, members)

        # The connector moves to another list (its ledger starts empty there), members leave
        # the segment meanwhile, and it moves back: the first list still has them, and the
        # ledger no longer knows it put them there.
        other = sim.create_list(k.account, "Elsewhere")
        # Each step starts a run; counted before it, so that a run not yet opened is waited for.
        runs = run_count(connector_id)
        cli("connectors", "update", connector_id, "--list-id", other, check=True)
        wait_idle(connector_id, runs_at_least=runs + 1, timeout=120)
        stay = members[:5] + members[15:25]
        runs = run_count(connector_id)
        recompute(segment, stay, tmp_path)
        wait_idle(connector_id, runs_at_least=runs + 1, timeout=120)
        runs = run_count(connector_id)
        cli("connectors", "update", connector_id, "--list-id", k.list_id, check=True)
        wait_idle(connector_id, runs_at_least=runs + 1, timeout=120)
        assert len(k.members()) == len(members)
        # and someone puts a profile of their own on the list in Klaviyo's UI
        foreign = "someone-else@example.com"
        sim.add_to_list(k.list_id, [sim.add_profile(k.account, email=foreign)])

        report = cli("connectors", "verify", connector_id)
        assert report.returncode == 1, report.stdout + report.stderr
        assert "16 extra (1 never added by this connector)" in report.stdout, report.stdout

        # --repair alone removes ours; the foreign profile needs --remove-extra (exit 1)
        repaired = cli("connectors", "verify", connector_id, "--repair", "--json")
        assert repaired.returncode == 1, repaired.stdout + repaired.stderr
        doc = json.loads(repaired.stdout)
        assert (doc["extra"], doc["removed"]) == (16, 15), doc
        _assert_list_exact(k, [*stay, foreign])
