"""``connectors create`` without ``--list-id``: a pick among the key's lists on a real terminal
(a pseudo-terminal), exit 2 naming them off one; and ``--create-list NAME``."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from segops_sync.klaviyo import KlaviyoClient
from tests.integration.helpers import KNOWN_KEYS, Klaviyo, cli, cli_json, new_segment, row_counts


def _create(klaviyo: Klaviyo, *extra: str) -> list[str]:
    return [
        "connectors",
        "create",
        "--type",
        "klaviyo",
        "--segment",
        new_segment(),
        "--api-key",
        klaviyo.api_key,
        *extra,
    ]


def _lists(klaviyo: Klaviyo) -> dict[str, str]:
    """name -> id of the account's lists, as Klaviyo (the simulator) has them."""
    with KlaviyoClient(klaviyo.api_key, klaviyo.base_url) as client:
        return {found.name: found.id for found in client.iter_lists()}


def test_off_a_terminal_it_exits_2_and_names_the_lists(
    redis_stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    news = klaviyo.sim.create_list(klaviyo.account, "Newsletter")
    before = row_counts()
    result = cli(*_create(klaviyo))
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line == (
        "segops-sync: --list-id is required off a terminal; the key's lists: "
        f'"Newsletter" ({news}, 0 members), "Synced" ({klaviyo.list_id}, 0 members)'
    )
    assert row_counts() == before


def test_on_a_terminal_it_asks_until_it_gets_a_number(
    redis_stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    klaviyo.sim.create_list(klaviyo.account, "Newsletter")
    KNOWN_KEYS.add(klaviyo.api_key)
    terminal, their_end = pty.openpty()
    # The menu and the question go to the terminal (stderr); --json keeps stdout to the JSON.
    proc = subprocess.Popen(
        [sys.executable, "-m", "segops_sync.cli", *_create(klaviyo, "--json")],
        stdin=their_end,
        stderr=their_end,
        stdout=subprocess.PIPE,
    )
    os.close(their_end)
    screen = ""

    def read_until(text: str) -> None:
        nonlocal screen
        deadline = time.monotonic() + 60
        while text not in screen:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal: {screen!r}"
            ready, _, _ = select.select([terminal], [], [], 1)
            if ready:
                screen += os.read(terminal, 4096).decode()

    try:
        read_until("List for this connector (1-2, or its id): ")
        assert f'  2. "Synced" ({klaviyo.list_id}, 0 members)' in screen
        os.write(terminal, b"9\n")
        read_until("not a number from 1 to 2 nor an id above")
        os.write(terminal, b"2\n")
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        os.close(terminal)
    assert proc.returncode == 0, screen
    assert cli_json("connectors", "show", _id(out))["list_id"] == klaviyo.list_id
    assert klaviyo.api_key not in screen


def _id(out: bytes) -> str:
    import json

    return str(json.loads(out)["id"])


def test_create_list_makes_the_list_then_the_connector_once(
    redis_stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    doc = cli_json(*_create(klaviyo, "--create-list", "Fresh picks"))
    made = _lists(klaviyo)["Fresh picks"]
    assert doc["list_id"] == made
    # The same name again is refused before Klaviyo makes a second list of it.
    before = row_counts()
    again = cli(*_create(klaviyo, "--create-list", "Fresh picks"))
    assert again.returncode == 2
    assert f"already has a list named 'Fresh picks' ({made}): use --list-id {made}" in again.stderr
    blank = cli(*_create(klaviyo, "--create-list", "  "))
    assert blank.returncode == 2 and "list name is malformed" in blank.stderr
    both = cli(*_create(klaviyo, "--create-list", "X", "--list-id", klaviyo.list_id))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert sorted(_lists(klaviyo)) == ["Fresh picks", "Synced"]
    assert row_counts() == before


def test_a_connector_that_fails_after_its_list_was_made_says_the_list_stays(
    redis_stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    unreachable = {"SEGOPS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}
    result = cli(*_create(klaviyo, "--create-list", "Kept"), env=unreachable)
    made = _lists(klaviyo)["Kept"]
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("segops-sync: the connector was not created (")
    assert line.endswith(
        f"the Klaviyo list 'Kept' ({made}) was created and stays: run again with --list-id {made}"
    )
