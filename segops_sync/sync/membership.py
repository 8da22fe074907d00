"""Replacing a segment's membership the way the recompute service does: one transaction, COPY."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import IO, Any, cast

from sqlalchemy import CursorResult, text
from sqlalchemy.orm import Session

from segops_sync.errors import InputError
from segops_sync.sync.identity import MAX_USER_ID


def _lines(stream: IO[bytes], name: str) -> Iterator[str]:
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InputError(f"{name}: line {number} is not UTF-8 text") from None
        if not line:
            continue
        if len(line) > MAX_USER_ID or any(ord(c) < 32 for c in line):
            raise InputError(
                f"{name}: line {number} is not a user_id (1 to {MAX_USER_ID} printable characters)"
            )
        yield line


def open_members(path: str) -> tuple[IO[bytes], str]:
    if path == "-":
        return sys.stdin.buffer, "standard input"
    try:
        return open(path, "rb"), path
    except OSError as exc:
        raise InputError(f"cannot read members file {path!r}: {exc.strerror}") from None


def replace_membership(session: Session, segment_id: str, path: str) -> int:
    """Stream the file into the segment. A bad line aborts the transaction: nothing is written."""
    stream, name = open_members(path)
    try:
        raw: Any = session.connection().connection.driver_connection
        session.execute(text("CREATE TEMP TABLE incoming_members (user_id text) ON COMMIT DROP"))
        with raw.cursor() as cur, cur.copy("COPY incoming_members (user_id) FROM STDIN") as copy:
            for user_id in _lines(stream, name):
                copy.write_row((user_id,))
        session.execute(
            text("DELETE FROM segment_members WHERE segment_id = :s"), {"s": segment_id}
        )
        result = cast(
            CursorResult[Any],
            session.execute(
                text(
                    "INSERT INTO segment_members (segment_id, user_id) "
                    "SELECT DISTINCT :s, user_id FROM incoming_members"
                ),
                {"s": segment_id},
            ),
        )
        return int(result.rowcount)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
