"""docker-compose.yml is accepted by `docker-compose config`, with the services the
docs/operations.md describes. No Docker engine runs here, so the file is checked, not started."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("worker", "beat", "flower", "api")
SECRET_VARS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "SEGOPS_SECRET_KEY",
    "SEGOPS_API_TOKEN",
    "FLOWER_BASIC_AUTH",
)
# The variables that carry a secret, and which services get each: only what it uses.
SECRET_BEARING = (
    "SEGOPS_DATABASE_URL",
    "SEGOPS_BROKER_URL",
    "SEGOPS_RESULT_BACKEND",
    "SEGOPS_SECRET_KEY",
    "SEGOPS_API_TOKEN",
    "FLOWER_BASIC_AUTH",
)
NEEDS = {
    "migrate": {"SEGOPS_DATABASE_URL"},
    "worker": {
        "SEGOPS_DATABASE_URL",
        "SEGOPS_BROKER_URL",
        "SEGOPS_RESULT_BACKEND",
        "SEGOPS_SECRET_KEY",
    },
    "beat": {"SEGOPS_BROKER_URL"},
    "flower": {"SEGOPS_BROKER_URL", "FLOWER_BASIC_AUTH"},
    "api": {"SEGOPS_DATABASE_URL", "SEGOPS_BROKER_URL", "SEGOPS_SECRET_KEY", "SEGOPS_API_TOKEN"},
}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())  # resolves the anchors and << merges
    return dict(doc["services"])


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def test_postgres_and_redis_have_health_checks_and_volumes(services: dict[str, Any]) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    for name, data_dir in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        service = services[name]
        assert service["healthcheck"]["test"], name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert data_dir in mounts, name
        assert mounts[data_dir] in doc["volumes"], f"{name} data is not on a named volume"


def test_postgres_logs_no_row_values(services: dict[str, Any]) -> None:
    # an error's DETAIL line quotes them (a duplicate key's user id); terse drops it
    assert "log_error_verbosity=terse" in _command(services["postgres"])


def test_one_shot_migration_that_every_app_service_waits_for(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert _command(migrate) == ["segops-sync", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in (*APP_SERVICES, "demo"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_workers_exactly_one_beat_flower_and_the_api(services: dict[str, Any]) -> None:
    assert _command(services["worker"])[:4] == ["celery", "-A", "segops_sync", "worker"]
    beats = [n for n, s in services.items() if "beat" in _command(s)]
    assert beats == ["beat"], f"exactly one beat, found {beats}"
    beat = services["beat"]
    assert _command(beat)[:4] == ["celery", "-A", "segops_sync", "beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1 and "scale" not in beat
    api = _command(services["api"])
    assert api[:2] == ["segops-sync", "api"]
    assert api[api.index("--host") + 1] == "0.0.0.0"
    # published on the loopback only: a TLS proxy is the way in
    for name in ("api", "flower"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name


def test_flower_takes_basic_auth_from_the_environment(services: dict[str, Any]) -> None:
    flower = services["flower"]
    command = _command(flower)
    assert command[:4] == ["celery", "-A", "segops_sync", "flower"]
    # the password is never on the command line (ps) nor in the file
    assert not any(c.startswith("--basic-auth") or c.startswith("--basic_auth") for c in command)
    assert re.fullmatch(
        r"\$\{FLOWER_BASIC_AUTH:\?[^}]*\}", flower["environment"]["FLOWER_BASIC_AUTH"]
    )


def test_no_secret_is_written_in_the_file(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("SECRET", "TOKEN", "PASSWORD", "AUTH")):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), (name, key)
    assert "pk_" not in COMPOSE.read_text()


def test_the_simulator_and_the_demo_run_only_under_the_demo_profile(
    services: dict[str, Any],
) -> None:
    assert services["klaviyo-sim"]["profiles"] == ["demo"]
    assert services["demo"]["profiles"] == ["demo"]
    sim = _command(services["klaviyo-sim"])
    assert sim[:2] == ["segops-sync", "klaviyo-sim"] and sim[sim.index("--host") + 1] == "0.0.0.0"
    assert services["demo"]["depends_on"]["klaviyo-sim"]["condition"] == "service_healthy"
    for name in ("postgres", "redis", "migrate", *APP_SERVICES):
        assert "profiles" not in services[name], f"{name} must run without a profile"


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("SEGOPS_REQUIRE_DOCKER_COMPOSE"):
            pytest.fail("docker-compose is missing but .ci/run asked for it")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return found


def _config(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    return subprocess.run(
        [_docker_compose(), "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    env = {var: f"placeholder-{i}" for i, var in enumerate(SECRET_VARS)}
    result = _config(tmp_path, "config", "-q", env=env)
    assert result.returncode == 0, result.stderr
    # (Debian's docker-compose 1.29 lists every service whatever the profile; the structural
    # test above checks which ones the demo profile holds.)
    demo = _config(tmp_path, "--profile", "demo", "config", "--services", env=env)
    assert demo.returncode == 0, demo.stderr
    assert set(demo.stdout.split()) == {
        "postgres",
        "redis",
        "migrate",
        *APP_SERVICES,
        "klaviyo-sim",
        "demo",
    }


@pytest.mark.parametrize("missing", SECRET_VARS)
def test_docker_compose_refuses_to_run_without_each_secret(tmp_path: Path, missing: str) -> None:
    env = {var: "placeholder" for var in SECRET_VARS if var != missing}
    result = _config(tmp_path, "config", "-q", env=env)
    assert result.returncode != 0
    assert missing in result.stderr


def _rendered(tmp_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The secrets given, and the services as `docker-compose config` renders them."""
    env = {var: f"{var.lower().replace('_', '-')}-{i}x" for i, var in enumerate(SECRET_VARS)}
    result = _config(tmp_path, "config", env=env)
    assert result.returncode == 0, result.stderr
    return env, dict(yaml.safe_load(result.stdout)["services"])


