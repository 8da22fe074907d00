"""The Activations page in a real browser: Debian's chromium driven by Playwright, against the
API, a Celery worker, PostgreSQL, Redis and the Klaviyo simulator.

The browser is /usr/bin/chromium (``apt-get install chromium``); Playwright downloads nothing.
Without it these tests skip on a developer's machine and FAIL in CI (``CI=true``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from segops_sync.db.models import Connector
from segops_sync.db.session import session_scope
from segops_sync.klaviyo_sim import Simulator
from tests.integration.helpers import (
    Klaviyo,
    create_connector,
    latest_run,
    new_segment,
    recompute,
    row_counts,
    run_count,
    wait_idle,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SLOW_MS = 90_000  # a sync on a loaded 2-core machine, seen through the page's polling
RECENTLY = re.compile(r"^(just now|1 min ago)$")  # the page's relative time of a fresh sync


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is missing: apt-get install chromium"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(message)  # CI must run these: a missing browser is a failure there
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, api_url: str) -> Iterator[Any]:
    """A fresh browser context (its own sessionStorage) on the Activations page."""
    context = browser.new_context(base_url=api_url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    response = tab.goto("/activations")
    assert response is not None and response.status == 200  # a page: no token needed
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"the page's script failed: {errors}"


def sign_in(page: Any, token: str) -> None:
    from playwright.sync_api import expect

    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("table")).to_be_visible()


def row_of(page: Any, segment: str) -> Any:
    return page.get_by_role("row").filter(has_text=segment)


def status_in_db(connector_id: str) -> str:
    with session_scope() as s:
        return s.get_one(Connector, connector_id).status


def test_sign_in_refuses_a_wrong_token_and_accepts_the_right_one(
    page: Any, stack_env: dict[str, str]
) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_role("table")).to_be_hidden()
    page.get_by_label("API token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("refused")
    expect(page.get_by_role("table")).to_be_hidden()

    sign_in(page, stack_env["SEGOPS_API_TOKEN"])
    expect(page.get_by_role("alert")).to_have_count(0)
    expect(page.get_by_role("button", name="New connector")).to_be_visible()
    # The token is kept for the browser session: a reload stays signed in...
    page.reload()
    expect(page.get_by_role("table")).to_be_visible()
    # ...and only there: it is in sessionStorage, never in a cookie or localStorage.
    assert page.context.cookies() == []
    assert page.evaluate("localStorage.length") == 0


def test_creation_refuses_what_the_api_refuses_and_creates_an_inactive_connector(
    page: Any, stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    from playwright.sync_api import expect

    sign_in(page, stack_env["SEGOPS_API_TOKEN"])
    segment = new_segment()
    page.get_by_role("button", name="New connector").click()
    form_alert = page.locator("#create-panel").get_by_role("alert")

    before = row_counts()
    page.get_by_label("Segment").fill(segment)
    page.get_by_label("List ID").fill("Ab1")
    page.get_by_label("API key").fill(klaviyo.api_key)
    page.get_by_role("button", name="Create").click()
    expect(form_alert).to_contain_text("list id is malformed")
    expect(form_alert).to_contain_text("exactly 6 letters or digits")
    expect(page.get_by_label("API key")).to_have_value("")  # never shown back, not even masked
    expect(form_alert).to_contain_text("the API key field was emptied")  # and the page says so

    # An empty key is "required", not "malformed".
    page.get_by_label("List ID").fill(klaviyo.list_id)
    page.get_by_role("button", name="Create").click()
    expect(form_alert).to_contain_text("API key is required")

    # The same live check as the API: a key Klaviyo does not know is refused, and not echoed.
    bogus = "pk_" + "q" * 34
    page.get_by_label("List ID").fill(klaviyo.list_id)
    page.get_by_label("API key").fill(bogus)
    page.get_by_role("button", name="Create").click()
    expect(form_alert).to_contain_text("Klaviyo rejected the API key")
    assert bogus not in page.content()
    assert row_counts() == before

    page.get_by_label("API key").fill(klaviyo.api_key)
    page.get_by_role("button", name="Create").click()
    row = row_of(page, segment)
    expect(row).to_have_count(1)
    expect(row.locator(".badge-status")).to_have_text("inactive")
    expect(row).to_contain_text(klaviyo.list_id)
    expect(row.get_by_role("button", name="Activate")).to_be_visible()
    expect(row.get_by_role("button", name="Resync")).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("created (inactive)")
    expect(page.get_by_label("Segment")).to_be_hidden()  # the form closed
    # The key is nowhere in the page: at most its redacted hint.
    assert klaviyo.api_key not in page.content()
    assert page.evaluate("Array.from(document.querySelectorAll('input')).map(i => i.value)") == [
        "",
        "",
        "",
        "",
    ]
    assert row_counts()["connectors"] == before["connectors"] + 1


def test_a_pasted_key_offers_its_lists_by_name_in_the_list_id_field(
    page: Any, stack_env: dict[str, str], klaviyo: Klaviyo
) -> None:
    from playwright.sync_api import expect

    news = klaviyo.sim.create_list(klaviyo.account, "Newsletter")
    sign_in(page, stack_env["SEGOPS_API_TOKEN"])
    page.get_by_role("button", name="New connector").click()
    form_alert = page.locator("#create-panel").get_by_role("alert")
    key = page.get_by_label("API key")
    key.fill("pk_" + "q" * 34)
    key.press("Tab")  # leaving the field is a change, as a paste is
    expect(form_alert).to_contain_text("Klaviyo rejected the API key")

    key.fill(klaviyo.api_key)
    key.press("Tab")
    field = page.get_by_label("List ID")  # still found by its name, with the lists beside it
    offered = page.locator(f"datalist#{field.get_attribute('list')} option")
    expect(offered).to_have_count(2)
    # the names come at once, the member counts with the page's second call
    expect(offered.nth(0)).to_have_attribute("label", f"Newsletter ({news} · 0 members)")
    expect(offered.nth(1)).to_have_attribute("label", f"Synced ({klaviyo.list_id} · 0 members)")
    assert offered.evaluate_all("os => os.map(o => o.value)") == [news, klaviyo.list_id]
    expect(form_alert).to_be_hidden()  # the refusal is gone once a key is taken
    field.fill(news)  # an offered id, or any typed by hand, is the field's value
    expect(field).to_have_value(news)


def test_activate_sync_resync_and_deactivate_from_the_page(
    page: Any, stack_env: dict[str, str], klaviyo: Klaviyo, worker: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    segment = new_segment()
    cid = create_connector(klaviyo, segment, activate=False)
    sign_in(page, stack_env["SEGOPS_API_TOKEN"])
    row = row_of(page, segment)
    expect(row.locator(".badge-status")).to_have_text("inactive")
    expect(row).to_contain_text("never")

    row.get_by_role("button", name="Activate").click()
    expect(row.locator(".badge-status")).to_have_text("active")
    expect(row.get_by_role("button", name="Deactivate")).to_be_visible()
    assert status_in_db(cid) == "active"

    # A recompute syncs; the row shows the time without a reload (the page polls).
    members = ["ada@example.com", "user-grace", "user-linus"]
    recompute(segment, members, tmp_path)
    synced = row.locator("time")
    expect(synced).to_be_visible(timeout=SLOW_MS)
    connector = wait_idle(cid)
    assert connector.last_synced_at is not None
    expect(synced).to_have_attribute("datetime", connector.last_synced_at.isoformat())
    expect(synced).to_have_text(RECENTLY)
    expect(row).to_contain_text("+3 \u22120", timeout=SLOW_MS)  # added, removed
    assert set(klaviyo.members()) == set(members)

    # Resync starts a run.
    runs_before = run_count(cid)
    row.get_by_role("button", name="Resync").click()
    expect(page.get_by_role("status")).to_contain_text("resync started")
    assert run_count(cid) == runs_before + 1
    assert latest_run(cid).trigger == "resync"
    wait_idle(cid, runs_at_least=runs_before + 1)

    # Pause: the status says so, a resync is refused, and Resume syncs once to catch up.
    row.get_by_role("button", name="Pause").click()
    expect(row.locator(".badge-status")).to_have_text("paused")
    assert status_in_db(cid) == "paused"
    row.get_by_role("button", name="Resync").click()
    expect(page.get_by_role("alert")).to_contain_text("is paused: resume it first")
    row.get_by_role("button", name="Resume").click()
    expect(page.get_by_role("status")).to_contain_text("resumed; a sync catches up")
    expect(row.locator(".badge-status")).to_have_text("active")
    expect(row.get_by_role("button", name="Pause")).to_be_visible()
    wait_idle(cid, runs_at_least=runs_before + 2)
    assert (latest_run(cid).trigger, latest_run(cid).status) == ("resume", "succeeded")

    # A key revoked in Klaviyo: the next sync that has work fails, and status and last error
    # show it by themselves.
    klaviyo.sim.revoke_key(klaviyo.api_key)
    recompute(segment, [*members, "user-margaret"], tmp_path)
    expect(row.locator(".badge-status")).to_have_text("error", timeout=SLOW_MS)
    expect(row.locator("td.error")).to_contain_text("API key", timeout=SLOW_MS)
    assert klaviyo.api_key not in page.content()

    row.get_by_role("button", name="Deactivate").click()
    expect(row.locator(".badge-status")).to_have_text("inactive")
    expect(row.get_by_role("button", name="Activate")).to_be_visible()
    assert status_in_db(cid) == "inactive"

    # What the API refuses shows in an alert: an inactive connector cannot be resynced.
    row.get_by_role("button", name="Resync").click()
    expect(page.get_by_role("alert")).to_contain_text("connector is inactive: activate it first")


def test_a_fleet_reads_at_a_glance(
    page: Any,
    stack_env: dict[str, str],
    sim_server: tuple[Simulator, str],
    worker: Any,
    tmp_path: Path,
) -> None:
    """Connectors in each state side by side, as a person sees them; docs/interfaces.md's
    screenshot."""
    from playwright.sync_api import expect

    synced, failing, idle, held = (Klaviyo.new(*sim_server) for _ in range(4))
    ok_segment, bad_segment, idle_segment = "vip-customers", "cart-abandoners", "churn-risk"
    held_segment = "win-back"
    ok_id = create_connector(synced, ok_segment)
    bad_id = create_connector(failing, bad_segment)
    create_connector(idle, idle_segment, activate=False)
    create_connector(held, held_segment)
    recompute(ok_segment, [f"user-{n}" for n in range(12)] + ["ada@example.com"], tmp_path)
    failing.sim.revoke_key(failing.api_key)
    recompute(bad_segment, ["user-1", "user-2"], tmp_path)
    wait_idle(ok_id)
    wait_idle(bad_id)

    sign_in(page, stack_env["SEGOPS_API_TOKEN"])
    ok_row, bad_row, idle_row = (row_of(page, s) for s in (ok_segment, bad_segment, idle_segment))
    expect(ok_row.locator(".badge-status")).to_have_text("active")
    expect(ok_row.locator("time")).to_have_text(RECENTLY)
    expect(ok_row).to_contain_text("+13 \u22120")
    expect(ok_row.locator("td.error")).to_have_text("\u2014")
    expect(bad_row.locator(".badge-status")).to_have_text("error")
    expect(bad_row.locator("td.error")).to_contain_text("Klaviyo rejected the API key")
    expect(bad_row.get_by_role("button", name="Deactivate")).to_be_visible()
    expect(idle_row.locator(".badge-status")).to_have_text("inactive")
    expect(idle_row.locator("td.synced")).to_have_text("never")
    held_row = row_of(page, held_segment)
    held_row.get_by_role("button", name="Pause").click()
    expect(held_row.locator(".badge-status")).to_have_text("paused")
    expect(held_row.get_by_role("button", name="Resume")).to_be_visible()
    for k in (synced, failing, idle, held):
        assert k.api_key not in page.content()

    shot = tmp_path / "activations.png"
    page.set_viewport_size({"width": 1280, "height": 480})
    page.screenshot(path=str(shot), full_page=True)
    target = os.environ.get("SEGOPS_ACTIVATIONS_SCREENSHOT")
    if target:  # how docs/activations.png is made: see docs/interfaces.md
        shutil.copyfile(shot, target)
