"""The long-running commands start as docs/contract.md#package-and-processes says, and refuse to start without settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from segops_sync.embedded import free_port
from segops_sync.klaviyo import KlaviyoClient


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "segops_sync.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_klaviyo_sim_serves_a_ready_account() -> None:
    port = free_port()
    proc = _spawn("klaviyo-sim", "--port", str(port))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert fields["base_url"] == f"http://127.0.0.1:{port}"
        with KlaviyoClient(fields["api_key"], fields["base_url"]) as client:
            assert client.get_list(fields["list_id"]).id == fields["list_id"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_api_serves_with_a_token(stack_env: dict[str, str]) -> None:
    port = free_port()
    proc = _spawn("api", "--port", str(port))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/v1/connectors",
                    headers={"Authorization": f"Bearer {stack_env['SEGOPS_API_TOKEN']}"},
                )
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
                time.sleep(0.2)
        assert answer.status_code == 200 and "connectors" in answer.json()
        # a member trace: the access log names the route, never the member
        for member in ("ada.lovelace@example.com", "user-7f3a9c"):
            traced = httpx.get(
                f"http://127.0.0.1:{port}/v1/members/{member}",
                headers={"Authorization": f"Bearer {stack_env['SEGOPS_API_TOKEN']}"},
            )
            assert traced.status_code == 200, traced.text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    logged = out + err
    assert logged.count('"GET /v1/members/{user_id} HTTP/1.1" 200') == 2, logged
    assert "ada.lovelace" not in logged and "7f3a9c" not in logged


def test_api_refuses_to_start_without_a_token(stack_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "segops_sync.cli", "api", "--port", str(free_port())],
        env={**os.environ, "SEGOPS_API_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "SEGOPS_API_TOKEN" in result.stderr


def test_worker_refuses_to_start_without_a_database_url(stack_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SEGOPS_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "segops_sync", "worker", "-c", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "SEGOPS_DATABASE_URL" in result.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        {"SEGOPS_LIMITER_REDIS_URL": "amqp://guest:guest@127.0.0.1:5672//"},
        # RabbitMQ broker, no limiter URL: the result backend's Redis would do, but not this one
        {
            "SEGOPS_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
            "SEGOPS_RESULT_BACKEND": "db+postgresql://nobody@127.0.0.1/none",
            "SEGOPS_LIMITER_REDIS_URL": None,
        },
    ],
)
def test_worker_refuses_a_limiter_url_that_is_not_redis(
    stack_env: dict[str, str], overrides: dict[str, str | None]
) -> None:
    env = {**os.environ, **{k: v for k, v in overrides.items() if v is not None}}
    for key in [k for k, v in overrides.items() if v is None]:
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "segops_sync", "worker", "-c", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    # ours is one line (as root, Celery adds its own warning about running as root)
    ours = [ln for ln in result.stderr.splitlines() if "SEGOPS_" in ln]
    assert len(ours) == 1 and ours[0].startswith("segops-sync: SEGOPS_LIMITER_REDIS_URL"), (
        result.stderr
    )
    assert "guest:guest" not in result.stderr, "credentials echoed"
