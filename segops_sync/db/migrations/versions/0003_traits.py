"""traits, trait hashes, run counters for traits and verification, list snapshots

Revision ID: 0002_traits (the id agreed in parallel; it runs after the alerts migration "0002")
Revises: 0002
Create Date: 2026-11-30 11:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_traits"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "identities",
        sa.Column(
            "traits",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    # An event with traits but no email is stored too.
    op.alter_column("identities", "email", existing_type=sa.Text(), nullable=True)
    op.add_column(
        "connectors",
        sa.Column(
            "traits",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
    )
    op.add_column("connectors", sa.Column("opt_in_process", sa.Text(), nullable=True))
    op.add_column("connector_members", sa.Column("traits_hash", sa.Text(), nullable=True))
    op.add_column(
        "connector_members",
        sa.Column("suppressed", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column(
        "sync_batch_items",
        sa.Column("traits", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column("sync_batch_items", sa.Column("traits_hash", sa.Text(), nullable=True))
    op.add_column(
        "sync_batch_items",
        sa.Column("refresh", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column(
        "sync_batch_items",
        sa.Column("dropped_traits", postgresql.ARRAY(sa.Text()), nullable=True),
    )
    for name in ("updated", "traits_dropped", "suppressed"):
        op.add_column(
            "sync_runs", sa.Column(name, sa.Integer(), server_default="0", nullable=False)
        )
    for name in ("verify_in_list", "verify_expected", "verify_missing", "verify_extra"):
        op.add_column("sync_runs", sa.Column(name, sa.Integer(), nullable=True))
    op.create_table(
        "list_snapshots",
        sa.Column("verify_id", sa.Text(), nullable=False),
        sa.Column("profile_id", sa.Text(), nullable=False),
        sa.Column("connector_id", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("external_id", sa.Text(), nullable=True),
        sa.Column("suppressed", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "taken_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["connector_id"],
            ["connectors.id"],
            name=op.f("fk_list_snapshots_connector_id_connectors"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("verify_id", "profile_id", name=op.f("pk_list_snapshots")),
    )
    op.create_index(
        op.f("ix_list_snapshots_connector_id"), "list_snapshots", ["connector_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_list_snapshots_connector_id"), table_name="list_snapshots")
    op.drop_table("list_snapshots")
    for name in (
        "verify_extra",
        "verify_missing",
        "verify_expected",
        "verify_in_list",
        "suppressed",
        "traits_dropped",
        "updated",
    ):
        op.drop_column("sync_runs", name)
    for name in ("dropped_traits", "refresh", "traits_hash", "traits"):
        op.drop_column("sync_batch_items", name)
    op.drop_column("connector_members", "suppressed")
    op.drop_column("connector_members", "traits_hash")
    op.drop_column("connectors", "traits")
    op.drop_column("connectors", "opt_in_process")
    op.execute("DELETE FROM identities WHERE email IS NULL")
    op.alter_column("identities", "email", existing_type=sa.Text(), nullable=False)
    op.drop_column("identities", "traits")
