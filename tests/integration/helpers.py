"""Small tools for the integration tests: the CLI as a person runs it, waiting for syncs,
reading the Klaviyo simulator back, serving processes, and reading Redis as text."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import redis
from sqlalchemy import func, select, text

from segops_sync.db.models import Connector, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import SimRequest, Simulator
from segops_sync.sync.runs import wait_until_idle

# Every Klaviyo key the session handed to the product, for the key check (test_no_key_in_clear).
KNOWN_KEYS: set[str] = set()


@dataclass
class Klaviyo:
    sim: Simulator
    base_url: str
    account: str
    api_key: str
    list_id: str

    @classmethod
    def new(cls, sim: Simulator, base_url: str) -> Klaviyo:
        account = sim.create_account()
        return cls(
            sim, base_url, account, sim.create_key(account), sim.create_list(account, "Synced")
        )

    def requests(self) -> list[SimRequest]:
        """The requests this account received: a session's simulator serves every test."""
        return [r for r in self.sim.requests() if r.account == self.account]

    def members(self) -> dict[str, Any]:
        """The list as user_ids: email for email profiles, external_id otherwise."""
        out: dict[str, Any] = {}
        for p in self.sim.list_members(self.list_id):
            user_id = p.external_id or p.email
            assert user_id is not None, f"profile {p.id} has neither identifier"
            out[user_id] = p
        return out


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """``segops-sync …`` in a fresh process, exactly as a person runs it."""
    # Key-shaped arguments only: a bare "pk_" (a malformed-key test) is no secret to hunt for.
    KNOWN_KEYS.update(a for a in args if a.startswith("pk_") and len(a) > 8)
    raw = subprocess.run(
        [sys.executable, "-m", "segops_sync.cli", *args],
        env={**os.environ, **(env or {})},
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=120,
    )
    result = subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode()
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"segops-sync {' '.join(args)} exited {result.returncode}: {result.stderr}"
        )
    return result


def cli_json(*args: str) -> Any:
    result = cli(*args, "--json", check=True)
    return json.loads(result.stdout)


def create_connector(
    k: Klaviyo,
    segment: str,
    *,
    activate: bool = True,
    api_key: str | None = None,
    list_id: str | None = None,
    verify: bool = True,
) -> str:
    args = [
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        segment,
        "--list-id",
        list_id or k.list_id,
        "--api-key",
        api_key or k.api_key,
    ]
    if not verify:
        args.append("--no-verify")
    doc = cli_json(*args)
    if activate:
        cli("connectors", "activate", doc["id"], check=True)
    return str(doc["id"])


def new_segment() -> str:
    return f"seg-{uuid.uuid4().hex[:8]}"


def recompute(segment: str, members: list[str], tmp_path: Path) -> None:
    path = tmp_path / f"{segment}-{uuid.uuid4().hex[:6]}.txt"
    path.write_text("".join(f"{m}\n" for m in members))
    cli("recompute", segment, "--members", str(path), check=True)


def run_count(connector_id: str) -> int:
    with session_scope() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(SyncRun)
                .where(SyncRun.connector_id == connector_id)
            )
            or 0
        )


def wait_idle(connector_id: str, *, runs_at_least: int = 1, timeout: float = 90) -> Connector:
    """Wait until the connector has finished at least N runs and has nothing running or queued."""
    settled = wait_until_idle(connector_id, finished_at_least=runs_at_least, timeout=timeout)
    with session_scope() as s:
        if settled is None:
            states = s.execute(
                select(SyncRun.status, func.count())
                .where(SyncRun.connector_id == connector_id)
                .group_by(SyncRun.status)
            ).all()
            raise AssertionError(f"connector {connector_id} did not settle: runs {dict(states)}")
        connector = s.get_one(Connector, connector_id)
        s.expunge(connector)
        return connector


def latest_run(connector_id: str) -> SyncRun:
    with session_scope() as s:
        run = s.scalars(
            select(SyncRun)
            .where(SyncRun.connector_id == connector_id)
            .order_by(SyncRun.started_at.desc())
            .limit(1)
        ).one()
        s.expunge(run)
        return run


