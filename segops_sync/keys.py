"""Keys out of sight: API keys read from a file, the start-up key check, and re-encryption.

Rotating ``SEGOPS_SECRET_KEY`` (docs/operations.md, "Rotating SEGOPS_SECRET_KEY"): put the new
key first (``new,old``) on every process, run ``segops-sync keys reencrypt``, then drop the old
key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from sqlalchemy import create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from segops_sync.config import ConfigError, Settings
from segops_sync.db.models import Connector
from segops_sync.errors import InputError
from segops_sync.secrets import decrypt_api_key, encrypted_with_first, reencrypt_api_key

# Connectors checked at start: the oldest are the likeliest to hold a key the ring no longer has
# (stored before a rotation), the newest show what the running fleet writes.
CHECK_OLDEST, CHECK_NEWEST = 3, 2

KEY_MISMATCH = (
    "SEGOPS_SECRET_KEY does not decrypt the stored API keys: no key in it is the one they were "
    "encrypted with (add the previous key after a comma, see `segops-sync keys reencrypt`)"
)


def read_api_key_file(path: str) -> str:
    """The key in ``path`` (``-``: stdin), without the trailing newline an editor adds."""
    try:
        if path == "-":
            raw = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise InputError(f"cannot read --api-key-file {path!r}: {reason}") from None
    return raw.strip()


def check_stored_keys(session: Session, secret_key: str) -> int:
    """Raise ``ConfigError`` naming SEGOPS_SECRET_KEY when a sampled stored key does not decrypt.

    Returns how many keys were checked (0 for an empty table, which is fine).
    """
    oldest = select(Connector.api_key_encrypted).order_by(Connector.created_at, Connector.id)
    newest = select(Connector.api_key_encrypted).order_by(
        Connector.created_at.desc(), Connector.id.desc()
    )
    tokens = list(session.scalars(oldest.limit(CHECK_OLDEST)))
    tokens += list(session.scalars(newest.limit(CHECK_NEWEST)))
    for token in tokens:
        try:
            decrypt_api_key(token, secret_key)
        except ConfigError:
            raise ConfigError(KEY_MISMATCH) from None
    return len(tokens)


def check_keys_at_start(settings: Settings) -> str | None:
    """For a worker or the API about to start: refuse early rather than fail every sync later.

    A database that cannot be reached (or is not migrated yet) is not a key problem: the process
    starts as it did before and reports that on first use; the returned warning says so.
    """
    secret_key = settings.require_secret_key()
    engine = create_engine(
        settings.require_database_url(),
        poolclass=NullPool,
        connect_args={"connect_timeout": 10},
        hide_parameters=True,  # an error is printed at start: no stored values in it
    )
    try:
        with Session(engine) as session:
            check_stored_keys(session, secret_key)
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return f"segops-sync: warning: could not check the stored API keys: {first}"
    finally:
        engine.dispose()
    return None


@dataclass(frozen=True)
class Reencrypted:
    reencrypted: int
    already_current: int


def reencrypt_all(session: Session, secret_key: str) -> Reencrypted:
    """Re-encrypt every stored API key with the first key of the ring; idempotent.

    Keys already under the first key are left alone, so a second run changes nothing. One
    transaction: if any key cannot be decrypted, nothing is written.
    """
    rows = session.scalars(select(Connector).order_by(Connector.id).with_for_update())
    done = current = 0
    for connector in rows:
        token = bytes(connector.api_key_encrypted)
        if encrypted_with_first(token, secret_key):
            current += 1
            continue
        try:
            connector.api_key_encrypted = reencrypt_api_key(token, secret_key)
        except ConfigError:
            raise ConfigError(
                f"SEGOPS_SECRET_KEY does not decrypt the API key of connector {connector.id}: "
                "add the key it was stored with after a comma; nothing was re-encrypted"
            ) from None
        done += 1
    session.flush()
    return Reencrypted(reencrypted=done, already_current=current)
