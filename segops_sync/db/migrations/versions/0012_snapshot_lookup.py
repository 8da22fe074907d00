"""indexes on list_snapshots for a forget's delete by email or external id

Revision ID: 0012_snapshot_lookup
Revises: 0011_pause_rejections_forget
Create Date: 2026-12-07 21:35:00

A forget deletes the member's rows of a read-back in progress by ``lower(email)`` or
``external_id`` while it holds the connector rows a batch step needs; without these indexes
that statement read the whole snapshot (216 ms at 1M profiles, bench/bench_forget.py).
Snapshots live only while a read-back runs, so the table is small when this runs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_snapshot_lookup"
down_revision = "0011_pause_rejections_forget"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_list_snapshots_email", "list_snapshots", [sa.text("lower(email)")])
    op.create_index("ix_list_snapshots_external_id", "list_snapshots", ["external_id"])


def downgrade() -> None:
    op.drop_index("ix_list_snapshots_external_id", table_name="list_snapshots")
    op.drop_index("ix_list_snapshots_email", table_name="list_snapshots")
