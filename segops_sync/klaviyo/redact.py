"""The one place that keeps private API keys out of text: hints, fingerprints, scrubbing, logs.

Everything that shows, labels or masks a key calls this module: the connector's ``api_key``
hint, the client's repr, exception messages, log records and the limiter's cache keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re

# Private keys are "pk_" + a long alphanumeric tail; anything shaped like one is masked, even if
# it is not a key we know, because a leaked key costs far more than an over-eager mask.
_KEY_SHAPE = re.compile(r"pk_[A-Za-z0-9_]{8,}")
_AUTH_HEADER = re.compile(r"(Klaviyo-API-Key|Bearer)\s+\S+", re.IGNORECASE)
MASK = "[redacted]"
# Below this length the last four characters would give away too much of the key.
_HINT_MIN_LENGTH = 13
_FINGERPRINT_KEY = b"segops-sync/klaviyo-key-fingerprint/v1"


def redact_key(api_key: str) -> str:
    """``pk_…ab12``: enough for a person to tell keys apart, never the whole key."""
    return f"pk_…{api_key[-4:]}" if len(api_key) >= _HINT_MIN_LENGTH else "pk_…"


def fingerprint(api_key: str) -> str:
    """A stable, non-reversible identifier of a key: safe to store in Redis and to log."""
    return hmac.new(_FINGERPRINT_KEY, api_key.encode(), hashlib.sha256).hexdigest()


def scrub(text: str, *secrets: str | None) -> str:
    """Remove any key that slipped into text meant for people or logs.

    Known secrets become their hint; anything else shaped like a key, or an Authorization
    value, becomes a mask, because a leaked key costs far more than an over-eager mask.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, redact_key(secret))
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _KEY_SHAPE.sub(MASK, text)


class Secret:
    """Holds a key so that repr(), vars() and debuggers' object dumps show a mask, not the key."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({redact_key(self._value)!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not picklable")


class RedactingFilter(logging.Filter):
    """Masks key-shaped text in records of the HTTP libraries before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix; let logging report it
            return True
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


# Logger filters do not apply to records of child loggers, so each emitting logger gets one.
_HTTP_LOGGERS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "segops_sync.klaviyo",
)
_installed = False


def install_log_redaction() -> None:
    global _installed
    if _installed:
        return
    for name in _HTTP_LOGGERS:
        logging.getLogger(name).addFilter(RedactingFilter())
    _installed = True
