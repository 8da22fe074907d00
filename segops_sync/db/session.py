"""Engine and session factory, one per process (safe across Celery's prefork)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from segops_sync.config import get_settings, normalise_database_url

_engine: Engine | None = None
_engine_pid: int | None = None
_factory: sessionmaker[Session] | None = None


def make_engine(url: str) -> Engine:
    return create_engine(
        normalise_database_url(url),
        pool_pre_ping=True,  # survive a PostgreSQL restart without a worker restart
        pool_size=5,
        max_overflow=5,
        # SQL errors name their statement, never its values: those are emails, ids and traits,
        # and errors end up in logs, task events and run errors.
        hide_parameters=True,
        # No server-side prepared statements: a generic plan cached while a table was empty
        # (the ledger before a first sync) outlives its shape: one run later its anti-join would
        # seq-scan a million ledger rows per member. Every statement is planned with the
        # table as it is; planning costs microseconds next to statements over 10,000 rows.
        connect_args={"connect_timeout": 10, "prepare_threshold": None},
    )


def get_engine() -> Engine:
    """The process's engine; rebuilt after a fork so no pooled socket is shared."""
    global _engine, _engine_pid, _factory
    if _engine is None or _engine_pid != os.getpid():
        if _engine is not None:
            _engine.dispose(close=False)
        _engine = make_engine(get_settings().require_database_url())
        _engine_pid = os.getpid()
        _factory = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def reset_engine() -> None:
    global _engine, _engine_pid, _factory
    if _engine is not None:
        _engine.dispose(close=_engine_pid == os.getpid())
    _engine = _engine_pid = _factory = None


@contextmanager
def session_scope() -> Iterator[Session]:
    """One short transaction: commit on success, roll back on error."""
    get_engine()
    assert _factory is not None
    with _factory() as session, session.begin():
        yield session
