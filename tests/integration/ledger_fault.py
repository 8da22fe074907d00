"""Test-only fault: imported into one test's own worker (``celery worker -I
tests.integration.ledger_fault``), never by the product. In that worker every ledger write of
members Klaviyo accepted fails: after a bulk import job completed (``accept_job`` in
sync/bulk_add.py) and after a list write answered (``confirm_added`` in sync/direct.py), before
the transaction that records them commits. The batch task then fails with an internal error,
and the run with it."""

from __future__ import annotations

from typing import Any

from segops_sync.sync import bulk_add, direct

FAULT = "injected fault: the ledger write after Klaviyo accepted the members failed"


def _fail(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(FAULT)


bulk_add.accept_job = _fail  # type: ignore[attr-defined]
direct.confirm_added = _fail  # type: ignore[attr-defined]
