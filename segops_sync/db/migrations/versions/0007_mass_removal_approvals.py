"""mass-removal approvals: a person approves a held mass removal, in PostgreSQL

Revision ID: 0007_mass_removal_approvals
Revises: 0006_batch_counts_whole_job
Create Date: 2026-12-06 20:30:00

A run held by the mass-removal guard was applied by a run started with ``allow_mass_removal``,
which a ``segops.sync_connector`` message could set: whoever reached the broker could empty a
list. The approval is now a row written by ``connectors resync --allow-mass-removal`` (or the
API's resync): who, when, the held run it approves, until when. The next run planned takes it
(``run_id``), whether or not it needs it, so one approval serves one run.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_mass_removal_approvals"
down_revision = "0006_batch_counts_whole_job"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mass_removal_approvals",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("connector_id", sa.Text(), nullable=False),
        sa.Column("held_run_id", sa.Text(), nullable=True),
        sa.Column("run_id", sa.Text(), nullable=True),
        sa.Column("approved_by", sa.Text(), nullable=False),
        sa.Column(
            "approved_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "length(approved_by) BETWEEN 1 AND 100",
            name=op.f("ck_mass_removal_approvals_approved_by"),
        ),
        sa.ForeignKeyConstraint(
            ["connector_id"],
            ["connectors.id"],
            name=op.f("fk_mass_removal_approvals_connector_id_connectors"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["held_run_id"],
            ["sync_runs.id"],
            name=op.f("fk_mass_removal_approvals_held_run_id_sync_runs"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sync_runs.id"],
            name=op.f("fk_mass_removal_approvals_run_id_sync_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mass_removal_approvals")),
    )
    op.create_index(
        op.f("ix_mass_removal_approvals_connector_id"),
        "mass_removal_approvals",
        ["connector_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_mass_removal_approvals_held_run_id"),
        "mass_removal_approvals",
        ["held_run_id"],
        unique=False,
    )
    op.create_index(
        "uq_mass_removal_approvals_run_id",
        "mass_removal_approvals",
        ["run_id"],
        unique=True,
        postgresql_where=sa.text("run_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_mass_removal_approvals_run_id", table_name="mass_removal_approvals")
    op.drop_index(
        op.f("ix_mass_removal_approvals_held_run_id"), table_name="mass_removal_approvals"
    )
    op.drop_index(
        op.f("ix_mass_removal_approvals_connector_id"), table_name="mass_removal_approvals"
    )
    op.drop_table("mass_removal_approvals")
