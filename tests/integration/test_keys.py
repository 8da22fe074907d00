"""Keys stay out of sight: --api-key-file, the SEGOPS_SECRET_KEY key ring, `keys
reencrypt`, and workers and the API that refuse to start when no key decrypts the stored keys."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from segops_sync.db.models import Connector, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.embedded import free_port
from segops_sync.klaviyo_sim import Simulator
from segops_sync.secrets import decrypt_api_key
from tests.conftest import isolated_env
from tests.integration.conftest import WorkerProcess
from tests.integration.helpers import (
    KNOWN_KEYS,
    Klaviyo,
    cli,
    cli_json,
    new_segment,
    recompute,
    row_counts,
    wait_idle,
)


def _create_args(k: Klaviyo, *extra: str) -> list[str]:
    return [
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        new_segment(),
        "--list-id",
        k.list_id,
        *extra,
    ]


def _stored_key(connector_id: str) -> str:
    from segops_sync.config import get_settings
    from segops_sync.connectors import api_key_of
    from segops_sync.db.queries import get_connector

    with session_scope() as s:
        return api_key_of(get_connector(s, connector_id), get_settings())


def _bad(*args: str, stdin: bytes | None = None) -> str:
    before = row_counts()
    result = cli(*args, stdin=stdin)
    assert result.returncode == 2, (args, result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert row_counts() == before, "bad input wrote something"
    return lines[0]


# -- --api-key-file ----------------------------------------------------------------------------


def test_create_and_update_read_the_key_from_a_file(
    stack_env: dict[str, str], klaviyo: Klaviyo, tmp_path: Path
) -> None:
    key_file = tmp_path / "klaviyo.key"
    key_file.write_text(klaviyo.api_key + "\n")  # an editor's trailing newline is dropped
    KNOWN_KEYS.add(klaviyo.api_key)
    created = cli(*_create_args(klaviyo, "--api-key-file", str(key_file), "--json"), check=True)
    assert klaviyo.api_key not in created.stdout + created.stderr
    cid = json.loads(created.stdout)["id"]
    assert _stored_key(cid) == klaviyo.api_key

    second_key = klaviyo.sim.create_key(klaviyo.account)
    KNOWN_KEYS.add(second_key)
    key_file.write_text(second_key)
    cli("connectors", "update", cid, "--api-key-file", str(key_file), check=True)
    assert _stored_key(cid) == second_key


def test_create_reads_the_key_from_stdin(stack_env: dict[str, str], klaviyo: Klaviyo) -> None:
    result = cli(
        *_create_args(klaviyo, "--api-key-file", "-", "--json"),
        stdin=klaviyo.api_key.encode(),
        check=True,
    )
    assert _stored_key(json.loads(result.stdout)["id"]) == klaviyo.api_key


def test_create_takes_exactly_one_of_the_two(
    stack_env: dict[str, str], klaviyo: Klaviyo, tmp_path: Path
) -> None:
    key_file = tmp_path / "k"
    key_file.write_text(klaviyo.api_key)
    both = _bad(
        *_create_args(klaviyo, "--api-key", klaviyo.api_key, "--api-key-file", str(key_file))
    )
    assert "--api-key" in both and klaviyo.api_key not in both
    neither = _bad(*_create_args(klaviyo))
    assert "--api-key" in neither


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable"])
def test_an_unreadable_key_file_is_refused_in_one_line(
    stack_env: dict[str, str], klaviyo: Klaviyo, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "nope.key"
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:
            path.write_bytes(b"\xff\xfe not text")  # root reads anything: an undecodable file
        else:
            path.write_text(klaviyo.api_key)
            path.chmod(0)
    line = _bad(*_create_args(klaviyo, "--api-key-file", str(path)))
    assert "--api-key-file" in line and str(path) in line


def test_update_with_an_unreadable_key_file_writes_nothing(
    stack_env: dict[str, str], klaviyo: Klaviyo, tmp_path: Path
) -> None:
    cid = cli_json(*_create_args(klaviyo, "--api-key", klaviyo.api_key))["id"]
    line = _bad("connectors", "update", cid, "--api-key-file", str(tmp_path / "missing"))
    assert "--api-key-file" in line
    assert _stored_key(cid) == klaviyo.api_key


def test_a_malformed_key_in_the_file_is_not_echoed(
    stack_env: dict[str, str], klaviyo: Klaviyo, tmp_path: Path
) -> None:
    path = tmp_path / "typo.key"
    path.write_text("pk_has space inside the key")
    line = _bad(*_create_args(klaviyo, "--api-key-file", str(path)))
    assert "API key is malformed" in line and "space inside" not in line


# -- rotation ----------------------------------------------------------------------------------


@pytest.fixture
def keys_env(
    stack_env: dict[str, str], pg_server_url: str, sim_server: tuple[Simulator, str]
) -> Iterator[dict[str, str]]:
    old = secrets.token_urlsafe(32)
    with isolated_env(stack_env, pg_server_url, "keys", SEGOPS_SECRET_KEY=old) as env:
        yield env


def _sync(cid: str, segment: str, members: list[str], runs: int, tmp_path: Path) -> None:
    recompute(segment, members, tmp_path)
    connector = wait_idle(cid, runs_at_least=runs, timeout=120)
    assert connector.status == "active", connector.last_error


def _refusal(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # This machine runs tests as root, which makes Celery warn on stderr; the image does not.
    quiet = {"PYTHONWARNINGS": "ignore:You're running the worker with superuser privileges"}
    return subprocess.run(
        cmd, env={**os.environ, **env, **quiet}, capture_output=True, text=True, timeout=120
    )


def _assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    named = [ln for ln in result.stderr.splitlines() if "SEGOPS_SECRET_KEY" in ln]
    assert len(named) == 1, result.stderr[-2000:]
    assert result.stderr.strip() == named[0], "one line, nothing else on stderr"


@pytest.mark.slow
def test_rotation_from_old_to_new_without_a_failed_sync(
    keys_env: dict[str, str], sim_server: tuple[Simulator, str], tmp_path: Path
) -> None:
    old = keys_env["SEGOPS_SECRET_KEY"]
    new = secrets.token_urlsafe(32)
    sim, base_url = sim_server
    k = Klaviyo.new(sim, base_url)
    second_list = sim.create_list(k.account, "Second")
    KNOWN_KEYS.add(k.api_key)
    key_file = tmp_path / "key"
    key_file.write_text(k.api_key)
    members = [f"rot{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(50)]

    def start(ring: str) -> WorkerProcess:
        os.environ["SEGOPS_SECRET_KEY"] = ring  # the CLI of this test uses the same ring
        from tests.conftest import _reset_settings

        _reset_settings()
        return WorkerProcess({**keys_env, "SEGOPS_SECRET_KEY": ring}, tmp_path, beat=False).start()

    # 1. everything under the old key
    worker = start(old)
    seg1 = new_segment()
    c1 = cli_json(
        "connectors", "create", "--type", "klaviyo", "--segment", seg1,
        "--list-id", k.list_id, "--api-key-file", str(key_file),
    )["id"]  # fmt: skip
    cli("connectors", "activate", c1, check=True)
    _sync(c1, seg1, members[:20], 1, tmp_path)
    worker.stop()

    # 2. the new key first, the old one still decrypts: a new connector is stored under new
    worker = start(f"{new},{old}")
    seg2 = new_segment()
    c2 = cli_json(
        "connectors", "create", "--type", "klaviyo", "--segment", seg2,
        "--list-id", second_list, "--api-key-file", str(key_file),
    )["id"]  # fmt: skip
    cli("connectors", "activate", c2, check=True)
    _sync(c1, seg1, members[:30], 2, tmp_path)
    _sync(c2, seg2, members[10:40], 1, tmp_path)

    # 3. re-encrypt: the old connector moves to the new key; a second run has nothing to do
    first = cli("keys", "reencrypt", check=True).stdout
    assert first.startswith("re-encrypted 1 stored API key(s)") and "(1 already used it)" in first
    again = cli("keys", "reencrypt", check=True).stdout
    assert again.startswith("re-encrypted 0 stored API key(s)") and "(2 already used it)" in again
    with session_scope() as s:
        tokens = list(s.scalars(select(Connector.api_key_encrypted)))
    assert len(tokens) == 2 and all(decrypt_api_key(t, new) == k.api_key for t in tokens)
    worker.stop()

    # 4. the old key dropped: syncs go on
    worker = start(new)
    _sync(c1, seg1, members[5:35], 3, tmp_path)
    _sync(c2, seg2, members[15:45], 2, tmp_path)  # few removals: no hold
    worker.stop()
    with session_scope() as s:
        statuses = list(s.scalars(select(SyncRun.status)))
    assert len(statuses) == 5 and set(statuses) == {"succeeded"}, statuses
    assert {p.email for p in sim.list_members(k.list_id)} == set(members[5:35])
    assert {p.email for p in sim.list_members(second_list)} == set(members[15:45])

    # 5. a worker and the API with only the old (now wrong) key refuse to start, in one line
    wrong = {**keys_env, "SEGOPS_SECRET_KEY": old}
    _assert_refused(
        _refusal(
            [sys.executable, "-m", "celery", "-A", "segops_sync", "worker", "-c", "1",
             "--without-gossip", "--without-mingle"],
            wrong,
        )
    )  # fmt: skip
    _assert_refused(
        _refusal(
            [sys.executable, "-m", "segops_sync.cli", "api", "--port", str(free_port())], wrong
        )
    )
    # and `keys reencrypt` with it changes nothing
    result = cli("keys", "reencrypt", env={"SEGOPS_SECRET_KEY": old})
    assert result.returncode == 2 and "SEGOPS_SECRET_KEY" in result.stderr
    with session_scope() as s:
        assert all(decrypt_api_key(t, new) for t in s.scalars(select(Connector.api_key_encrypted)))
