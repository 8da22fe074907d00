"""Alembic environment: the URL comes from the caller (``segops-sync db upgrade``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from segops_sync.db.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "segops-sync db upgrade sets sqlalchemy.url"

connectable = create_engine(url, poolclass=pool.NullPool, hide_parameters=True)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        # Two `db upgrade` at once (two workers starting) must not race.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7313001)")
        context.run_migrations()
