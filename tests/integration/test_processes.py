"""The long-running commands start as docs/contract.md#package-and-processes says, and refuse to start without settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx

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
    finally:
        proc.terminate()
        proc.wait(10)


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
