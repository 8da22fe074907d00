"""Worker logs: one JSON object a line with ``SEGOPS_LOG_FORMAT=json``, the connector and run of
each line, and no member data.

- Context: tasks :func:`bind` the ``connector_id`` / ``run_id`` they work on (contextvars), and a
  filter copies them onto every record, Celery's own lines included.
- JSON: python-json-logger's formatter, which already handles exceptions, stack info and values
  ``json`` cannot encode; we only choose the field names (``ts``, ``level``, ``logger``,
  ``message``).
- Member data: library loggers are the risk (httpx logs every request URL at INFO, and a profile
  lookup carries emails and external ids in its ``filter``). Request URLs are rewritten to the
  endpoint template before any handler sees them; what still looks like an email, a phone number
  or a key is masked in every line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from segops_sync.klaviyo.endpoints import endpoint_for
from segops_sync.klaviyo.redact import scrub

CONTEXT_FIELDS = ("connector_id", "run_id", "task_id", "task_name")
_context: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"segops_{name}", default=None) for name in CONTEXT_FIELDS
}

# Shapes of member data that can be recognised in free text. External ids cannot be; they are
# kept out by never logging them and by rewriting library URLs.
# A match starts only where a run of local-part characters starts: without the look-behind, a
# long run with no "@" is scanned again from each of its characters (10 MB of one argument held
# a worker's consumer for hours).
# \w is Unicode: an address we accept (identity.EMAIL_PATTERN) may be josé@exämple.de, its
# accents written as combining marks too (U+0300-U+036F, which \w leaves out).
_LETTER = r"\w\u0300-\u036f"
_EMAIL = re.compile(
    rf"(?<![{_LETTER}.%+\-])[{_LETTER}.%+\-]+(?:@|%40)[{_LETTER}\-]+(?:\.[{_LETTER}\-]+)+"
)
_PHONE = re.compile(r"(?:\+|%2B)[1-9][0-9 ().\-]{6,18}[0-9]")
# PostgreSQL's DETAIL line quotes row values ("Failing row contains (…)", "Key (user_id)=(…)"):
# user ids and traits no pattern recognises. It ends at a newline, or at "\n" in a repr.
_PG_DETAIL = re.compile(r"(DETAIL:\s*)(?:(?!\\n)[^\n])+")
MASK = "[redacted]"
_POOL_APPLY = "TaskPool: Apply %s (args:%s kwargs:%s)"  # celery/concurrency/base.py


def bind(**values: str | None) -> None:
    """Tag the lines that follow (in this task) with these ids; None leaves a field as it is."""
    for name, value in values.items():
        if value is not None:
            _context[name].set(value)


def clear() -> None:
    for var in _context.values():
        var.set(None)


@contextmanager
def bound(**values: str | None) -> Iterator[None]:
    tokens = [(_context[k], _context[k].set(v)) for k, v in values.items() if v is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    return {k: v for k, var in _context.items() if (v := var.get()) is not None}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _context.items():
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


UrlLabeler = Callable[[str, Any], str]


def host_only(method: str, url: Any) -> str:
    """A URL we cannot name: its host, never its path or query."""
    host = getattr(url, "host", None) or "?"
    return f"{method} {getattr(url, 'scheme', 'http')}://{host}/…"


def klaviyo_url_label(method: str, url: Any) -> str:
    """Klaviyo URLs become their endpoint template; any other URL only its host."""
    endpoint = endpoint_for(method, getattr(url, "path", ""))
    return endpoint.value if endpoint is not None else host_only(method, url)


class HttpUrlFilter(logging.Filter):
    """httpx logs ``HTTP Request: METHOD URL "HTTP/1.1 200 OK"`` at INFO; the URL becomes a label
    (the endpoint template for Klaviyo) so lookups by email never reach a log."""

    def __init__(self, labeler: UrlLabeler = host_only) -> None:
        super().__init__()
        self.labeler = labeler

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("httpx", "httpcore")) or not isinstance(record.args, tuple):
            return True
        args = list(record.args)
        changed = False
        for i, arg in enumerate(args):
            if _is_url(arg):
                method = str(args[i - 1]) if i > 0 else "?"
                label = self.labeler(method, arg)
                # the label already starts with the method: drop the separate one
                args[i] = label.split(" ", 1)[1] if label.startswith(f"{method} ") else label
                changed = True
        if changed:
            record.args = tuple(args)
        return True


def _is_url(value: Any) -> bool:
    return type(value).__name__ == "URL" and hasattr(value, "host") and hasattr(value, "query")


class MemberDataFilter(logging.Filter):
    """Masks emails, phone numbers and API keys in the final text of every record, its
    traceback included (an exception's text quotes what failed: a SQL error's row, an email);
    and drops the task arguments Celery's pool prints at DEBUG (``context_identified`` carries a
    user id and an email there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _POOL_APPLY and isinstance(record.args, tuple) and len(record.args) == 3:
            record.args = (record.args[0], "(…)", "{…}")
        try:
            message = record.getMessage()
        except Exception:  # a broken record is logging's to report, not ours
            return True
        cleaned = mask_member_data(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        _mask_traceback(record)
        return True


# The one API route whose path holds a member's identifier (GET /v1/members/{user_id}).
MEMBER_ROUTE = "/v1/members/"


class AccessPathFilter(logging.Filter):
    """uvicorn's access log line (``client - "METHOD path HTTP/v" status``, the path in its
    args) names the member a trace asked for: the route's template replaces it, and emails or
    phone numbers in any other path are masked. The args keep their shape, which uvicorn's
    access formatter unpacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path = args[2]
            if path.startswith(MEMBER_ROUTE):
                path = MEMBER_ROUTE + "{user_id}"
            record.args = (args[0], args[1], mask_member_data(path), args[3], args[4])
        return True


def install_api() -> None:
    """The API process's uvicorn loggers (call after uvicorn configured them): no member in
    the access log; emails, phone numbers and keys masked in its errors and tracebacks."""
    for name, kind in (("uvicorn.access", AccessPathFilter), ("uvicorn.error", MemberDataFilter)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):  # once, however many servers
            logger.addFilter(kind())


_TRACEBACKS = logging.Formatter()


def _mask_traceback(record: logging.LogRecord) -> None:
    """The traceback becomes masked text (``exc_text``), which the text and JSON formatters both
    print as it is when the record carries no ``exc_info`` left to format."""
    info: Any = record.exc_info
    if info is True:  # Celery's records may carry True: the exception being handled
        info = sys.exc_info()
    if isinstance(info, tuple) and info[0] is not None:
        record.exc_text = record.exc_text or _TRACEBACKS.formatException(info)
    record.exc_info = None
    if record.exc_text:
        record.exc_text = mask_member_data(record.exc_text)
    if record.stack_info:
        record.stack_info = mask_member_data(record.stack_info)


def mask_member_data(text: str) -> str:
    masked = _PHONE.sub(MASK, _EMAIL.sub(MASK, scrub(text)))
    return _PG_DETAIL.sub(lambda m: m.group(1) + MASK, masked)


class JsonLines(JsonFormatter):
    """``{"ts", "level", "logger", "message", ...context, "exc_info"?}`` on one line."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            # Celery passes its format context (task args and kwargs) as extra "data": the
            # message already says what matters, and args may hold member data.
            reserved_attrs=[*_RESERVED, "data"],
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)
        log_data.setdefault("pid", record.process or os.getpid())


