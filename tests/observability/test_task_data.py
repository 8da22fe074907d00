"""Member data in tracebacks and in the copies of task arguments Celery publishes is masked."""

from __future__ import annotations

import io
import json
import logging

import pytest

from segops_sync.observability import logging as obs_log
from segops_sync.observability.logging import mask_member_data
from segops_sync.observability.task_data import REPR_MAX, masked_reprs

EMAIL = "zelda.unit@example.com"
PHONE = "+14155550123"
ROW = f"Failing row contains (cust-77, {EMAIL}, Zelda)."


def _raise() -> None:
    raise ValueError(f'new row violates check constraint "x"\nDETAIL:  {ROW}\n{EMAIL} {PHONE}')


@pytest.mark.parametrize("json_format", [False, True])
def test_a_logged_traceback_is_masked_in_both_formats(json_format: bool) -> None:
    stream = io.StringIO()
    logger = logging.getLogger(f"segops_sync.test_masking.{json_format}")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    obs_log.install([logger], json_format=json_format)
    try:
        try:
            _raise()
        except ValueError:
            logger.exception("the task failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    if json_format:
        doc = json.loads(out)
        out = doc["exc_info"]
    assert "Traceback (most recent call last)" in out and "ValueError" in out
    assert "DETAIL:  [redacted]" in out
    for value in (EMAIL, PHONE, "cust-77", "Zelda"):
        assert value not in stream.getvalue(), value


def test_messages_our_processes_publish_carry_masked_argument_copies() -> None:
    from segops_sync.celery import app

    message = app.amqp.create_task_message(
        "t-1",
        "segops.context_identified",
        (),
        {"user_id": EMAIL, "traits": {"email": EMAIL, "first_name": "Zelda"}},
        create_sent_event=True,
    )
    for shown in (message.headers, message.sent_event):
        copies = f"{shown.get('argsrepr', shown.get('args'))} {shown.get('kwargsrepr', shown.get('kwargs'))}"
        assert EMAIL not in copies and "Zelda" not in copies, copies
    assert message.headers["kwargsrepr"] == "{'user_id': '[redacted]', 'traits': '[redacted]'}"
    # tasks that carry ids show them (only what looks like member data is masked)
    ids = app.amqp.create_task_message("t-2", "segops.plan_run", ("run-1",), {})
    assert ids.headers["argsrepr"] == "('run-1',)"


def test_forget_user_shows_its_argument_names_only() -> None:
    argsrepr, kwargsrepr = masked_reprs(
        "segops.forget_user", ("cust-77",), {"klaviyo_delete": True}
    )
    assert (argsrepr, kwargsrepr) == ("['[redacted]']", "{'klaviyo_delete': '[redacted]'}")


def test_sql_errors_carry_no_parameter_values() -> None:
    from segops_sync.db.session import make_engine

    engine = make_engine("postgresql://postgres@127.0.0.1:5432/any")
    try:
        assert engine.hide_parameters is True
    finally:
        engine.dispose()


def test_a_huge_argument_is_masked_in_one_pass_and_shown_cut() -> None:
    # a 10 MB malformed argument once held the worker's consumer: each of its characters began
    # a new scan for an "@" (pytest's timeout is what fails here if that comes back)
    text = "x" * 1_000_000 + " alice@example.com"
    assert mask_member_data(text).endswith(" [redacted]")
    _, kwargsrepr = masked_reprs(
        "segops.recompute_finished", (), {"segment_id": "x" * 10_000_000, "recompute_id": "r"}
    )
    assert len(kwargsrepr) <= REPR_MAX and kwargsrepr.startswith("{'segment_id': 'xxx")


@pytest.mark.parametrize(
    "email",
    [
        "josé@example.com",
        "bob@exämple.de",
        "ÅSA@x.se",
        "jose\u0301@example.de",
        "a@exa\u0308mple.de",
    ],
)
def test_an_email_with_letters_beyond_ascii_is_masked_whole(email: str) -> None:
    # identity.EMAIL_PATTERN accepts these addresses, so they reach Klaviyo and our texts
    assert mask_member_data(f"refused {email}, then") == "refused [redacted], then"
