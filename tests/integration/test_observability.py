"""Metrics, JSON logs and alerts of a worker of 4 processes, on the real stack.

One worker serves the whole module (its log is checked at the end, line by line):
metrics summed over processes, the signed alert sequence with a revoked and a restored key and a
receiver that is down for a while, the progress of a running run, and no member data in any
log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pty
import re
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from segops_sync.celery import SEGOPS_QUEUE, configure
from segops_sync.config import get_settings
from segops_sync.db.session import session_scope
from segops_sync.embedded import free_port
from segops_sync.klaviyo_sim import Simulator, SimulatorServer
from segops_sync.sync.inputs.identity import record_identity
from tests.conftest import isolated_env
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    KNOWN_KEYS,
    Klaviyo,
    cli,
    cli_json,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    wait_idle,
)

CONNECTOR_KEYS = {
    "id",
    "type",
    "segment_id",
    "list_id",
    "status",
    "last_synced_at",
    "last_error",
    "api_key",
    "traits",
    "opt_in_process",
}


# -- a webhook receiver that can be taken down ----------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int
    got: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    # the next alert of each of these connectors is answered 503 (and kept in ``refused``)
    refuse_once: set[str] = field(default_factory=set)
    refused: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/segops"

    def start(self) -> None:
        got, refuse_once, refused = self.got, self.refuse_once, self.refused

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                received = Received(dict(self.headers.items()), self.rfile.read(length))
                connector_id = json.loads(received.body).get("connector_id")
                if connector_id in refuse_once:
                    refuse_once.discard(connector_id)
                    refused.append(received)
                    self.send_response(503)
                else:
                    got.append(received)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@dataclass
class Obs:
    env: dict[str, str]
    sim: Simulator
    base_url: str
    worker: WorkerProcess
    receiver: Receiver
    metrics_url: str
    secret: str
    # every member identifier the module sent, for the log check at the end
    identifiers: set[str] = field(default_factory=set)

    def klaviyo(self) -> Klaviyo:
        return Klaviyo.new(self.sim, self.base_url)


@pytest.fixture(scope="module")
def obs(
    segops_env: dict[str, str], pg_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Obs]:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    server = SimulatorServer(sim)
    server.start()
    receiver = Receiver(free_port())
    receiver.start()
    metrics_port = free_port()
    secret = secrets.token_hex(16)
    overrides = {
        "SEGOPS_KLAVIYO_BASE_URL": server.base_url,
        "SEGOPS_METRICS_PORT": str(metrics_port),
        "SEGOPS_METRICS_HOST": "127.0.0.1",
        "SEGOPS_LOG_FORMAT": "json",
        "SEGOPS_ALERT_WEBHOOK_URL": receiver.url,
        "SEGOPS_ALERT_WEBHOOK_SECRET": secret,
        "SEGOPS_PROGRESS_INTERVAL": "0.5",
        # Bulk jobs only: they return no profile ids, so removals look profiles up by email
        # and external_id, and those URLs (member data in filters) are what the logs must hide.
        "SEGOPS_DIRECT_ADD_LIMIT": "0",
    }
    try:
        with isolated_env(segops_env, pg_server_url, "obs", **overrides) as env:
            worker = WorkerProcess(env, tmp_path_factory.mktemp("obs-worker"), concurrency=4)
            worker.start()
            try:
                yield Obs(
                    env,
                    sim,
                    server.base_url,
                    worker,
                    receiver,
                    f"http://127.0.0.1:{metrics_port}/metrics",
                    secret,
                )
            finally:
                worker.stop()
                # the shutdown notices too: every line the worker wrote is JSON
                for line in worker.log().splitlines():
                    json.loads(line)
    finally:
        receiver.stop()
        server.stop()


def _send(
    task: str, *, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None
) -> None:
    """Publish as a producer does, with this module's settings (its own Redis key prefix)."""
    from celery import Celery

    producer = Celery("obs-test-producer")
    configure(producer, get_settings())
    try:
        producer.send_task(task, args=args, kwargs=kwargs, queue=SEGOPS_QUEUE)
    finally:
        producer.close()


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _members(prefix: str, n_email: int, n_opaque: int) -> list[str]:
    token = uuid.uuid4().hex[:6]
    return [f"{prefix}.{token}.{i}@example.com" for i in range(n_email)] + [
        f"{prefix}-{token}-ext{i}" for i in range(n_opaque)
    ]