def quiet_all_connectors(timeout: float = 120) -> None:
    """Deactivates every connector in the session's database and waits for their runs to end,
    so a test that counts rows sees only what it did itself, not an earlier module's resyncs."""
    import time

    from sqlalchemy import update

    from segops_sync.states import ConnectorStatus, RunStatus

    with session_scope() as s:
        s.execute(update(Connector).values(status=ConnectorStatus.INACTIVE, resync_requested=False))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            running = s.scalar(
                select(SyncRun.id).where(SyncRun.status == RunStatus.RUNNING).limit(1)
            )
        if running is None:
            return
        time.sleep(0.5)
    raise AssertionError(f"runs still running {timeout:.0f} s after every connector was stopped")


def row_counts() -> dict[str, int]:
    tables = (
        "connectors",
        "segment_members",
        "identities",
        "connector_members",
        "sync_runs",
        "sync_batches",
        "mass_removal_approvals",
    )
    with session_scope() as s:
        return {t: int(s.scalar(text(f"SELECT count(*) FROM {t}")) or 0) for t in tables}


def expected_identity(user_id: str, identified: dict[str, str]) -> tuple[str | None, str | None]:
    from segops_sync.sync.inputs.identity import identity_for

    return identity_for(user_id, identified.get(user_id))


@contextlib.contextmanager
def serving(
    cmd: list[str], url: str, *, env: dict[str, str] | None = None, name: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` started with ``env`` over ours, once ``url`` answers; terminated on leaving.

    A process that exits, or does not answer within 60 s, fails with the end of its stderr."""
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    what = name or str(cmd[:4])
                    raise AssertionError(f"{what} did not start: {err[-2000:]}") from None
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _decoded(value: bytes | str) -> Iterator[str]:
    """A Redis value as text, plus the base64 message bodies Celery and kombu wrap inside."""
    textual = _text(value)
    yield textual
    try:
        doc = json.loads(textual)
    except ValueError:
        return
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            body = item.get("body")
            if isinstance(body, str):
                decoded = None
                with contextlib.suppress(ValueError):
                    decoded = base64.b64decode(body, validate=True).decode(
                        "utf-8", errors="replace"
                    )
                if decoded is not None:
                    yield decoded
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def redis_texts(url: str, prefix: str) -> Iterator[str]:
    """Every key under ``prefix`` in the Redis at ``url`` and every value it holds, as text,
    message bodies decoded: what a search for data that must not be there reads."""
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        yield _text(key)
        kind = _text(client.type(key))
        values: Iterable[bytes | str] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [v for pair in client.hgetall(key).items() for v in pair]
        elif kind == "zset":
            values = cast(list[bytes], client.zrange(key, 0, -1))
        elif kind == "set":
            values = list(client.smembers(key))
        for value in values:
            yield from _decoded(value)


@contextlib.contextmanager
def simulated_fleet(
    sim: Simulator,
    segops_env: dict[str, str],
    pg_server_url: str,
    workdir: Path,
    label: str,
    *,
    workers: int = 1,
    overrides: dict[str, str] | None = None,
) -> Iterator[str]:
    """The simulator served over HTTP and ``workers`` worker processes of 2 (the first with
    beat) in an environment of their own that points at it, time-scaled as the simulator is;
    yields the simulator's base URL and stops everything afterwards."""
    from segops_sync.klaviyo_sim import SimulatorServer
    from tests.conftest import isolated_env
    from tests.integration.conftest import WorkerProcess

    server = SimulatorServer(sim)
    server.start()
    settings = {
        "SEGOPS_KLAVIYO_BASE_URL": server.base_url,
        "SEGOPS_KLAVIYO_TIME_SCALE": str(sim.time_scale),
        **(overrides or {}),
    }
    try:
        with isolated_env(segops_env, pg_server_url, label, **settings) as env:
            started = [
                WorkerProcess(env, workdir, concurrency=2, beat=i == 0) for i in range(workers)
            ]
            try:
                for worker in started:
                    worker.start()
                yield server.base_url
            finally:
                for worker in started:
                    worker.stop()
    finally:
        server.stop()
