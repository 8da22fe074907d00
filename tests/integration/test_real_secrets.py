"""Real secrets only: workers, beat, Flower and the API refuse to start on a
placeholder secret or a short API token, in one line naming the variable; and failed API
sign-ins from one client address are throttled (429 with Retry-After after 10 in a minute)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from segops_sync.embedded import free_port
from tests.integration.helpers import serving


def _command(process: str, workdir: Path) -> list[str]:
    celery = [sys.executable, "-m", "celery", "-A", "segops_sync"]
    return {
        "worker": [*celery, "worker", "-c", "1", "--without-gossip", "--without-mingle"],
        "beat": [*celery, "beat", "--schedule", str(workdir / "celerybeat-schedule")],
        "flower": [*celery, "flower", "--address=127.0.0.1", f"--port={free_port()}"],
        "api": [sys.executable, "-m", "segops_sync.cli", "api", "--port", str(free_port())],
    }[process]


def _with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://segops:{password}@{rest.rsplit('@', 1)[-1]}"


def _refusal(process: str, env: dict[str, str], workdir: Path) -> tuple[str, str]:
    """Start ``process`` with ``env``; it must exit 2 on its own. Returns (our line, stderr)."""
    result = subprocess.run(
        _command(process, workdir),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,  # an old build starts and serves: the timeout fails the test
        cwd=workdir,
    )
    assert result.returncode == 2, (process, result.returncode, result.stderr[-2000:])
    # ours is one line (as root, Celery adds its own multi-line warning about running as root)
    ours = [ln for ln in result.stderr.splitlines() if ln.startswith("segops-sync:")]
    assert len(ours) == 1, result.stderr
    if process == "api":
        assert result.stderr.strip() == ours[0]
    return ours[0], result.stderr


PROCESSES = ["worker", "beat", "flower", "api"]


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SEGOPS_SECRET_KEY", "REPLACE-ME-secret-key"),
        ("SEGOPS_SECRET_KEY", "a-real-looking-new-key-0123456789,ChangeMe-old-key"),  # a ring
        ("SEGOPS_API_TOKEN", "x" * 20),  # real-looking, but shorter than 32 characters
        ("SEGOPS_DATABASE_URL", "changeme"),  # the password inside the URL
    ],
)
def test_each_process_refuses_a_placeholder_secret_naming_it(
    stack_env: dict[str, str], tmp_path: Path, process: str, variable: str, value: str
) -> None:
    if variable == "SEGOPS_DATABASE_URL":
        value = _with_password(stack_env["SEGOPS_DATABASE_URL"], value)
    line, stderr = _refusal(process, {variable: value}, tmp_path)
    assert line.startswith(f"segops-sync: {variable} "), line
    for part in value.split(","):
        assert part not in stderr, "the refused value is echoed"


@pytest.mark.parametrize(
    ("process", "variable", "value"),
    [
        ("beat", "SEGOPS_BROKER_URL", "redis://:Change-Me@127.0.0.1:6379/0"),
        ("worker", "SEGOPS_RESULT_BACKEND", "redis://:<redis-password>@127.0.0.1:6379/1"),
        ("api", "SEGOPS_LIMITER_REDIS_URL", "redis://:replace_me@127.0.0.1:6379/2"),
        ("worker", "SEGOPS_ALERT_WEBHOOK_SECRET", "CHANGEME"),
        ("flower", "FLOWER_BASIC_AUTH", "ops:changeme"),
        ("flower", "FLOWER_BASIC_AUTH", "REPLACE-ME-user:REPLACE-ME-password"),
        ("flower", "FLOWER_BASIC_AUTH", "ops:"),
        ("api", "SEGOPS_API_TOKEN", "<your-api-token-of-at-least-32-characters>"),
    ],
)
def test_every_kind_of_secret_is_checked(
    stack_env: dict[str, str], tmp_path: Path, process: str, variable: str, value: str
) -> None:
    env = {variable: value}
    if variable == "SEGOPS_ALERT_WEBHOOK_SECRET":
        env["SEGOPS_ALERT_WEBHOOK_URL"] = "http://127.0.0.1:9/alerts"
    line, stderr = _refusal(process, env, tmp_path)
    assert line.startswith(f"segops-sync: {variable} "), line
    assert value not in stderr


# -- the sign-in throttle ------------------------------------------------------------------


@pytest.fixture
def api_process(stack_env: dict[str, str]) -> Iterator[str]:
    """``segops-sync api`` as deployed (production throttle), with Redis keys of its own."""
    port = free_port()
    prefix = f"{stack_env['SEGOPS_REDIS_KEY_PREFIX']}throttle-{uuid.uuid4().hex[:8]}:"
    url = f"http://127.0.0.1:{port}"
    with serving(
        [sys.executable, "-m", "segops_sync.cli", "api", "--port", str(port)],
        f"{url}/activations",
        env={"SEGOPS_REDIS_KEY_PREFIX": prefix},
        name="the API",
    ):
        yield url


def _client(url: str, source: str) -> httpx.Client:
    """A client whose peer address, as the API sees it, is ``source`` (in 127.0.0.0/8)."""
    return httpx.Client(
        base_url=url, transport=httpx.HTTPTransport(local_address=source), timeout=30
    )


def test_failed_sign_ins_from_one_address_are_throttled(
    stack_env: dict[str, str], api_process: str
) -> None:
    good = {"Authorization": f"Bearer {stack_env['SEGOPS_API_TOKEN']}"}
    with _client(api_process, "127.0.0.1") as guesser, _client(api_process, "127.0.0.2") as ops:
        assert guesser.get("/v1/connectors", headers=good).status_code == 200
        for n in range(10):
            wrong = {"Authorization": f"Bearer guess-{n}-{'x' * 40}"}
            assert guesser.get("/v1/connectors", headers=wrong).status_code == 401, n
        answer = guesser.get("/v1/connectors", headers={"Authorization": "Bearer guess-10"})
        assert answer.status_code == 429
        assert 1 <= int(answer.headers["retry-after"]) <= 60
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["error"] and "guess" not in answer.text
        # during the lockout, the right token from that address waits too...
        locked = guesser.get("/v1/connectors", headers=good)
        assert locked.status_code == 429 and "retry-after" in locked.headers
        # ...but not the token holder on another address, nor its own wrong tries' count
        assert ops.get("/v1/connectors", headers=good).status_code == 200
        assert ops.get("/v1/connectors", headers={"Authorization": "Bearer no"}).status_code == 401
        assert ops.get("/v1/connectors", headers=good).status_code == 200
        # the page holds no data and needs no sign-in: it is not locked
        assert guesser.get("/activations").status_code == 200