def _eventually(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# -- 1. metrics ------------------------------------------------------------------------------


def test_metrics_are_summed_over_the_worker_processes(obs: Obs, tmp_path: Path) -> None:
    k = obs.klaviyo()
    seg_a, seg_b = new_segment(), new_segment()
    members_a = _members("ma", 120, 80)
    members_b = _members("mb", 100, 0)
    identified = {u: f"id.{uuid.uuid4().hex[:8]}@example.com" for u in members_a[120:160]}
    with session_scope() as s:  # what `segops-sync identify` does, without 40 processes
        for user_id, email in identified.items():
            record_identity(s, user_id, email)
    obs.identifiers |= set(members_a) | set(members_b) | set(identified.values())
    a = create_connector(k, seg_a)
    b = create_connector(k, seg_b)
    # Both recomputes at once, and Klaviyo answering slowly: the two syncs overlap, so several
    # pool processes do the work
    _add_members_quietly(seg_a, members_a)
    _add_members_quietly(seg_b, members_b)
    obs.sim.set_faults(latency=0.3)
    try:
        for segment in (seg_a, seg_b):
            _send(
                "segops.recompute_finished",
                kwargs={"segment_id": segment, "recompute_id": str(uuid.uuid4())},
            )
        wait_idle(a)
        wait_idle(b)
    finally:
        obs.sim.set_faults()
    # then 50 leave A: removals look profiles up by email and external_id (filters in URLs)
    leavers = members_a[:25] + members_a[120:145]
    recompute(seg_a, [m for m in members_a if m not in leavers], tmp_path)
    assert wait_idle(a, runs_at_least=2).status == "active"
    assert (latest_run(a).added, latest_run(a).removed) == (0, 50)

    def counted() -> dict[Any, float]:
        s = _samples(obs.metrics_url)
        assert s[("segops_members_synced_total", (("action", "added"), ("connector_id", a)))] == 200
        assert (
            s[("segops_members_synced_total", (("action", "removed"), ("connector_id", a)))] == 50
        )
        assert s[("segops_members_synced_total", (("action", "added"), ("connector_id", b)))] == 100
        assert s[("segops_sync_runs_total", (("connector_id", a), ("status", "succeeded")))] == 2
        assert s[("segops_sync_run_seconds_count", (("connector_id", a),))] == 2
        return s

    samples = _eventually(counted)
    # the node's samples came from several pool processes, and /metrics summed them
    messages = "\n".join(json.loads(line)["message"] for line in obs.worker.log().splitlines())
    match = re.search(r"summed over the pool processes' samples in (\S+)", messages)
    assert match, "the worker says where its samples are"
    pids = {
        m.group(1) for m in re.finditer(r"_(\d+)\.db$", "\n".join(os.listdir(match.group(1))), re.M)
    }
    assert len(pids) >= 2, pids
    # Klaviyo answers counted by the workers (whichever process made them) equal what the
    # simulator saw, endpoint by endpoint; the CLI's live checks (GET /api/lists/{id}) aside.
    seen: dict[tuple[str, str], int] = {}
    for r in obs.sim.requests():
        if r.endpoint is not None and r.endpoint.value != "GET /api/lists/{id}" and r.status:
            key = (r.endpoint.value, str(r.status))
            seen[key] = seen.get(key, 0) + 1
    counted_requests = {
        (dict(labels)["endpoint"], dict(labels)["code"]): int(v)
        for (name, labels), v in samples.items()
        if name == "segops_klaviyo_requests_total"
    }
    assert counted_requests == seen
    assert ("GET /api/profiles", "200") in seen, "removals looked profiles up"
    for (_name, labels), _ in samples.items():
        endpoint = dict(labels).get("endpoint")
        if endpoint is not None:
            assert re.fullmatch(r"(GET|POST|DELETE|PATCH) /api/[a-z\-/{}]+", endpoint), endpoint


# -- 2. alerts -------------------------------------------------------------------------------


def _verified(obs: Obs, got: Received) -> dict[str, Any]:
    expected = hmac.new(obs.secret.encode(), got.body, hashlib.sha256).hexdigest()
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert headers["x-segops-signature"] == f"sha256={expected}"
    assert headers["content-type"] == "application/json"
    doc: dict[str, Any] = json.loads(got.body)
    assert set(doc) == {"event", "connector_id", "run_id", "status", "error", "at"}
    assert datetime.fromisoformat(doc["at"]).tzinfo is not None
    return doc


def test_signed_alerts_failed_recovered_held_recovered(obs: Obs, tmp_path: Path) -> None:
    k = obs.klaviyo()
    segment = new_segment()
    members = _members("al", 4, 0)
    obs.identifiers |= set(members)
    connector = create_connector(k, segment)
    before = len(obs.receiver.got)

    def received(n: int) -> list[dict[str, Any]]:
        mine = [_verified(obs, g) for g in obs.receiver.got[before:]]
        mine = [d for d in mine if d["connector_id"] == connector]
        assert len(mine) == n, mine
        return mine

    recompute(segment, members[:2], tmp_path)
    wait_idle(connector)  # a success with no failure before: no alert
    # a revoked key: the run fails
    obs.sim.revoke_key(k.api_key)
    recompute(segment, members[:3], tmp_path)
    assert wait_idle(connector, runs_at_least=2).status == "error"
    failed_run = latest_run(connector).id
    _eventually(lambda: received(1))
    # the key is replaced while the receiver is down: the recovery alert waits for it
    obs.receiver.stop()
    fresh = obs.sim.create_key(k.account)
    # the update itself starts the resync: no recompute needed
    cli("connectors", "update", connector, "--api-key", fresh, check=True)
    assert wait_idle(connector, runs_at_least=3).status == "active"
    recovered_run = latest_run(connector).id

    def tried_while_down() -> None:
        with session_scope() as s:
            attempts, delivered = s.execute(
                text(
                    "SELECT attempts, delivered_at FROM alert_deliveries "
                    "WHERE run_id = :r AND event = 'sync.recovered'"
                ),
                {"r": recovered_run},
            ).one()
        assert attempts >= 2 and delivered is None

    _eventually(tried_while_down)
    obs.receiver.start()
    _eventually(lambda: received(2), timeout=60)
    # a mass removal is held, then allowed
    recompute(segment, members[3:], tmp_path)
    wait_idle(connector, runs_at_least=4)
    held_run = latest_run(connector)
    assert held_run.status == "held"
    _eventually(lambda: received(3))
    cli("connectors", "resync", connector, "--allow-mass-removal", "--wait", check=True)
    allowed_run = latest_run(connector).id
    events = _eventually(lambda: received(4))

    assert [(d["event"], d["run_id"], d["status"]) for d in events] == [
        ("sync.failed", failed_run, "failed"),
        ("sync.recovered", recovered_run, "succeeded"),
        ("sync.held", held_run.id, "held"),
        ("sync.recovered", allowed_run, "succeeded"),
    ]
    assert "revoked" in events[0]["error"] and events[2]["error"] == held_run.error
    assert events[1]["error"] is None and events[3]["error"] is None
    bodies = b"".join(g.body for g in obs.receiver.got)
    for key in (k.api_key, fresh):
        assert key.encode() not in bodies and key[3:].encode() not in bodies

    # a redelivered close or delivery sends nothing again
    with session_scope() as s:
        ids = list(
            s.scalars(
                text("SELECT id FROM alert_deliveries WHERE connector_id = :c"), {"c": connector}
            )
        )
    assert len(ids) == 4

    def finished(task: str) -> int:
        return sum(
            1
            for line in obs.worker.log().splitlines()
            if (doc := json.loads(line)).get("task_name") == task and "succeeded" in doc["message"]
        )

    closes, deliveries = finished("segops.finish_run"), finished("segops.deliver_alert")
    _send("segops.finish_run", args=[failed_run])
    for delivery_id in ids:
        _send("segops.deliver_alert", args=[delivery_id])

    def all_ran() -> None:
        assert finished("segops.finish_run") > closes
        assert finished("segops.deliver_alert") >= deliveries + len(ids)

    _eventually(all_ran)
    assert len(received(4)) == 4

    # an alert whose message was lost (a crash between commit and publish): beat's sweeper
    # sends it
    lost_body = json.dumps(
        {
            "event": "sync.failed",
            "connector_id": connector,
            "run_id": held_run.id,
            "status": "failed",
            "error": "lost",
            "at": datetime.now().astimezone().isoformat(),
        }
    ).encode()
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO alert_deliveries (run_id, connector_id, event, body, created_at) "
                "VALUES (:r, :c, 'sync.failed', :b, now() - interval '1 minute')"
            ),
            {"r": held_run.id, "c": connector, "b": lost_body},
        )
    assert _eventually(lambda: received(5))[-1]["error"] == "lost"


