"""members Klaviyo may have accepted are never lost: batches in doubt, unconfirmed ledger rows

Revision ID: 0009_accepted_members
Revises: 0008_retention
Create Date: 2026-12-06 20:30:00

A run that failed after Klaviyo accepted its members (a bulk job completed, a list write
answered) but before the ledger recorded them left them on the list with no trace: when they
left the segment they were never removed. An add batch now records that it is sending
(``sync_batches.sent_at``, and ``in_doubt`` until its members are accounted for) before it asks
Klaviyo; the next run's planner enters the unsettled members of such a batch in the ledger as
unconfirmed (``connector_members.confirmed`` false): removed if they left the segment, sent
again if they are still in it. Runs remember the list they wrote to (``sync_runs.list_id``), so
that a read-back counts as ours only what this connector added to this very list.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_accepted_members"
down_revision = "0008_retention"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: no table rewrite, whatever the size of the ledger.
    op.add_column(
        "connector_members",
        sa.Column("confirmed", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.add_column("sync_batches", sa.Column("sent_at", sa.DateTime(timezone=True)))
    op.add_column(
        "sync_batches",
        sa.Column("in_doubt", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_index(
        "ix_sync_batches_in_doubt",
        "sync_batches",
        ["run_id"],
        postgresql_where=sa.text("in_doubt"),
    )
    # Older runs stay NULL: which list they wrote to is not known, so they count for none.
    op.add_column("sync_runs", sa.Column("list_id", sa.Text()))


def downgrade() -> None:
    op.drop_column("sync_runs", "list_id")
    op.drop_index("ix_sync_batches_in_doubt", table_name="sync_batches")
    op.drop_column("sync_batches", "in_doubt")
    op.drop_column("sync_batches", "sent_at")
    # Unconfirmed rows may not be on the list: without the flag they would count as on it.
    op.execute("DELETE FROM connector_members WHERE NOT confirmed")
    op.drop_column("connector_members", "confirmed")
