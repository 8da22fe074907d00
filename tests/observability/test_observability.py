"""Observability pieces without a broker: labels, log filters, JSON lines, signatures, and
metrics summed over forked processes."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from segops_sync.klaviyo.endpoints import Endpoint, endpoint_for
from segops_sync.observability import logging as obs_log
from segops_sync.observability.webhooks import alert_body, signature
from segops_sync.sync.alerts import next_event


def test_concrete_paths_map_to_their_endpoint_template() -> None:
    assert endpoint_for("GET", "/api/profiles") is Endpoint.GET_PROFILES
    assert endpoint_for("get", "/api/profiles/") is Endpoint.GET_PROFILES
    assert endpoint_for("POST", "/api/profile-bulk-import-jobs") is Endpoint.CREATE_BULK_IMPORT_JOB
    assert (
        endpoint_for("GET", "/api/profile-bulk-import-jobs/abc%2F1/import-errors")
        is Endpoint.GET_BULK_IMPORT_ERRORS
    )
    assert endpoint_for("DELETE", "/api/lists/AbC123/relationships/profiles") is (
        Endpoint.REMOVE_LIST_PROFILES
    )
    assert endpoint_for("GET", "/proxy/api/lists/AbC123") is Endpoint.GET_LIST
    assert endpoint_for("GET", "/api/other") is None
    assert endpoint_for("PUT", "/api/profiles") is None


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger("obs-test")
    root.handlers, root.propagate, root.level = [handler], False, logging.DEBUG

    def label(method: str, url: object) -> str:
        endpoint = endpoint_for(method, getattr(url, "path", ""))
        return endpoint.value if endpoint else obs_log.host_only(method, url)

    obs_log.install([root], json_format=True, labeler=label)
    obs_log.clear()
    try:
        yield root, stream
    finally:
        obs_log.clear()
        root.handlers = []


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_httpx_request_urls_become_templates(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    root, stream = captured
    # exactly how httpx logs a request, with a lookup filter full of member data
    url = httpx.URL(
        "http://127.0.0.1:9/api/profiles",
        params={"filter": 'any(external_id,["ext-771","ext-772"])', "page[size]": "100"},
    )
    httpx_logger = root.getChild("httpx")  # propagates to the handler, like httpx -> root
    httpx_logger.name = "httpx"
    httpx_logger.info('HTTP Request: %s %s "%s %d %s"', "GET", url, "HTTP/1.1", 200, "OK")
    webhook = httpx.URL("https://hooks.example.com/T0KEN/secret?x=1")
    httpx_logger.info('HTTP Request: %s %s "%s %d %s"', "POST", webhook, "HTTP/1.1", 200, "OK")
    out = stream.getvalue()
    assert "ext-771" not in out and "ext-772" not in out and "T0KEN" not in out
    first, second = _lines(stream)
    assert first["message"] == 'HTTP Request: GET /api/profiles "HTTP/1.1 200 OK"'
    assert second["message"] == 'HTTP Request: POST https://hooks.example.com/… "HTTP/1.1 200 OK"'


def test_json_lines_carry_the_context_and_mask_member_data(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    root, stream = captured
    root.info("before any run")
    obs_log.bind(connector_id="c-1", run_id="r-1")
    root.info(
        "saw %s and %s and pk_abcdefghijklmnop",
        "Jane.Doe+x@Example.com",
        "+14155552671",
        extra={"data": {"kwargs": {"traits": {"email": "jane@example.com"}}}},
    )
    with obs_log.bound(run_id="r-2"):
        root.warning("inner")
    root.error("boom", exc_info=ValueError("bad"))
    before, masked, inner, error = _lines(stream)
    assert set(before) >= {"ts", "level", "logger", "message"}
    assert "run_id" not in before and "connector_id" not in before
    assert masked["run_id"] == "r-1" and masked["connector_id"] == "c-1"
    assert masked["level"] == "INFO" and masked["logger"] == "obs-test"
    assert "data" not in masked
    text = json.dumps(masked)
    for secret in ("Jane.Doe", "Example.com", "4155552671", "abcdefghijklmnop", "jane@"):
        assert secret not in text
    assert inner["run_id"] == "r-2" and inner["connector_id"] == "c-1"
    pool = logging.getLogger("obs-test.pool")
    # Celery's pool at DEBUG prints each task's message, kwargs and all
    pool.debug(
        "TaskPool: Apply %s (args:%s kwargs:%s)",
        "<function fast_trace_task>",
        "('segops.context_identified', 'id', {}, b'[[], {\"user_id\": \"opaque-991\"}]')",
        "{}",
    )
    assert "opaque-991" not in stream.getvalue()
    assert error["level"] == "ERROR" and "ValueError" in str(error["exc_info"])
    datetime.fromisoformat(str(before["ts"]))


def test_alert_body_and_signature() -> None:
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    body = alert_body(
        "sync.failed",
        connector_id="c",
        run_id="r",
        status="failed",
        error="key pk_abcdefghijklmnop was revoked",
        at=at,
    )
    doc = json.loads(body)
    assert doc == {
        "event": "sync.failed",
        "connector_id": "c",
        "run_id": "r",
        "status": "failed",
        "error": "key [redacted] was revoked",
        "at": "2026-11-30T12:00:00+00:00",
    }
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature(body, "s3cret") == f"sha256={expected}"
    with pytest.raises(ValueError):
        alert_body("sync.bogus", connector_id="c", run_id="r", status="x", error=None, at=at)


@pytest.mark.parametrize(
    ("status", "last", "event"),
    [
        ("failed", None, "sync.failed"),
        ("failed", "sync.failed", "sync.failed"),
        ("held", "sync.recovered", "sync.held"),
        ("succeeded", None, None),
        ("succeeded", "sync.recovered", None),
        ("succeeded", "sync.failed", "sync.recovered"),
        ("succeeded", "sync.held", "sync.recovered"),
        ("succeeded", "sync.degraded", "sync.recovered"),
    ],
)
def test_which_alert_a_closed_run_sends(status: str, last: str | None, event: str | None) -> None:
    assert next_event(status, last) == event


@pytest.mark.parametrize(
    ("status", "last", "event"),
    [
        ("succeeded", None, "sync.degraded"),
        ("succeeded", "sync.recovered", "sync.degraded"),
        ("succeeded", "sync.failed", "sync.degraded"),  # said once: recovered comes when clean
        ("succeeded", "sync.degraded", "sync.degraded"),  # every degraded run, like failed ones
    ],
)
def test_a_degraded_success_sends_degraded_whatever_came_before(
    status: str, last: str | None, event: str
) -> None:
    assert next_event(status, last, degraded=True) == event


def _child_work(n: int) -> None:
    from segops_sync.observability import metrics

    metrics.count_run("c-1", "succeeded", seconds=1.0, added=n, removed=0, rejected=0)
    metrics.count_klaviyo_answer("POST /api/profile-bulk-import-jobs", 202)
    os._exit(0)


def test_metrics_are_summed_over_forked_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import values
    from prometheus_client.parser import text_string_to_metric_families

    from segops_sync.observability import metrics
    from segops_sync.observability.metrics import MULTIPROC_ENV, MetricsNode, forget_metrics

    # this process recorded before (other tests): prepare() must not let that hide the files
    metrics.count_klaviyo_answer("POST /api/profile-bulk-import-jobs", 202)

    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    node = MetricsNode()
    directory = node.prepare()
    try:
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_child_work, args=(n,)) for n in (10, 20, 30)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert len(os.listdir(directory)) >= 3  # one file per process and kind
        from segops_sync.embedded import free_port

        port = free_port()
        node.serve(port, "127.0.0.1")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        node.close()
        os.environ.pop(MULTIPROC_ENV, None)
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        forget_metrics()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert (
        samples[("segops_members_synced_total", (("action", "added"), ("connector_id", "c-1")))]
        == 60
    )
    assert (
        samples[("segops_sync_runs_total", (("connector_id", "c-1"), ("status", "succeeded")))] == 3
    )
    assert samples[("segops_sync_run_seconds_count", (("connector_id", "c-1"),))] == 3
    key = (
        "segops_klaviyo_requests_total",
        (("code", "202"), ("endpoint", "POST /api/profile-bulk-import-jobs")),
    )
    assert samples[key] == 3
    assert not os.path.exists(directory)


def test_alert_settings_need_the_secret_with_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from segops_sync.config import ConfigError, Settings, load_settings

    monkeypatch.setenv("SEGOPS_ALERT_WEBHOOK_URL", "https://hooks.example.com/segops")
    monkeypatch.delenv("SEGOPS_ALERT_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ConfigError, match="SEGOPS_ALERT_WEBHOOK_SECRET"):
        Settings().require_alert_settings()
    monkeypatch.setenv("SEGOPS_ALERT_WEBHOOK_SECRET", "s3cret")
    settings = Settings()
    settings.require_alert_settings()
    assert settings.alerts_enabled and "s3cret" not in repr(settings)
    monkeypatch.setenv("SEGOPS_ALERT_WEBHOOK_URL", "hooks.example.com")
    with pytest.raises(ConfigError, match="SEGOPS_ALERT_WEBHOOK_URL"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [("SEGOPS_METRICS_PORT", "0"), ("SEGOPS_METRICS_PORT", "http"), ("SEGOPS_LOG_FORMAT", "xml")],
)
def test_malformed_observability_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from segops_sync.config import ConfigError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_progress_lines_off_a_terminal() -> None:
    from segops_sync.follow import line
    from segops_sync.sync.progress import Progress

    started = datetime(2026, 11, 30, tzinfo=UTC)
    assert line(Progress("r1", started, 0, 0), None) == "sync r1: 0/0 members, planning"
    assert line(Progress("r1", started, 1200, 5000), None) == "sync r1: 1,200/5,000 members (24%)"
    assert (
        line(Progress("r1", started, 1200, 5000), 100.0)
        == "sync r1: 1,200/5,000 members (24%), 100/s, ETA 38s"
    )
    assert Progress("r1", started, 3, 4).as_json() == {"done": 3, "total": 4}
