"""batches planned as key ranges, their members written when the batch first runs

Revision ID: 0004_batch_ranges
Revises: 0002_traits
Create Date: 2026-11-30 15:20:00

A run of a million adds used to write a million ``sync_batch_items`` rows before its first
Klaviyo call (22 s here). Now the planner writes one row per batch with the range of user ids
it covers (a small delta's batch: its exact members), and each batch writes its own members
when it first runs, in parallel with the
others' HTTP. Its rows leave room for their two updates (fillfactor). The per-row foreign key of the items on ``sync_runs`` (half of the cost of
writing them) becomes a statement-level trigger that deletes a deleted run's items.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004_batch_ranges"
down_revision = "0002_traits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sync_batches", sa.Column("lo_user_id", sa.Text(), nullable=True))
    op.add_column("sync_batches", sa.Column("hi_user_id", sa.Text(), nullable=True))
    op.add_column("sync_batches", sa.Column("user_ids", postgresql.ARRAY(sa.Text()), nullable=True))
    op.add_column(
        "sync_batches",
        sa.Column("materialized", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    # A member's row is updated twice (its job, then its outcome), neither column indexed: room
    # on the page lets both be HOT updates, with no new index entries.
    op.execute("ALTER TABLE sync_batch_items SET (fillfactor = 50)")
    op.drop_constraint(
        "fk_sync_batch_items_run_id_sync_runs", "sync_batch_items", type_="foreignkey"
    )
    op.execute(
        """
        CREATE FUNCTION segops_delete_run_items() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM sync_batch_items it USING deleted_runs d WHERE it.run_id = d.id;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER sync_runs_delete_items AFTER DELETE ON sync_runs "
        "REFERENCING OLD TABLE AS deleted_runs FOR EACH STATEMENT "
        "EXECUTE FUNCTION segops_delete_run_items()"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE sync_batch_items RESET (fillfactor)")
    op.execute("DROP TRIGGER sync_runs_delete_items ON sync_runs")
    op.execute("DROP FUNCTION segops_delete_run_items()")
    op.execute(
        "DELETE FROM sync_batch_items it WHERE NOT EXISTS "
        "(SELECT 1 FROM sync_runs r WHERE r.id = it.run_id)"
    )
    op.create_foreign_key(
        "fk_sync_batch_items_run_id_sync_runs",
        "sync_batch_items",
        "sync_runs",
        ["run_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.drop_column("sync_batches", "materialized")
    op.drop_column("sync_batches", "user_ids")
    op.drop_column("sync_batches", "hi_user_id")
    op.drop_column("sync_batches", "lo_user_id")
