"""Redis with a password, and Redis over TLS, carry a whole sync.

Each test starts Debian's ``redis-server`` of its own: one with ``requirepass``, one that speaks
only TLS (``--port 0 --tls-port``, a throwaway CA made here) and also wants the password. The
broker, the result backend and the limiter all live on it; a real worker (with beat), the CLI
and the Klaviyo simulator run a sync through it. On TLS the URLs are docs/operations.md's form,
``rediss://:PASSWORD@host:port/db?ssl_ca_certs=CA``, and the broker must check the server's
certificate: a URL naming another CA is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from celery import Celery
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kombu.exceptions import OperationalError

from segops_sync.celery import configure
from segops_sync.config import Settings
from segops_sync.embedded import free_port
from segops_sync.klaviyo_sim import Simulator
from tests.conftest import isolated_env
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    wait_idle,
)

pytestmark = pytest.mark.slow


# -- a throwaway CA and a server certificate for 127.0.0.1 -------------------------------------


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(directory: Path, label: str) -> Pki:
    """A CA and a server certificate it signs, valid for 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"segops test CA {label}"))
        .issuer_name(_name(f"segops test CA {label}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, pki.key)
    return pki


# -- Debian's redis-server, as a deployment runs it ---------------------------------------------


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("redis-server is missing (apt-get install redis-server); CI runs these")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return found


@contextlib.contextmanager
def redis_server(workdir: Path, password: str, *, tls: Pki | None = None) -> Iterator[str]:
    """A redis-server wanting ``password``, on TLS only when ``tls`` is given; yields the URL
    of its server (no database), in the form docs/operations.md documents."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        _redis_server_binary(),
        "-",  # the configuration (and the password with it) on stdin, out of `ps`
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    if tls is None:
        args += ["--port", str(port)]
        url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}"
        client_url = f"{url}/0"
    else:
        args += [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(tls.cert),
            "--tls-key-file",
            str(tls.key),
            "--tls-ca-cert-file",
            str(tls.ca),
            "--tls-auth-clients",
            "no",
        ]
        url = f"rediss://:{quote(password, safe='')}@127.0.0.1:{port}"
        client_url = f"{url}/0?ssl_ca_certs={quote(str(tls.ca), safe='')}"
    log_path = workdir / "redis.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    proc.stdin.write(f"requirepass {password}\n".encode())
    proc.stdin.close()
    try:
        deadline = time.monotonic() + 30
        client = redis.Redis.from_url(client_url, socket_connect_timeout=1)
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- one sync through that Redis -----------------------------------------------------------------


def _redis_env(server_url: str, query: str = "") -> dict[str, str]:
    return {
        "SEGOPS_BROKER_URL": f"{server_url}/0{query}",
        "SEGOPS_RESULT_BACKEND": f"{server_url}/1{query}",
        "SEGOPS_LIMITER_REDIS_URL": f"{server_url}/2{query}",
    }


def _sync_through(
    redis_env: dict[str, str],
    segops_env: dict[str, str],
    pg_server_url: str,
    sim_server: tuple[Simulator, str],
    workdir: Path,
    password: str,
) -> None:
    """A connector created with the CLI, a recompute, a real worker (and its beat) on this
    Redis: the Klaviyo list ends up exact and the run succeeded."""
    sim, base_url = sim_server
    klaviyo = Klaviyo.new(sim, base_url)
    with isolated_env(
        segops_env, pg_server_url, "redisauth", SEGOPS_KLAVIYO_BASE_URL=base_url, **redis_env
    ) as env:
        worker = WorkerProcess(env, workdir, concurrency=2).start()
        try:
            segment = new_segment()
            connector_id = create_connector(klaviyo, segment)
            members = [f"ra{i}@example.com" for i in range(20)] + [f"ra-u{i}" for i in range(20)]
            recompute(segment, members, workdir)
            connector = wait_idle(connector_id, timeout=120)
            assert connector.status == "active", connector.last_error
            run = latest_run(connector_id)
            assert (run.status, run.added, run.removed) == ("succeeded", 40, 0)
            on_list = {p.external_id or p.email for p in sim.list_members(klaviyo.list_id)}
            assert on_list == set(members)
            # the results and the limiter (heartbeats, request windows) were on this Redis too
            for var in ("SEGOPS_RESULT_BACKEND", "SEGOPS_LIMITER_REDIS_URL"):
                client = redis.Redis.from_url(env[var])
                assert client.dbsize() > 0, f"nothing was written through {var}"
                client.close()
        finally:
            worker.stop()
        log = worker.log()
        assert "ready." in log
        assert password not in log, "the Redis password was written to the worker's log"


def test_a_sync_through_redis_with_a_password(
    segops_env: dict[str, str],
    pg_server_url: str,
    sim_server: tuple[Simulator, str],
    tmp_path: Path,
) -> None:
    password = secrets.token_urlsafe(24)
    with redis_server(tmp_path / "redis", password) as server_url:
        port = int(server_url.rsplit(":", 1)[1])
        anonymous = redis.Redis(host="127.0.0.1", port=port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()  # the server really wants the password
        anonymous.close()
        _sync_through(
            _redis_env(server_url), segops_env, pg_server_url, sim_server, tmp_path, password
        )


def test_a_sync_through_redis_over_tls(
    segops_env: dict[str, str],
    pg_server_url: str,
    sim_server: tuple[Simulator, str],
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki", "server")
    password = secrets.token_urlsafe(24)
    with redis_server(tmp_path / "redis", password, tls=pki) as server_url:
        port = int(server_url.rsplit(":", 1)[1])
        plain = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # no plain-text port: everything below went over TLS
        plain.close()
        # docs/operations.md's form: no ssl_cert_reqs (it defaults to required), the CA by path.
        query = f"?ssl_ca_certs={quote(str(pki.ca), safe='')}"
        _sync_through(
            _redis_env(server_url, query),
            segops_env,
            pg_server_url,
            sim_server,
            tmp_path,
            password,
        )


def test_a_rediss_url_without_tls_parameters_checks_the_certificate(tmp_path: Path) -> None:
    """``rediss://:PASSWORD@host:port/db`` alone checks the server against the system's CAs,
    which never signed this test's: the broker, the result backend and the limiter all refuse
    it. (kombu, given no TLS options, would connect without any check.)"""
    pki = make_pki(tmp_path / "pki", "server")
    password = secrets.token_urlsafe(24)
    with redis_server(tmp_path / "redis", password, tls=pki) as server_url:
        app = Celery("redis-tls-check")
        configure(app, Settings(broker_url=f"{server_url}/0", result_backend=f"{server_url}/1"))
        with (
            app.connection_for_write() as conn,
            pytest.raises(OperationalError, match="certificate verify failed"),
        ):
            conn.ensure_connection(max_retries=1)
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            app.backend.client.ping()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis.Redis.from_url(f"{server_url}/2").ping()

        # the same URLs naming the CA that signed it are accepted by all three
        query = f"?ssl_ca_certs={quote(str(pki.ca), safe='')}"
        trusting = Celery("redis-tls-check")
        configure(
            trusting,
            Settings(broker_url=f"{server_url}/0{query}", result_backend=f"{server_url}/1{query}"),
        )
        with trusting.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            assert conn.connected
        assert trusting.backend.client.ping()
        assert redis.Redis.from_url(f"{server_url}/2{query}").ping()
