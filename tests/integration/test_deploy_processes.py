"""The processes as docker-compose.yml and deploy/k8s run them: the API on the host
it is told, Flower locked with basic auth taken from the environment."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from segops_sync.embedded import free_port
from tests.integration.helpers import serving


def _listening_on(port: int) -> set[str]:
    """The local IPv4 addresses listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.parametrize(
    ("args", "address"), [((), "127.0.0.1"), (("--host", "0.0.0.0"), "0.0.0.0")]
)
def test_api_binds_the_host_it_is_given(
    stack_env: dict[str, str], args: tuple[str, ...], address: str
) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "segops_sync.cli", "api", *args, "--port", str(port)]
    with serving(cmd, f"http://127.0.0.1:{port}/v1/connectors"):
        assert _listening_on(port) == {address}
        answer = httpx.get(
            f"http://127.0.0.1:{port}/v1/connectors",
            headers={"Authorization": f"Bearer {stack_env['SEGOPS_API_TOKEN']}"},
        )
        assert answer.status_code == 200


def test_flower_requires_the_basic_auth_from_the_environment(segops_env: dict[str, str]) -> None:
    port = free_port()
    secret = "flower-password-from-env"
    env = {"FLOWER_BASIC_AUTH": f"ops:{secret}", "FLOWER_URL_PREFIX": "flower"}
    cmd = [
        sys.executable, "-m", "celery", "-A", "segops_sync", "flower",
        "--address=127.0.0.1", f"--port={port}",
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}/flower"
    with serving(cmd, f"{base}/healthcheck", env=env) as proc:
        # the k8s probes' path answers without a login; nothing else does
        assert httpx.get(f"{base}/healthcheck").status_code == 200
        for path in ("/", "/tasks", "/api/workers"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
            assert httpx.get(f"{base}{path}", auth=("ops", "wrong")).status_code == 401, path
        assert httpx.get(f"{base}/", auth=("ops", secret)).status_code == 200
        # the password is not on the command line, where `ps` would show it
        assert secret not in Path(f"/proc/{proc.pid}/cmdline").read_text()


@pytest.mark.parametrize("command", ["api", "klaviyo-sim"])
def test_a_bad_host_is_refused_in_one_line(command: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "segops_sync.cli",
            command,
            "--host",
            "no such host!",
            "--port",
            "8000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--host" in result.stderr
    assert "no such host!" not in result.stderr  # a refused value may be a secret: never echoed


def test_the_worker_liveness_probe_of_the_manifest_pings_its_own_worker(
    segops_env: dict[str, str], tmp_path: Path
) -> None:
    """deploy/k8s/worker.yaml's probe, run as the kubelet runs it, against a real worker whose
    node name is celery@<its host name> (Kubernetes sets HOSTNAME to the pod name)."""
    import uuid

    import yaml

    manifest = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "worker.yaml"
    container = yaml.safe_load(manifest.read_text())["spec"]["template"]["spec"]["containers"][0]
    probe = container["livenessProbe"]["exec"]["command"]
    pod = f"segops-worker-{uuid.uuid4().hex[:8]}"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **segops_env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "segops_sync", "worker", "-l", "info",
             "-c", "1", "-n", f"celery@{pod}", "--without-gossip", "--without-mingle"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
        alive = subprocess.run(probe, env={**env, "HOSTNAME": pod}, capture_output=True, timeout=60)
        assert alive.returncode == 0, alive.stderr
        other = subprocess.run(
            probe, env={**env, "HOSTNAME": f"{pod}-gone"}, capture_output=True, timeout=60
        )
        assert other.returncode != 0, "a probe that cannot fail proves nothing"
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
