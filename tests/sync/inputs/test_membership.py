"""Feeding a members file to COPY: the fast block path and the line path agree."""

from __future__ import annotations

import io

import pytest

from segops_sync.errors import InputError
from segops_sync.sync.inputs import membership


class FakeCopy:
    """Decodes what COPY (text format, one column) would receive back into rows."""

    def __init__(self) -> None:
        self.text = ""
        self.blocks = 0

    def write(self, data: bytes) -> None:
        self.text += data.decode()
        self.blocks += 1

    def write_row(self, row: tuple[str]) -> None:
        self.text += row[0].replace("\\", "\\\\") + "\n"

    def rows(self) -> list[str]:
        return [line.replace("\\\\", "\\") for line in self.text.splitlines()]


def feed(data: bytes, monkeypatch: pytest.MonkeyPatch, block: int = 1 << 20) -> FakeCopy:
    monkeypatch.setattr(membership, "_BLOCK", block)
    copy = FakeCopy()
    membership._copy_lines(io.BytesIO(data), "members.txt", copy)
    return copy


def test_plain_lines_go_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    copy = feed(b"a@example.com\ncust-1\nwe\\ird\n", monkeypatch)
    assert copy.blocks == 1
    assert copy.rows() == ["a@example.com", "cust-1", "we\\ird"]


def test_lines_that_need_a_look_are_cleaned_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"a\n  spaced  \r\n\n\xc3\xa9t\xc3\xa9\nlast"
    copy = feed(data, monkeypatch)
    assert copy.rows() == ["a", "spaced", "\u00e9t\u00e9", "last"]


def test_a_bad_line_is_named_by_its_number_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    good = b"".join(b"user-%d\n" % i for i in range(50))
    with pytest.raises(InputError, match="line 51 is not a user_id"):
        feed(good + b"tab\there\n", monkeypatch, block=64)
    with pytest.raises(InputError, match="line 3 is not UTF-8"):
        feed(b"a\nb\n\xff\n", monkeypatch, block=64)
    with pytest.raises(InputError, match="line 2 is not a user_id"):
        feed(b"a\n" + b"x" * 256 + b"\n", monkeypatch)
