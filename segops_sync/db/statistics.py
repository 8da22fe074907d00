"""Planner statistics that keep up with our own bulk writes.

PostgreSQL plans from statistics that autovacuum refreshes once about 10 % of a table has
changed, a minute or more later, and never where autovacuum is off. A sync changes a table by a
million rows within a minute, so the next statements were planned for the table as it had been:
a DELETE of 1,000 ledger rows filtered a million (0.9 s instead of 20 ms), a churn's anti-join
seq-scanned the ledger. So whoever makes such a change analyzes the table right after it, by
autovacuum's own rule measured against what the planner currently believes (``reltuples``).
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

# autovacuum's defaults: analyze after 50 rows + 10 % of the table changed
ANALYZE_BASE = 50
ANALYZE_SHARE = 0.1
# The tables a sync or a recompute grows or shrinks in bulk.
BULK_TABLES = ("segment_members", "connector_members", "sync_batch_items")


def stale_after(changed: int, planner_rows: float) -> bool:
    """Whether ``changed`` rows make statistics of ``planner_rows`` rows stale."""
    return changed > ANALYZE_BASE + ANALYZE_SHARE * max(planner_rows, 0.0)


def planner_rows(session: Session, table: str) -> float:
    """How many rows the planner thinks ``table`` has (-1: never analyzed)."""
    value = session.scalar(
        text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"), {"t": table}
    )
    return float(value if value is not None else -1)


def analyze_if_stale(session: Session, table: str, changed: int) -> bool:
    """ANALYZE ``table`` when ``changed`` rows outgrew what the planner knows; True if it did."""
    if table not in BULK_TABLES:
        raise ValueError(f"not a table a sync writes in bulk: {table}")
    if not stale_after(changed, planner_rows(session, table)):
        return False
    session.execute(text(f"ANALYZE {table}"))
    return True
