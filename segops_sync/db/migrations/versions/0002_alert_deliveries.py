"""alert deliveries: one signed webhook per (run, event), and each connector's alert state

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 11:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("connector_id", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "event IN ('sync.failed', 'sync.held', 'sync.recovered')",
            name=op.f("ck_alert_deliveries_event"),
        ),
        sa.ForeignKeyConstraint(
            ["connector_id"],
            ["connectors.id"],
            name=op.f("fk_alert_deliveries_connector_id_connectors"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sync_runs.id"],
            name=op.f("fk_alert_deliveries_run_id_sync_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_deliveries")),
    )
    op.create_index(
        op.f("ix_alert_deliveries_connector_id"), "alert_deliveries", ["connector_id"], unique=False
    )
    op.create_index(
        "uq_alert_deliveries_run_event", "alert_deliveries", ["run_id", "event"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_alert_deliveries_run_event", table_name="alert_deliveries")
    op.drop_index(op.f("ix_alert_deliveries_connector_id"), table_name="alert_deliveries")
    op.drop_table("alert_deliveries")
