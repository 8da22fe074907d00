"""a finished run's member details are purged after SEGOPS_RETENTION_DAYS

Revision ID: 0008_retention
Revises: 0007_mass_removal_approvals
Create Date: 2026-12-06 20:30:00

``sync_batch_items`` kept every member's email, external id and traits of every run, forever.
The beat's purge (sync/retention.py) deletes them, and the member lists of the run's batches,
once the run finished more than SEGOPS_RETENTION_DAYS ago, then stamps the run ``purged_at``.
A partial index holds only the finished runs not purged yet, so each pass reads those and
never the whole run history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_retention"
down_revision = "0007_mass_removal_approvals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sync_runs", sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_sync_runs_unpurged",
        "sync_runs",
        ["finished_at"],
        postgresql_where=sa.text("purged_at IS NULL AND finished_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_sync_runs_unpurged", table_name="sync_runs")
    op.drop_column("sync_runs", "purged_at")
