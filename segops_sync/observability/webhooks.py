"""Signed alert webhooks (docs/contract.md): the body, its signature, one delivery attempt.

What to send and when (``sync.failed``, ``sync.held``, ``sync.degraded``, ``sync.recovered``)
is decided by ``sync.alerts`` with the run's state in PostgreSQL; this module only turns an alert into bytes
and puts them on the wire. The body is built once and stored, so every retry sends (and signs)
exactly the same bytes.

Replay protection (docs/contract.md "Alert webhooks (third round)"): each attempt also carries
``X-SegOps-Delivery`` (one id per alert, the same on every retry, for receivers to de-duplicate)
and ``X-SegOps-Timestamp`` (the attempt's Unix time), and ``X-SegOps-Signature-256`` signs the
two together, ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<raw body>">``: a receiver
that refuses old timestamps refuses a captured alert sent again. ``X-SegOps-Signature`` stays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import httpx

from segops_sync.klaviyo.redact import scrub
from segops_sync.states import AlertEvent

SIGNATURE_HEADER = "X-SegOps-Signature"
SIGNATURE_256_HEADER = "X-SegOps-Signature-256"
DELIVERY_HEADER = "X-SegOps-Delivery"
TIMESTAMP_HEADER = "X-SegOps-Timestamp"
# Delivery ids are name-based UUIDs in this namespace (any fixed UUID would do; never change it:
# a retry after an upgrade must keep its id).
DELIVERY_NAMESPACE = uuid.UUID("6f1b7a52-3f0c-4c5e-9a57-2d0f5c1e8b43")
EVENTS = frozenset(AlertEvent)
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def alert_body(
    event: str,
    *,
    connector_id: str,
    run_id: str,
    status: str,
    error: str | None,
    at: datetime,
    degraded: Mapping[str, object] | None = None,
) -> bytes:
    """``degraded`` (sync.degraded only): which threshold the run crossed and its figures,
    counts and seconds only (never a member). Other events' bodies are unchanged."""
    if event not in EVENTS:
        raise ValueError(f"unknown alert event {event!r}")
    doc: dict[str, object] = {
        "event": str(event),
        "connector_id": connector_id,
        "run_id": run_id,
        "status": str(status),
        # run errors are written without keys already; scrub again, a body must never hold one
        "error": scrub(error) if error else None,
        "at": at.isoformat(),
    }
    if degraded is not None:
        doc["degraded"] = dict(degraded)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def signature(body: bytes, secret: str) -> str:
    """``sha256=<hex HMAC-SHA256 of the raw body>``: what the receiver recomputes and compares."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def timestamped_signature(body: bytes, secret: str, timestamp: int) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<raw body>">``: the timestamp is
    signed with the body, so it cannot be refreshed on a captured alert."""
    signed = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def alert_delivery_id(run_id: str, event: str) -> str:
    """One id per alert, the same on every attempt: an alert is one (run, event), recorded once
    (sync/alerts.py), and run ids are random UUIDs."""
    return str(uuid.uuid5(DELIVERY_NAMESPACE, f"{run_id}/{event}"))


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    detail: str  # "HTTP 200", "HTTP 503", "ConnectError", ... (never the URL: it may hold a token)


def send(url: str, secret: str, body: bytes, *, event: str, delivery: str) -> Attempt:
    """One POST. 2xx is delivered; anything else (or no answer) is for the caller to retry.
    ``delivery`` is the alert's :func:`alert_delivery_id`; the timestamp is this attempt's."""
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "segops-sync",
        SIGNATURE_HEADER: signature(body, secret),
        SIGNATURE_256_HEADER: timestamped_signature(body, secret, timestamp),
        DELIVERY_HEADER: delivery,
        TIMESTAMP_HEADER: str(timestamp),
        "X-SegOps-Event": event,
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT)
    except httpx.HTTPError as exc:
        return Attempt(False, type(exc).__name__)
    return Attempt(response.is_success, f"HTTP {response.status_code}")
