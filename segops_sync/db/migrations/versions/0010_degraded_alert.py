"""alert deliveries: the sync.degraded event

Revision ID: 0010_degraded_alert
Revises: 0009_accepted_members
Create Date: 2026-12-07 01:00:00

A succeeded run that rejected too large a share of its members, or took far longer than its
expected time, is alerted as ``sync.degraded`` (sync/alerts.py): the event check admits it.
Only a CHECK constraint changes (validated against existing rows, which all pass).
"""

from __future__ import annotations

from alembic import op

revision = "0010_degraded_alert"
down_revision = "0009_accepted_members"
branch_labels = None
depends_on = None

_BEFORE = "event IN ('sync.failed', 'sync.held', 'sync.recovered')"
_AFTER = "event IN ('sync.failed', 'sync.held', 'sync.recovered', 'sync.degraded')"


def upgrade() -> None:
    op.drop_constraint(op.f("ck_alert_deliveries_event"), "alert_deliveries", type_="check")
    op.create_check_constraint(op.f("ck_alert_deliveries_event"), "alert_deliveries", _AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM alert_deliveries WHERE event = 'sync.degraded'")
    op.drop_constraint(op.f("ck_alert_deliveries_event"), "alert_deliveries", type_="check")
    op.create_check_constraint(op.f("ck_alert_deliveries_event"), "alert_deliveries", _BEFORE)