def _fresh_signature(obs: Obs, got: Received) -> tuple[str, int]:
    """The replay-proof headers, checked as a receiver does: (delivery id, timestamp)."""
    headers = {k.lower(): v for k, v in got.headers.items()}
    delivery, timestamp = headers["x-segops-delivery"], headers["x-segops-timestamp"]
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", delivery), delivery
    assert re.fullmatch(r"[1-9][0-9]*", timestamp), timestamp
    signed = timestamp.encode() + b"." + got.body
    expected = hmac.new(obs.secret.encode(), signed, hashlib.sha256).hexdigest()
    assert headers["x-segops-signature-256"] == f"t={timestamp},v1={expected}"
    # today's header is still there, exactly as before
    plain = hmac.new(obs.secret.encode(), got.body, hashlib.sha256).hexdigest()
    assert headers["x-segops-signature"] == f"sha256={plain}"
    return delivery, int(timestamp)


def test_alerts_carry_a_delivery_id_and_a_timestamped_signature(obs: Obs, tmp_path: Path) -> None:
    k = obs.klaviyo()
    segment = new_segment()
    members = _members("replay", 3, 0)
    obs.identifiers |= set(members)
    connector = create_connector(k, segment)
    recompute(segment, members[:2], tmp_path)
    wait_idle(connector)

    def mine(answers: list[Received], n: int) -> list[Received]:
        found = [g for g in answers if json.loads(g.body)["connector_id"] == connector]
        assert len(found) == n, found
        return found

    # the failure alert's first attempt is answered 503; its retry is delivered
    obs.receiver.refuse_once.add(connector)
    obs.sim.revoke_key(k.api_key)
    recompute(segment, members, tmp_path)
    assert wait_idle(connector, runs_at_least=2).status == "error"
    (first_try,) = _eventually(lambda: mine(obs.receiver.refused, 1))
    (retry,) = _eventually(lambda: mine(obs.receiver.got, 1), timeout=60)
    # a second alert: the recovery
    cli("connectors", "update", connector, "--api-key", obs.sim.create_key(k.account), check=True)
    assert wait_idle(connector, runs_at_least=3).status == "active"
    recovered = _eventually(lambda: mine(obs.receiver.got, 2))[1]

    first_id, first_at = _fresh_signature(obs, first_try)
    retry_id, retry_at = _fresh_signature(obs, retry)
    recovered_id, _ = _fresh_signature(obs, recovered)
    assert retry.body == first_try.body
    assert retry_id == first_id, "a retry of an alert keeps its delivery id"
    assert recovered_id != first_id, "each alert has a delivery id of its own"
    # each attempt is signed when it is sent: never before the run ended, a retry not before
    # the first try
    ended = int(datetime.fromisoformat(json.loads(retry.body)["at"]).timestamp())
    assert ended <= first_at <= retry_at
    # and every alert of the module has one id, used by no other alert
    ids: dict[tuple[str, str], set[str]] = {}
    for got in obs.receiver.got + obs.receiver.refused:
        doc = json.loads(got.body)
        ids.setdefault((doc["run_id"], doc["event"]), set()).add(_fresh_signature(obs, got)[0])
    assert all(len(one) == 1 for one in ids.values()), ids
    assert len(set.union(*ids.values())) == len(ids)


