"""When a succeeded run is ``sync.degraded`` (sync/alerts.py), and what its body says: no broker,
no database (the run rows are built in memory)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from segops_sync.config import ConfigError, Settings, load_settings
from segops_sync.db.models import SyncRun
from segops_sync.observability.webhooks import alert_body
from segops_sync.states import RunStatus
from segops_sync.sync.alerts import degradation, expected_seconds

START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _run(
    *,
    status: RunStatus = RunStatus.SUCCEEDED,
    planned_adds: int = 1000,
    planned_removes: int = 0,
    added: int = 1000,
    rejected: int = 0,
    seconds: float = 1.0,
) -> SyncRun:
    return SyncRun(
        id="r-1",
        connector_id="c-1",
        status=status,
        planned_adds=planned_adds,
        planned_removes=planned_removes,
        added=added,
        removed=0,
        rejected=rejected,
        started_at=START,
        finished_at=START + timedelta(seconds=seconds),
    )


def _settings(**overrides: object) -> Settings:
    return Settings.model_validate(overrides)


def test_a_run_rejecting_more_than_the_share_is_degraded_with_its_figures() -> None:
    found = degradation(_run(added=900, rejected=100), _settings())
    assert found is not None and found.reason == "rejected_share"
    assert found.body() == {
        "reason": "rejected_share",
        "rejected": 100,
        "handled": 1000,
        "share": 0.1,
        "threshold": 0.05,
    }
    assert found.summary == "100 of 1000 members rejected by Klaviyo (10.0%, above 5.0%)"


def test_a_share_at_the_threshold_or_below_is_not_degraded() -> None:
    assert degradation(_run(added=950, rejected=50), _settings()) is None
    assert degradation(_run(added=999, rejected=1), _settings()) is None
    assert degradation(_run(added=0, rejected=0, planned_adds=0), _settings()) is None
    stricter = _settings(alert_rejected_share=0.01)
    assert degradation(_run(added=980, rejected=20), stricter) is not None


def test_a_run_far_slower_than_its_expected_time_is_degraded() -> None:
    settings = _settings()
    # 20,000 adds: two bulk jobs, whose expected time is dominated by the assumed job time
    expected = expected_seconds(20_000, 0, settings)
    assert expected > 0
    run = _run(planned_adds=20_000, added=20_000, seconds=3 * expected + 100)
    found = degradation(run, settings)
    assert found is not None and found.reason == "slow"
    assert found.body()["expected_seconds"] == round(expected, 1)
    assert found.body()["factor"] == 3.0
    assert degradation(_run(planned_adds=20_000, added=20_000, seconds=expected), settings) is None


def test_a_tiny_run_is_never_slow_by_a_few_seconds() -> None:
    settings = _settings()
    assert expected_seconds(5, 0, settings) < 1  # five synchronous upserts: ~0 s expected
    assert degradation(_run(planned_adds=5, added=5, seconds=20), settings) is None
    found = degradation(_run(planned_adds=5, added=5, seconds=61), settings)
    assert found is not None and found.reason == "slow"


def test_removals_count_towards_the_expected_time() -> None:
    settings = _settings()
    assert expected_seconds(0, 500_000, settings) > expected_seconds(0, 1_000, settings)


def test_failed_and_held_runs_are_never_degraded() -> None:
    for status in (RunStatus.FAILED, RunStatus.HELD):
        assert degradation(_run(status=status, rejected=900, added=100), _settings()) is None


def test_the_degraded_body_carries_the_figures_and_other_bodies_are_unchanged() -> None:
    at = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    figures = {"reason": "slow", "seconds": 400.0, "expected_seconds": 31.0}
    doc = json.loads(
        alert_body(
            "sync.degraded",
            connector_id="c",
            run_id="r",
            status="succeeded",
            error="the run took 400s",
            at=at,
            degraded=figures,
        )
    )
    assert doc["event"] == "sync.degraded" and doc["degraded"] == figures
    plain = json.loads(
        alert_body("sync.failed", connector_id="c", run_id="r", status="failed", error=None, at=at)
    )
    assert "degraded" not in plain


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SEGOPS_ALERT_REJECTED_SHARE", "0"),
        ("SEGOPS_ALERT_REJECTED_SHARE", "1.5"),
        ("SEGOPS_ALERT_REJECTED_SHARE", "five percent"),
        ("SEGOPS_ALERT_SLOW_FACTOR", "1"),
        ("SEGOPS_ALERT_SLOW_FACTOR", "-3"),
        ("SEGOPS_ALERT_SLOW_FACTOR", "x3"),
    ],
)
def test_a_malformed_threshold_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{variable} is malformed"):
        load_settings()


def test_the_thresholds_default_to_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGOPS_ALERT_REJECTED_SHARE", raising=False)
    monkeypatch.delenv("SEGOPS_ALERT_SLOW_FACTOR", raising=False)
    settings = Settings()
    assert (settings.alert_rejected_share, settings.alert_slow_factor) == (0.05, 3.0)
