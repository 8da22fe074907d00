"""The real stack: a Celery worker process, the Klaviyo simulator over HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from segops_sync.embedded import EmbeddedWorker
from segops_sync.klaviyo_sim import Simulator, SimulatorServer
from tests.integration.helpers import Klaviyo


@pytest.fixture(scope="session")
def sim_server() -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(job_delay=0.2, indexing_delay=0.0)
    server = SimulatorServer(sim)
    server.start()
    try:
        yield sim, server.base_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_stack_env(
    segops_env: dict[str, str], sim_server: tuple[Simulator, str]
) -> Iterator[dict[str, str]]:
    env = {**segops_env, "SEGOPS_KLAVIYO_BASE_URL": sim_server[1]}
    os.environ["SEGOPS_KLAVIYO_BASE_URL"] = sim_server[1]
    from tests.conftest import _reset_settings

    _reset_settings()
    yield env
    os.environ.pop("SEGOPS_KLAVIYO_BASE_URL", None)


@pytest.fixture(scope="session")
def amqp_stack_env(
    redis_stack_env: dict[str, str], pg_server_url: str
) -> Iterator[dict[str, str | None]]:
    """The same stack with RabbitMQ as the broker: a vhost, a database and a key prefix of its
    own, and the default limiter URL (the result backend's Redis). Applied per test."""
    from tests.conftest import amqp_server_url, broker_overrides, delete_prefixed, scratch_database

    amqp_server_url()  # skip (or fail in CI) before creating anything
    with (
        scratch_database(pg_server_url, "amqp") as url,
        broker_overrides("amqp", "session") as on_broker,
    ):
        env: dict[str, str | None] = {
            **redis_stack_env,
            "SEGOPS_DATABASE_URL": url,
            "SEGOPS_REDIS_KEY_PREFIX": f"segops-amqp-{uuid.uuid4().hex[:8]}:",
            **on_broker,
        }
        try:
            yield env
        finally:
            delete_prefixed({k: v for k, v in env.items() if v is not None})


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> str:
    """Redis unless a module parametrizes it: ``pytest.mark.parametrize("broker", BROKERS,
    indirect=True)``."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture
def stack_env(broker: str, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """SEGOPS_* of the stack on this test's broker; the test process uses them too."""
    if broker == "redis":
        yield request.getfixturevalue("redis_stack_env")
        return
    from tests.conftest import environ

    amqp: dict[str, str | None] = request.getfixturevalue("amqp_stack_env")
    with environ(amqp):
        yield {k: v for k, v in amqp.items() if v is not None}


class WorkerProcess(EmbeddedWorker):
    """A worker of the test session; its log joins the key check (test_no_key_in_clear)."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        *,
        concurrency: int = 3,
        beat: bool = True,
        unset: list[str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__(
            env, workdir, concurrency=concurrency, beat=beat, name="test", extra_args=extra_args
        )
        for key in unset or []:  # e.g. no SEGOPS_LIMITER_REDIS_URL: the default applies
            self.env.pop(key, None)
        WORKER_LOGS.append(self.log_path)


# Every worker log of the session, for the key check (test_no_key_in_clear).
WORKER_LOGS: list[Path] = []


class FlowerProcess:
    """``celery -A segops_sync flower`` as ops run it, watching the session's workers."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        from segops_sync.embedded import free_port

        self.port = free_port()
        self.log_path = workdir / "flower.log"
        self.env = {**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> FlowerProcess:
        import httpx

        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "segops_sync",
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        import signal

        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def flower(
    redis_stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerProcess]:
    proc = FlowerProcess(redis_stack_env, tmp_path_factory.mktemp("flower")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_worker(
    redis_stack_env: dict[str, str],
    flower: FlowerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(redis_stack_env, tmp_path_factory.mktemp("worker")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def amqp_worker(
    amqp_stack_env: dict[str, str | None], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    env = {k: v for k, v in amqp_stack_env.items() if v is not None}
    unset = [k for k, v in amqp_stack_env.items() if v is None]
    proc = WorkerProcess(env, tmp_path_factory.mktemp("worker-amqp"), unset=unset).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def worker(broker: str, stack_env: dict[str, str], request: pytest.FixtureRequest) -> WorkerProcess:
    """The session's worker on this test's broker."""
    proc: WorkerProcess = request.getfixturevalue(f"{broker}_worker")
    return proc


@pytest.fixture(scope="session")
def api_url(redis_stack_env: dict[str, str]) -> Iterator[str]:
    """The HTTP API (``segops-sync api``'s app) served by uvicorn on 127.0.0.1, in this process.
    Every test of the session reaches it, some with wrong tokens on purpose (schemathesis alone,
    two per operation): the production limit of 10 a minute would lock the later tests out, so
    the throttle's limit is out of reach here; it is tested on a `segops-sync api` process
    (test_real_secrets.py)."""
    from segops_sync.api import serve_in_thread

    with serve_in_thread(
        redis_stack_env["SEGOPS_API_TOKEN"],
        redis_stack_env["SEGOPS_LIMITER_REDIS_URL"],
        redis_stack_env["SEGOPS_REDIS_KEY_PREFIX"],
    ) as url:
        yield url


@pytest.fixture
def klaviyo(sim_server: tuple[Simulator, str]) -> Klaviyo:
    """A fresh Klaviyo account with a key and a list, per test."""
    sim, base_url = sim_server
    return Klaviyo.new(sim, base_url)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _worker_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, show the worker's errors: the test alone rarely says why."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or "worker" not in request.fixturenames:
        return
    proc: WorkerProcess = request.getfixturevalue("worker")
    lines = [
        ln for ln in proc.log().splitlines() if "ERROR" in ln or "WARNING" in ln or "Error" in ln
    ]
    print("\n--- worker errors (last 40) ---\n" + "\n".join(lines[-40:]))