# -- 3. progress -----------------------------------------------------------------------------


def _add_members_quietly(segment: str, members: list[str]) -> None:
    """Membership changes with no message: only a resync picks them up."""
    with session_scope() as s:
        s.execute(
            text("INSERT INTO segment_members (segment_id, user_id) VALUES (:s, :u)"),
            [{"s": segment, "u": m} for m in members],
        )


def test_progress_while_a_run_is_running(obs: Obs, tmp_path: Path) -> None:
    k = obs.klaviyo()
    segment = new_segment()
    connector = create_connector(k, segment)
    first = _members("pg", 300, 0)
    obs.identifiers |= set(first)
    _add_members_quietly(segment, first)
    idle = cli_json("connectors", "show", connector)
    assert set(idle) == CONNECTOR_KEYS  # no run: the contract's JSON, nothing more
    obs.sim.job_delay = 12.0  # a bulk job that takes a while, so the run is seen running
    try:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "segops_sync.cli", "connectors", "resync", connector, "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen: list[dict[str, int]] = []

        def planned() -> None:
            doc = cli_json("connectors", "show", connector)
            assert "progress" in doc and doc["progress"]["total"] == 300, doc
            seen.append(doc["progress"])

        _eventually(planned, timeout=30)
        shown = cli("connectors", "show", connector, check=True).stdout
        assert re.search(r"progress\s+\d+/300 members", shown), shown
        out, _ = waiting.communicate(timeout=120)
    finally:
        obs.sim.job_delay = 0.2
    assert waiting.returncode == 0, out
    lines = [ln for ln in out.splitlines() if re.match(r"sync \S+: [\d,]+/300 members", ln)]
    assert len(lines) >= 2, out  # one every 0.5 s (SEGOPS_PROGRESS_INTERVAL) of a 12 s+ run
    assert "added 300" in out.splitlines()[-1]
    assert 0 <= seen[0]["done"] <= 300
    assert set(cli_json("connectors", "show", connector)) == CONNECTOR_KEYS

    # on a terminal: a progress bar
    more = _members("pt", 200, 0)
    obs.identifiers |= set(more)
    _add_members_quietly(segment, more)
    obs.sim.job_delay = 6.0
    try:
        out_tty = _run_in_terminal(
            [sys.executable, "-m", "segops_sync.cli", "connectors", "resync", connector, "--wait"]
        )
    finally:
        obs.sim.job_delay = 0.2
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out_tty)
    assert "\x1b[" in out_tty, "a terminal gets rich's live display"
    assert re.search(r"\d+/200 members", plain), plain
    assert "ETA" in plain and "/s" in plain
    assert "added 200" in plain