def test_every_redis_url_carries_the_redis_password(tmp_path: Path) -> None:
    env, rendered = _rendered(tmp_path)
    urls = [
        (name, key, str(value))
        for name, service in rendered.items()
        for key, value in (service.get("environment") or {}).items()
        if str(value).startswith(("redis://", "rediss://"))
    ]
    assert {name for name, _, _ in urls} >= set(NEEDS) - {"migrate"}
    for name, key, url in urls:
        assert urlsplit(url).password == env["REDIS_PASSWORD"], (name, key)
    # redis-cli of the health check authenticates with the same password
    assert rendered["redis"]["environment"]["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]


def test_each_service_gets_only_the_secrets_it_uses(tmp_path: Path) -> None:
    _, rendered = _rendered(tmp_path)
    for name, needed in NEEDS.items():
        given = set(rendered[name].get("environment") or {}) & set(SECRET_BEARING)
        assert given == needed, name
    assert "SEGOPS_SECRET_KEY" not in rendered["flower"]["environment"]


def test_the_redis_service_wants_its_password_and_keeps_it_out_of_ps(tmp_path: Path) -> None:
    """The redis service's own command and health check, run against Debian's redis-server:
    the image's entrypoint is stood in for by a script that adds a free port and a scratch
    directory. Anonymous clients are refused, the password works, and no process's command
    line shows it."""
    redis_server = shutil.which("redis-server")
    redis_cli = shutil.which("redis-cli")
    if redis_server is None or redis_cli is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("redis-server is missing (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    env, rendered = _rendered(tmp_path)
    service = rendered["redis"]
    # `config` prints $$ (compose's escape for a literal $): the container's shell gets $
    command = [str(part).replace("$$", "$") for part in service["command"]]
    healthcheck = [str(part).replace("$$", "$") for part in service["healthcheck"]["test"]]
    assert command[:2] == ["sh", "-c"] and healthcheck[0] == "CMD-SHELL"
    password = env["REDIS_PASSWORD"]
    assert password not in " ".join(command)

    port = _free_port()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "docker-entrypoint.sh").write_text(
        f'#!/bin/sh\nexec "$@" --port {port} --bind 127.0.0.1 --dir {tmp_path} '
        "--save '' --appendonly no\n"
    )
    (stubs / "redis-cli").write_text(f'#!/bin/sh\nexec {redis_cli} -p {port} "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    redis_bin = str(Path(redis_server).parent)
    container_env = {
        "PATH": f"{stubs}:{redis_bin}:/usr/bin:/bin",
        **{k: str(v) for k, v in service["environment"].items()},
    }
    proc = subprocess.Popen(
        command, env=container_env, start_new_session=True, stdin=subprocess.DEVNULL
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        pid = int(client.info("server")["process_id"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"redis-server" in cmdline and password.encode() not in cmdline

        def healthy(auth: str) -> bool:
            check = subprocess.run(
                ["sh", "-c", healthcheck[1]],
                env={**container_env, "REDISCLI_AUTH": auth},
                capture_output=True,
                timeout=30,
            )
            return check.returncode == 0

        assert healthy(password)
        assert not healthy("not-the-password")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
