"""Signed alert webhooks (INTERFACE.md): the body, its signature, one delivery attempt.

What to send and when (``sync.failed``, ``sync.held``, ``sync.recovered``) is decided by
``sync.alerts`` with the run's state in PostgreSQL; this module only turns an alert into bytes
and puts them on the wire. The body is built once and stored, so every retry sends (and signs)
exactly the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime

import httpx

from segops_sync.klaviyo.redact import scrub
from segops_sync.states import AlertEvent

SIGNATURE_HEADER = "X-SegOps-Signature"
EVENTS = frozenset(AlertEvent)
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def alert_body(
    event: str, *, connector_id: str, run_id: str, status: str, error: str | None, at: datetime
) -> bytes:
    if event not in EVENTS:
        raise ValueError(f"unknown alert event {event!r}")
    doc = {
        "event": str(event),
        "connector_id": connector_id,
        "run_id": run_id,
        "status": str(status),
        # run errors are written without keys already; scrub again, a body must never hold one
        "error": scrub(error) if error else None,
        "at": at.isoformat(),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def signature(body: bytes, secret: str) -> str:
    """``sha256=<hex HMAC-SHA256 of the raw body>``: what the receiver recomputes and compares."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    detail: str  # "HTTP 200", "HTTP 503", "ConnectError", ... (never the URL: it may hold a token)


def send(url: str, secret: str, body: bytes, *, event: str) -> Attempt:
    """One POST. 2xx is delivered; anything else (or no answer) is for the caller to retry."""
    headers = {
        "content-type": "application/json",
        "user-agent": "segops-sync",
        SIGNATURE_HEADER: signature(body, secret),
        "X-SegOps-Event": event,
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT)
    except httpx.HTTPError as exc:
        return Attempt(False, type(exc).__name__)
    return Attempt(response.is_success, f"HTTP {response.status_code}")
