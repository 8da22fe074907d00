"""A parser for the part of Klaviyo's filter syntax the simulator serves: equals(f,v), any(f,[…])."""

from __future__ import annotations

from dataclasses import dataclass


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Filter:
    op: str  # "equals" | "any"
    field: str
    values: tuple[str, ...]


def parse_filter(text: str) -> Filter:
    parser = _Parser(text)
    result = parser.expression()
    parser.skip_space()
    if not parser.done():
        raise FilterError(f"unexpected text at position {parser.pos}")
    return result


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        while not self.done() and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_space()
        if self.done() or self.text[self.pos] != char:
            raise FilterError(f"expected {char!r} at position {self.pos}")
        self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return "" if self.done() else self.text[self.pos]

    def name(self) -> str:
        self.skip_space()
        start = self.pos
        while not self.done() and (self.text[self.pos].isalnum() or self.text[self.pos] in "_-."):
            self.pos += 1
        if start == self.pos:
            raise FilterError(f"expected a name at position {start}")
        return self.text[start : self.pos]

    def expression(self) -> Filter:
        op = self.name()
        if op not in ("equals", "any"):
            raise FilterError(f"operator {op!r} is not supported here")
        self.expect("(")
        field = self.name()
        self.expect(",")
        values = self.array() if op == "any" else (self.value(),)
        self.expect(")")
        return Filter(op, field, values)

    def array(self) -> tuple[str, ...]:
        self.expect("[")
        values: list[str] = []
        if self.peek() == "]":
            self.pos += 1
            return ()
        while True:
            values.append(self.value())
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return tuple(values)

    def value(self) -> str:
        quote = self.peek()
        if quote not in ("'", '"'):
            # Klaviyo refuses unquoted strings ("Invalid filter provided").
            raise FilterError(f"expected a quoted string at position {self.pos}")
        self.pos += 1
        out: list[str] = []
        while True:
            if self.done():
                raise FilterError("unterminated string")
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                if self.done():
                    raise FilterError("unterminated escape")
                out.append(self.text[self.pos])
                self.pos += 1
            elif char == quote:
                return "".join(out)
            else:
                out.append(char)
