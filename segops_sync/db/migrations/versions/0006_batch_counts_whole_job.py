"""a batch names the job that holds all its members, and counts its trait updates itself

Revision ID: 0006_batch_counts_whole_job
Revises: 0005_ledger_trigger
Create Date: 2026-12-01 14:20:00

Closing a run counted its trait updates and refused trait values over every member row of the
run (0.25 s for a million, at the very end of the sync), and its suppressed members over the
connector's whole ledger (0.13 s). Each batch now counts its own when it finishes, from the rows
its closing query reads anyway, and the run sums its batches as it does for added and removed.
A partial index holds the few suppressed members.

A batch sent in one bulk job (the common case) wrote that job's id on each of its 10,000 member
rows. The batch row now names it (``whole_job_id``): it holds every member of the batch with
neither a job nor an outcome of its own. Member rows still carry the job when a batch needed
more than one (the 5 MB cap).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_batch_counts_whole_job"
down_revision = "0005_ledger_trigger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "sync_batches", sa.Column("updated", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "sync_batches",
        sa.Column("traits_dropped", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("sync_batches", sa.Column("whole_job_id", sa.Text(), nullable=True))
    op.create_index(
        "ix_connector_members_suppressed",
        "connector_members",
        ["connector_id"],
        postgresql_where=sa.text("suppressed"),
    )


def downgrade() -> None:
    op.drop_index("ix_connector_members_suppressed", table_name="connector_members")
    # members of a batch's whole job get its id on their rows again
    op.execute(
        "UPDATE sync_batch_items it SET job_id = b.whole_job_id FROM sync_batches b "
        "WHERE b.whole_job_id IS NOT NULL AND it.run_id = b.run_id AND it.kind = b.kind "
        "AND it.seq = b.seq AND it.job_id IS NULL AND it.outcome IS NULL"
    )
    op.drop_column("sync_batches", "whole_job_id")
    op.drop_column("sync_batches", "traits_dropped")
    op.drop_column("sync_batches", "updated")