def _reserved() -> list[str]:
    from pythonjsonlogger.core import RESERVED_ATTRS

    return [a for a in RESERVED_ATTRS if a not in ("levelname", "name", "message")]


_RESERVED = _reserved()


def install(
    loggers: Iterable[logging.Logger],
    *,
    json_format: bool,
    labeler: UrlLabeler = klaviyo_url_label,
) -> None:
    """Every handler of these loggers: the context, URL labels, masking, and JSON if asked.

    Handler filters (not logger filters) so records propagated from any child logger, Celery's
    and the libraries', pass through them.
    """
    filters: list[logging.Filter] = [ContextFilter(), HttpUrlFilter(labeler), MemberDataFilter()]
    for logger in loggers:
        for handler in logger.handlers:
            if any(isinstance(f, ContextFilter) for f in handler.filters):
                continue
            for f in filters:
                handler.addFilter(f)
            if json_format:
                handler.setFormatter(JsonLines())


def json_line(message: str, *, level: str = "INFO", logger: str = "celery") -> bytes:
    """A JSON log line built without the logging machinery (safe inside a signal handler)."""
    import json

    doc = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": logger,
        "message": mask_member_data(message.strip()),
        "pid": os.getpid(),
    }
    return (json.dumps(doc) + "\n").encode()