def _run_in_terminal(cmd: list[str], timeout: float = 120) -> str:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm"}
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the command exited
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=10)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


# -- 4. the worker's log, line by line (last: it covers everything above) ---------------------


def test_zz_every_log_line_is_json_with_context_and_no_member_data(obs: Obs) -> None:
    raw = obs.worker.log()
    lines = raw.splitlines()
    assert len(lines) > 50
    records = []
    for line in lines:
        doc = json.loads(line)  # every line, Celery's own included, is one JSON object
        assert {"ts", "level", "logger", "message"} <= set(doc), line
        records.append(doc)
    loggers = {r["logger"] for r in records}
    assert any(name.startswith("celery") for name in loggers), loggers
    assert any(name == "httpx" for name in loggers), "httpx request lines are kept, redacted"
    assert any(r["message"].endswith(" ready.") for r in records)

    # the start and the end of every run, with counts, carrying the run and its connector
    runs = [r for r in records if r["logger"] == "segops_sync.runs"]
    started = [r for r in runs if r["message"].startswith("run started")]
    ended = [r for r in runs if not r["message"].startswith("run started")]
    assert started and ended
    for r in runs:
        assert r["run_id"] and r["connector_id"], r
    assert any(r.get("added") == 200 and r["message"].startswith("run succeeded") for r in ended), (
        ended
    )
    assert any("to add" in r["message"] and r.get("to_add") == 200 for r in started)
    # what runs inside a run's tasks (Celery's lines included) carries the run
    in_run_tasks = [
        r
        for r in records
        if r.get("task_name") in ("segops.add_batch", "segops.remove_batch", "segops.finish_run")
    ]
    assert in_run_tasks
    for r in in_run_tasks:
        assert r.get("run_id") and r.get("connector_id"), r

    # no member identifier, in any spelling a URL or JSON would give it, nor a key
    assert obs.identifiers
    spellings = set()
    for ident in obs.identifiers:
        spellings |= {ident, ident.lower(), quote(ident, safe=""), quote_plus(ident)}
        spellings.add(json.dumps(ident)[1:-1])
        spellings.add(ident.split("@")[0])  # the local part alone
    leaks = sorted(s for s in spellings if s in raw)
    assert leaks == [], f"member data in the worker log: {leaks[:5]}"
    for key in KNOWN_KEYS:
        assert key not in raw and key[3:] not in raw


def test_worker_refuses_an_alert_url_without_its_secret(segops_env: dict[str, str]) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k != "SEGOPS_METRICS_PORT"},
        "SEGOPS_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook",
        "SEGOPS_ALERT_WEBHOOK_SECRET": "",
        "SEGOPS_LOG_FORMAT": "text",
    }
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "segops_sync", "worker", "-c", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    # (Celery may warn first about running as root, as on the CI machine)
    ours = [ln for ln in result.stderr.splitlines() if "SEGOPS_" in ln]
    assert ours == [
        "segops-sync: SEGOPS_ALERT_WEBHOOK_SECRET is not set (it is required with "
        "SEGOPS_ALERT_WEBHOOK_URL: it signs each alert)"
    ]
