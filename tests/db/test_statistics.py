"""Statistics follow bulk writes: a table changed beyond autovacuum's rule is analyzed at once."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from segops_sync.db.session import session_scope
from segops_sync.db.statistics import analyze_if_stale, planner_rows, stale_after


def test_the_rule_is_autovacuums() -> None:
    assert not stale_after(50, 0) and stale_after(51, 0)
    assert not stale_after(150, 1000) and stale_after(151, 1000)
    assert stale_after(51, -1)  # never analyzed counts as empty


def test_a_big_change_is_analyzed_and_a_small_one_is_not(segops_env: dict[str, str]) -> None:
    segment = f"stats-{uuid.uuid4().hex[:6]}"
    with session_scope() as s:
        s.execute(text("ANALYZE segment_members"))
        before = planner_rows(s, "segment_members")
        assert not analyze_if_stale(s, "segment_members", 10)
        s.execute(
            text("INSERT INTO segment_members SELECT :s, 'u' || g FROM generate_series(1, :n) g"),
            {"s": segment, "n": int(before * 0.1) + 500},
        )
        assert analyze_if_stale(s, "segment_members", int(before * 0.1) + 500)
        assert planner_rows(s, "segment_members") >= before + 500 * 0.9
        s.execute(text("DELETE FROM segment_members WHERE segment_id = :s"), {"s": segment})
        analyze_if_stale(s, "segment_members", int(before * 0.1) + 500)


def test_only_the_bulk_tables(segops_env: dict[str, str]) -> None:
    with session_scope() as s, pytest.raises(ValueError):
        analyze_if_stale(s, "connectors; DROP TABLE x", 10**9)
