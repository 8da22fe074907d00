"""paused connectors, cancelled runs, rejected members' retry state, forget records

Revision ID: 0011_pause_rejections_forget
Revises: 0010_degraded_alert
Create Date: 2026-12-07 03:00:00

- ``connectors.status`` admits ``paused`` and ``sync_runs.status`` admits ``cancelled``
  (``connectors pause`` stops a run at its next batch boundary).
- ``member_rejections``: who Klaviyo rejected for its data, per connector, and whether a
  ``context_identified`` event has changed that data since (only then is the member sent again).
- ``forget_records``: that a member was forgotten, with nothing personal in it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_pause_rejections_forget"
down_revision = "0010_degraded_alert"
branch_labels = None
depends_on = None

_CONNECTOR_BEFORE = "status IN ('inactive', 'active', 'error')"
_CONNECTOR_AFTER = "status IN ('inactive', 'active', 'error', 'paused')"
_RUN_BEFORE = "status IN ('running', 'succeeded', 'failed', 'held')"
_RUN_AFTER = "status IN ('running', 'succeeded', 'failed', 'held', 'cancelled')"


def upgrade() -> None:
    op.drop_constraint(op.f("ck_connectors_status"), "connectors", type_="check")
    op.create_check_constraint(op.f("ck_connectors_status"), "connectors", _CONNECTOR_AFTER)
    op.drop_constraint(op.f("ck_sync_runs_status"), "sync_runs", type_="check")
    op.create_check_constraint(op.f("ck_sync_runs_status"), "sync_runs", _RUN_AFTER)
    op.create_table(
        "member_rejections",
        sa.Column("connector_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("run_id", sa.Text(), nullable=True),
        sa.Column(
            "rejected_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("retry", sa.Text(), server_default="waiting", nullable=False),
        sa.CheckConstraint("retry IN ('waiting', 'due')", name=op.f("ck_member_rejections_retry")),
        sa.ForeignKeyConstraint(
            ["connector_id"],
            ["connectors.id"],
            name=op.f("fk_member_rejections_connector_id_connectors"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("connector_id", "user_id", name=op.f("pk_member_rejections")),
    )
    op.create_index("ix_member_rejections_user_id", "member_rejections", ["user_id"], unique=False)
    op.create_table(
        "forget_records",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "requested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("klaviyo_delete", sa.Boolean(), nullable=False),
        sa.Column("lists_removed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("klaviyo_deletions", sa.Integer(), server_default="0", nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forget_records")),
    )


def downgrade() -> None:
    op.drop_table("forget_records")
    op.drop_index("ix_member_rejections_user_id", table_name="member_rejections")
    op.drop_table("member_rejections")
    op.execute("UPDATE sync_runs SET status = 'failed' WHERE status = 'cancelled'")
    op.execute("UPDATE connectors SET status = 'active' WHERE status = 'paused'")
    op.drop_constraint(op.f("ck_sync_runs_status"), "sync_runs", type_="check")
    op.create_check_constraint(op.f("ck_sync_runs_status"), "sync_runs", _RUN_BEFORE)
    op.drop_constraint(op.f("ck_connectors_status"), "connectors", type_="check")
    op.create_check_constraint(op.f("ck_connectors_status"), "connectors", _CONNECTOR_BEFORE)
