"""Which alert a closed run deserves, recorded once; and one delivery attempt of a recorded alert.

``sync.failed`` for a run that ends in ``failed``, ``sync.held`` for a run the mass-removal guard
held, ``sync.recovered`` for the first success after either. The decision is made in the
transaction that closes the run (the connector's runs are serialised, so "the previous alert" is
well defined) and written as an ``alert_deliveries`` row whose unique (run, event) key makes a
redelivered task unable to alert twice. The caller enqueues ``segops.deliver_alert`` only when
the insert won, after commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.models import AlertDelivery, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.observability.webhooks import alert_body, alert_delivery_id, send
from segops_sync.states import AlertEvent, RunStatus
from segops_sync.sync.retry import backoff, countdown_cap

log = logging.getLogger(__name__)

# A receiver down for longer than this is a lost alert, said so in the log.
GIVE_UP_AFTER = timedelta(hours=24)


def next_event(run_status: str, last_event: str | None) -> AlertEvent | None:
    """The table: the run's final status and the connector's previous alert decide."""
    if run_status == RunStatus.FAILED:
        return AlertEvent.FAILED
    if run_status == RunStatus.HELD:
        return AlertEvent.HELD
    if run_status == RunStatus.SUCCEEDED and last_event in (AlertEvent.FAILED, AlertEvent.HELD):
        return AlertEvent.RECOVERED
    return None


def record_alert(session: Session, run_id: str, settings: Settings) -> int | None:
    """In the transaction that closes the run: the delivery to enqueue after commit, or None."""
    if not settings.alerts_enabled:
        return None
    run = session.get(SyncRun, run_id)
    if run is None or run.status == RunStatus.RUNNING:
        return None
    last_event = session.scalar(
        select(AlertDelivery.event)
        .where(AlertDelivery.connector_id == run.connector_id)
        .order_by(AlertDelivery.id.desc())
        .limit(1)
    )
    event = next_event(run.status, last_event)
    if event is None:
        return None
    body = alert_body(
        event,
        connector_id=run.connector_id,
        run_id=run.id,
        status=run.status,
        error=run.error if event != AlertEvent.RECOVERED else None,
        at=run.finished_at or datetime.now(UTC),
    )
    delivery_id = session.scalar(
        insert(AlertDelivery)
        .values(run_id=run.id, connector_id=run.connector_id, event=event, body=body)
        .on_conflict_do_nothing(index_elements=["run_id", "event"])
        .returning(AlertDelivery.id)
    )
    if delivery_id is not None:
        log.info("alert %s recorded", event, extra={"event": event})
    return delivery_id


@dataclass(frozen=True)
class Delivery:
    retry_in: float | None  # None: nothing more to do (delivered, given up, or not ours)


def deliver(delivery_id: int, settings: Settings) -> Delivery:
    """One attempt. The row stays locked while the POST is in flight, and a second task for the
    same delivery skips it, so a receiver never gets one alert twice from us (a 2xx whose commit
    is then lost is the one exception any at-least-once sender has)."""
    with session_scope() as s:
        row = s.scalars(
            select(AlertDelivery)
            .where(AlertDelivery.id == delivery_id, AlertDelivery.delivered_at.is_(None))
            .with_for_update(skip_locked=True)
        ).one_or_none()
        if row is None:
            return Delivery(None)  # delivered, deleted with its connector, or being sent now
        url = settings.alert_webhook_url
        secret = settings.alert_webhook_secret
        if not url or secret is None:
            log.warning("alert %s not sent: SEGOPS_ALERT_WEBHOOK_URL is no longer set", row.event)
            return Delivery(None)
        attempt = send(
            url,
            secret.get_secret_value(),
            row.body,
            event=row.event,
            delivery=alert_delivery_id(row.run_id, row.event),
        )
        row.attempts += 1
        now = datetime.now(UTC)
        if attempt.delivered:
            row.delivered_at, row.last_error = now, None
            log.info("alert %s delivered (%s)", row.event, attempt.detail, extra=_ids(row))
            return Delivery(None)
        row.last_error = attempt.detail
        if now - row.created_at > GIVE_UP_AFTER:
            log.error(
                "alert %s given up after %d attempts: %s",
                row.event,
                row.attempts,
                attempt.detail,
                extra=_ids(row),
            )
            return Delivery(None)
        wait = backoff(row.attempts, settings, cap=countdown_cap(settings))
        log.warning(
            "alert %s not delivered (%s); again in %.1fs",
            row.event,
            attempt.detail,
            wait,
            extra=_ids(row),
        )
        return Delivery(wait)


def lost_alerts(session: Session, older_than: float) -> list[int]:
    """Alerts recorded but never tried: the message to send them was lost (a crash between the
    commit and the publish). Tried ones have a retry message of their own."""
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
    return list(
        session.scalars(
            select(AlertDelivery.id).where(
                AlertDelivery.delivered_at.is_(None),
                AlertDelivery.attempts == 0,
                AlertDelivery.created_at < cutoff,
                AlertDelivery.created_at > datetime.now(UTC) - GIVE_UP_AFTER,
            )
        )
    )


def _ids(row: AlertDelivery) -> dict[str, str]:
    return {"connector_id": row.connector_id, "run_id": row.run_id}
