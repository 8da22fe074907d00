"""Every bad CLI input of docs/contract.md#rules-for-every-command → exit 2, one line on stderr, nothing written."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from segops_sync.db.session import session_scope
from tests.integration.helpers import (
    Klaviyo,
    cli,
    create_connector,
    new_segment,
    quiet_all_connectors,
    row_counts,
)

UNKNOWN = str(uuid.uuid4())


@pytest.fixture(scope="module", autouse=True)
def quiet_database(segops_env: dict[str, str]) -> None:
    """The checks below count every row; earlier modules' connectors must not be syncing."""
    quiet_all_connectors()


def _bad(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> str:
    before = row_counts() if env is None else None
    result = cli(*args, env=env, stdin=stdin)
    assert result.returncode == 2, (args, result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    if before is not None:
        assert row_counts() == before, "bad input wrote something"
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ("connectors", "show", UNKNOWN),
        ("connectors", "show", UNKNOWN, "--json"),
        ("connectors", "activate", UNKNOWN),
        ("connectors", "deactivate", UNKNOWN),
        ("connectors", "update", UNKNOWN, "--list-id", "AbC123", "--no-verify"),
        ("connectors", "resync", UNKNOWN),
        ("connectors", "pause", UNKNOWN),
        ("connectors", "resume", UNKNOWN),
        ("connectors", "preview", UNKNOWN),
        ("connectors", "plan", UNKNOWN),
        ("connectors", "plan", UNKNOWN, "--json"),
        ("connectors", "history", UNKNOWN),
        ("connectors", "verify", UNKNOWN),
        ("connectors", "verify", UNKNOWN, "--repair", "--json"),
        ("connectors", "rejected", UNKNOWN),
        ("connectors", "update", UNKNOWN, "--traits", "first_name"),
    ],
)
def test_unknown_connector(segops_env: dict[str, str], args: tuple[str, ...]) -> None:
    assert UNKNOWN in _bad(*args)


@pytest.mark.parametrize("list_id", ["AbC12", "AbC1234", "AbC12!", "", "Ab C12"])
def test_malformed_list_id(segops_env: dict[str, str], list_id: str) -> None:
    line = _bad(
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        "s",
        "--list-id",
        list_id,
        "--api-key",
        "pk_" + "a" * 30,
        "--no-verify",
    )
    assert "list id" in line


@pytest.mark.parametrize("key", ["sk_abcdefghijklmnop", "pk_", "abc", "pk_has space inside"])
def test_malformed_api_key_is_refused_without_echo(segops_env: dict[str, str], key: str) -> None:
    line = _bad(
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        "s",
        "--list-id",
        "AbC123",
        "--api-key",
        key,
        "--no-verify",
    )
    assert "API key" in line
    assert key not in line or len(key) < 4


def test_unsupported_type(segops_env: dict[str, str]) -> None:
    assert "type" in _bad(
        "connectors",
        "create",
        "--type",
        "mailchimp",
        "--segment",
        "s",
        "--list-id",
        "AbC123",
        "--api-key",
        "pk_" + "a" * 30,
        "--no-verify",
    )


