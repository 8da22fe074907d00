"""Which alert a closed run deserves, recorded once; and one delivery attempt of a recorded alert.

``sync.failed`` for a run that ends in ``failed``, ``sync.held`` for a run the mass-removal guard
held, ``sync.degraded`` for a success that rejected too large a share of its members or took
far longer than expected (:func:`degradation`), ``sync.recovered`` for the first clean success
after any of them. The decision is made in the transaction that closes the run (the connector's
runs are serialised, so "the previous alert" is well defined) and written as an ``alert_deliveries`` row whose unique (run, event) key makes a
redelivered task unable to alert twice. The caller enqueues ``segops.deliver_alert`` only when
the insert won, after commit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.models import AlertDelivery, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo.payloads import MAX_FILTER_VALUES
from segops_sync.observability.webhooks import alert_body, alert_delivery_id, send
from segops_sync.states import AlertEvent, RunStatus
from segops_sync.sync.costs import Delta, floor_seconds, goes_direct
from segops_sync.sync.retry import backoff, countdown_cap

log = logging.getLogger(__name__)

# A receiver down for longer than this is a lost alert, said so in the log.
GIVE_UP_AFTER = timedelta(hours=24)


# The bulk import job time the expected duration assumes (Klaviyo's own processing, which no
# limit of ours bounds): 5 s at the very best, typically well under a minute for a light account.
# Taken generously, so an ordinary slow job is not "degraded"; the factor does the rest.
EXPECTED_JOB_SECONDS = 30.0

_NEEDS_RECOVERY = (AlertEvent.FAILED, AlertEvent.HELD, AlertEvent.DEGRADED)


def next_event(
    run_status: str, last_event: str | None, degraded: bool = False
) -> AlertEvent | None:
    """The table: the run's final status, whether a succeeded run was degraded
    (:func:`degradation`) and the connector's previous alert decide."""
    if run_status == RunStatus.FAILED:
        return AlertEvent.FAILED
    if run_status == RunStatus.HELD:
        return AlertEvent.HELD
    if run_status != RunStatus.SUCCEEDED:
        return None
    if degraded:
        return AlertEvent.DEGRADED
    if last_event in _NEEDS_RECOVERY:
        return AlertEvent.RECOVERED
    return None


@dataclass(frozen=True)
class Degradation:
    """Why a succeeded run is degraded: the threshold it crossed and the figures (counts and
    seconds only: the body never names a member)."""

    reason: Literal["rejected_share", "slow"]
    summary: str
    figures: dict[str, float | int]

    def body(self) -> dict[str, object]:
        return {"reason": self.reason, **self.figures}


def expected_seconds(planned_adds: int, planned_removes: int, settings: Settings) -> float:
    """The run's expected time: the floor our limiter allows for its planned work
    (sync/costs.py), with :data:`EXPECTED_JOB_SECONDS` per bulk job. The run row keeps counts,
    not which removals have known profile ids, so every removal is taken as needing an
    account-wide lookup (one page per 100): the longest removals can take, never a false alarm."""
    delta = Delta(
        planned_adds,
        planned_removes,
        lookup_calls=math.ceil(planned_removes / MAX_FILTER_VALUES),
    )
    return floor_seconds(
        delta,
        job_seconds=EXPECTED_JOB_SECONDS,
        direct=goes_direct(planned_adds, settings),
        time_scale=settings.klaviyo_time_scale,
        headroom=settings.limiter_headroom,
    )


def degradation(run: SyncRun, settings: Settings) -> Degradation | None:
    """A succeeded run is degraded when Klaviyo rejected more than SEGOPS_ALERT_REJECTED_SHARE
    of the members it sent to join (added + rejected: removals cannot be rejected), or when it
    took more than SEGOPS_ALERT_SLOW_FACTOR x :func:`expected_seconds` and at least
    ``alert_slow_min_seconds`` (a run expected to take ~0 s is not slow for a second of latency).
    Failed and held runs have their own alerts."""
    if run.status != RunStatus.SUCCEEDED:
        return None
    handled = run.added + run.rejected
    share = settings.alert_rejected_share
    if run.rejected and run.rejected > share * handled:
        return Degradation(
            "rejected_share",
            f"{run.rejected} of {handled} members rejected by Klaviyo "
            f"({run.rejected / handled:.1%}, above {share:.1%})",
            {
                "rejected": run.rejected,
                "handled": handled,
                "share": round(run.rejected / handled, 4),
                "threshold": share,
            },
        )
    if run.finished_at is None or run.started_at is None:
        return None
    seconds = (run.finished_at - run.started_at).total_seconds()
    expected = expected_seconds(run.planned_adds, run.planned_removes, settings)
    factor = settings.alert_slow_factor
    if seconds > max(factor * expected, settings.alert_slow_min_seconds):
        return Degradation(
            "slow",
            f"the run took {seconds:.0f}s, more than {factor:g} x its expected {expected:.0f}s",
            {
                "seconds": round(seconds, 1),
                "expected_seconds": round(expected, 1),
                "factor": factor,
                "min_seconds": settings.alert_slow_min_seconds,
            },
        )
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
    degraded = degradation(run, settings)
    event = next_event(run.status, last_event, degraded is not None)
    if event is None:
        return None
    error = run.error if event != AlertEvent.RECOVERED else None
    if degraded is not None:
        error = degraded.summary  # why, in words; the figures are in "degraded"
    body = alert_body(
        event,
        connector_id=run.connector_id,
        run_id=run.id,
        status=run.status,
        error=error,
        at=run.finished_at or datetime.now(UTC),
        degraded=degraded.body() if degraded is not None else None,
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
