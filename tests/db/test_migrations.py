"""The Alembic migrations create exactly what the models describe, and upgrade is repeatable."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from segops_sync.cli import main
from segops_sync.config import normalise_database_url
from segops_sync.db.models import Base


def test_migrations_match_the_models(segops_env: dict[str, str]) -> None:
    engine = create_engine(normalise_database_url(segops_env["SEGOPS_DATABASE_URL"]))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_db_upgrade_is_safe_to_run_again(
    segops_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "upgrade"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_segment_members_is_exactly_the_contract(segops_env: dict[str, str]) -> None:
    engine = create_engine(normalise_database_url(segops_env["SEGOPS_DATABASE_URL"]))
    insp = inspect(engine)
    columns = {
        c["name"]: (str(c["type"]), c["nullable"]) for c in insp.get_columns("segment_members")
    }
    assert columns == {"segment_id": ("TEXT", False), "user_id": ("TEXT", False)}
    assert insp.get_pk_constraint("segment_members")["constrained_columns"] == [
        "segment_id",
        "user_id",
    ]
    engine.dispose()


def test_the_databases_check_constraints_list_exactly_the_state_names(
    segops_env: dict[str, str],
) -> None:
    """The migrations spell the states out; the enums in states.py must agree with them."""
    import re

    from segops_sync.states import AlertEvent, BatchKind, BatchStatus, ConnectorStatus, RunStatus

    engine = create_engine(normalise_database_url(segops_env["SEGOPS_DATABASE_URL"]))
    insp = inspect(engine)
    expected = {
        ("connectors", "ck_connectors_status"): ConnectorStatus,
        ("sync_runs", "ck_sync_runs_status"): RunStatus,
        ("sync_batches", "ck_sync_batches_status"): BatchStatus,
        ("sync_batches", "ck_sync_batches_kind"): BatchKind,
        ("alert_deliveries", "ck_alert_deliveries_event"): AlertEvent,
    }
    for (table, name), enum in expected.items():
        (check,) = [c for c in insp.get_check_constraints(table) if c["name"] == name]
        assert set(re.findall(r"'([^']+)'", check["sqltext"])) == {m.value for m in enum}, name
    engine.dispose()


def test_deleting_a_run_deletes_its_items(segops_env: dict[str, str]) -> None:
    """Items carry no per-row foreign key (it doubled the cost of writing them); a statement
    trigger deletes them with their run, also when the run goes with its connector."""
    import uuid

    from sqlalchemy import text

    from segops_sync.db.session import session_scope

    connector, runs = str(uuid.uuid4()), [str(uuid.uuid4()), str(uuid.uuid4())]
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO connectors (id, type, segment_id, list_id, api_key_encrypted, "
                "api_key_hint, status) VALUES (:c, 'klaviyo', 'seg-del', 'AbC123', '\\x00', 'pk_…', 'inactive')"
            ),
            {"c": connector},
        )
        for run in runs:
            s.execute(
                text(
                    "INSERT INTO sync_runs (id, connector_id, trigger, status, phase, started_at) "
                    "VALUES (:r, :c, 'resync', 'failed', 'finished', now())"
                ),
                {"r": run, "c": connector},
            )
            s.execute(
                text(
                    "INSERT INTO sync_batch_items (run_id, user_id, kind, seq) "
                    "SELECT :r, 'u' || g, 'add', 0 FROM generate_series(1, 3) g"
                ),
                {"r": run},
            )

    def items() -> int:
        with session_scope() as s:
            return int(
                s.scalar(
                    text("SELECT count(*) FROM sync_batch_items WHERE run_id = ANY(:r)"),
                    {"r": runs},
                )
                or 0
            )

    assert items() == 6
    with session_scope() as s:
        s.execute(text("DELETE FROM sync_runs WHERE id = :r"), {"r": runs[0]})
    assert items() == 3
    with session_scope() as s:
        s.execute(text("DELETE FROM connectors WHERE id = :c"), {"c": connector})
    assert items() == 0


def test_deleting_a_connector_deletes_its_ledger_and_a_late_confirm_writes_nothing(
    segops_env: dict[str, str],
) -> None:
    """The ledger carries no per-row foreign key (45 % of confirming a million members): a
    statement trigger deletes it with its connector, and a confirm that comes after the
    connector is gone writes no orphan rows."""
    import uuid

    from sqlalchemy import text

    from segops_sync.db.session import session_scope
    from segops_sync.sync.ledger import adopt_foreign, confirm_added

    connector, other = str(uuid.uuid4()), str(uuid.uuid4())
    run = str(uuid.uuid4())
    with session_scope() as s:
        for c in (connector, other):
            s.execute(
                text(
                    "INSERT INTO connectors (id, type, segment_id, list_id, api_key_encrypted, "
                    "api_key_hint, status) VALUES (:c, 'klaviyo', 'seg-led', 'AbC123', '\\x00', "
                    "'pk_…', 'inactive')"
                ),
                {"c": c},
            )
            s.execute(
                text(
                    "INSERT INTO connector_members (connector_id, user_id) "
                    "SELECT :c, 'u' || g FROM generate_series(1, 3) g"
                ),
                {"c": c},
            )
        s.execute(
            text(
                "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, outcome) "
                "VALUES (:r, 'late', 'add', 0, 'added')"
            ),
            {"r": run},
        )

    def ledger(c: str) -> int:
        with session_scope() as s:
            return int(
                s.scalar(
                    text("SELECT count(*) FROM connector_members WHERE connector_id = :c"),
                    {"c": c},
                )
                or 0
            )

    with session_scope() as s:
        s.execute(text("DELETE FROM connectors WHERE id = :c"), {"c": connector})
    assert (ledger(connector), ledger(other)) == (0, 3)
    with session_scope() as s:
        confirm_added(s, connector, run, ["late"])
        assert (
            adopt_foreign(
                s,
                connector,
                "SELECT 'p1' AS profile_id",
                {},
                "foreign:",
            )
            == 0
        )
    assert ledger(connector) == 0
    with session_scope() as s:  # the same calls for a connector that exists do write
        confirm_added(s, other, run, ["late"])
        assert (
            adopt_foreign(
                s,
                other,
                "SELECT 'p1' AS profile_id",
                {},
                "foreign:",
            )
            == 1
        )
    assert ledger(other) == 5
    with session_scope() as s:
        s.execute(text("DELETE FROM sync_batch_items WHERE run_id = :r"), {"r": run})
        s.execute(text("DELETE FROM connectors WHERE id = :c"), {"c": other})
    assert ledger(other) == 0


def test_connections_never_prepare_statements(segops_env: dict[str, str]) -> None:
    """A generic plan cached while the ledger was empty turned a churn's anti-join into a
    million-row seq scan per member (minutes per batch): every statement is planned afresh."""
    from segops_sync.db.session import make_engine

    engine = make_engine(segops_env["SEGOPS_DATABASE_URL"])
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None and driver.prepare_threshold is None
    engine.dispose()