def test_update_of_existing_connector_with_bad_values(
    stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    connector_id = create_connector(klaviyo, new_segment(), activate=False)
    _bad("connectors", "update", connector_id, "--list-id", "bad")
    _bad("connectors", "update", connector_id, "--api-key", "nope")
    _bad("connectors", "update", connector_id)


def test_bad_mass_removal_approvals(stack_env: dict[str, str], klaviyo: Klaviyo) -> None:
    connector_id = create_connector(klaviyo, new_segment(), activate=False)
    # active without a sync (no worker here): only the approval's own input can be refused
    with session_scope() as s:
        s.execute(
            text("UPDATE connectors SET status = 'active' WHERE id = :c"), {"c": connector_id}
        )
    try:
        resync = ("connectors", "resync", connector_id)
        line = _bad(*resync, "--by", "ops-alice")
        assert "--by" in line and "--allow-mass-removal" in line, line
        line = _bad(*resync, "--allow-mass-removal", "--by", "")
        assert "--by" in line and "empty" in line, line
        line = _bad(*resync, "--allow-mass-removal", "--by", "a" * 101)
        assert "--by" in line and "100 characters" in line, line
        line = _bad(*resync, "--allow-mass-removal", "--by", "ops\nalice")
        assert "--by" in line and "control character" in line, line
    finally:
        with session_scope() as s:
            s.execute(
                text("UPDATE connectors SET status = 'inactive' WHERE id = :c"),
                {"c": connector_id},
            )


def test_live_check_refuses_a_rejected_key_and_an_unknown_list(
    stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    bogus = "pk_" + uuid.uuid4().hex
    line = _bad(
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        "s",
        "--list-id",
        klaviyo.list_id,
        "--api-key",
        bogus,
    )
    assert "API key" in line and bogus not in line
    line = _bad(
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        "s",
        "--list-id",
        klaviyo.list_id.swapcase(),
        "--api-key",
        klaviyo.api_key,
    )
    assert klaviyo.list_id.swapcase() in line and klaviyo.api_key not in line


def test_unreadable_and_bad_member_files(segops_env: dict[str, str], tmp_path: Path) -> None:
    _bad("recompute", "seg-x", "--members", str(tmp_path / "missing.txt"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok@example.com\n\xff\xfe\x00garbage\n")
    assert "UTF-8" in _bad("recompute", "seg-x", "--members", str(binary))
    long_line = tmp_path / "long.txt"
    long_line.write_text("ok@example.com\n" + "x" * 300 + "\n")
    assert "line 2" in _bad("recompute", "seg-x", "--members", str(long_line))
    _bad("recompute", "seg-x", "--members", "-", stdin=b"fine\n\xc3\x28\n")


def test_bad_identify(segops_env: dict[str, str]) -> None:
    assert "email" in _bad("identify", "u-1", "--email", "not-an-email")


def test_missing_and_malformed_settings(segops_env: dict[str, str]) -> None:
    line = _bad("connectors", "list", env={"SEGOPS_DATABASE_URL": ""})
    assert "SEGOPS_DATABASE_URL" in line
    line = _bad(
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        "s",
        "--list-id",
        "AbC123",
        "--api-key",
        "pk_" + "a" * 30,
        "--no-verify",
        env={"SEGOPS_SECRET_KEY": ""},
    )
    assert "SEGOPS_SECRET_KEY" in line
    assert "SEGOPS_BROKER_URL" in _bad("connectors", "list", env={"SEGOPS_BROKER_URL": "nonsense"})


SECRET = "pk_LivePrivateKey0123456789abcdef"


def _create(**options: str) -> tuple[str, ...]:
    """``connectors create --no-verify`` with good values, but for ``options``."""
    values = {"type": "klaviyo", "segment": "s", "list-id": "AbC123", "api-key": "pk_" + "a" * 30}
    values.update({name.replace("_", "-"): value for name, value in options.items()})
    flags = [part for name, value in values.items() for part in (f"--{name}", value)]
    return ("connectors", "create", *flags, "--no-verify")


@pytest.mark.parametrize(
    "args",
    [
        # a key pasted into the wrong option
        _create(list_id=SECRET),
        _create(type=SECRET),
        _create(segment=f" {SECRET}"),
        _create(traits=f"first_name,{SECRET}!"),
        _create(traits=f"{SECRET},,plan"),
        ("identify", "u-1", "--email", f"{SECRET}@"),
        # after a misspelt option, or where a number belongs: argparse quotes what it refuses
        ("connectors", "list", "--api_key", SECRET),
        ("connectors", "list", SECRET),
        ("klaviyo-sim", "--port", SECRET),
        ("klaviyo-sim", "--port", "8080", "--time-scale", SECRET),
        ("api", "--port", "8080", "--host", SECRET),
        ("connectors", SECRET),
    ],
)
def test_refused_values_are_never_echoed(segops_env: dict[str, str], args: tuple[str, ...]) -> None:
    line = _bad(*args)
    assert "pk_Live" not in line, line


def test_usage_errors_are_one_line(segops_env: dict[str, str]) -> None:
    _bad("connectors", "create", "--type", "klaviyo")
    _bad("klaviyo-sim", "--port", "http")
    _bad("no-such-command")
