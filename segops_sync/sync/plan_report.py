"""What a sync of a connector would do now, and what nobody can know before it runs.

``connectors plan ID`` is a dry run: it reads PostgreSQL and writes nothing, and never calls
Klaviyo. Every number comes from the code a run uses: the planner's one-pass delta
(:func:`planner.delta_sizes`, :func:`planner.leaver_keys`), its mass-removal guard
(:func:`planner.mass_removal_reason`), and the cost model (sync/costs.py) for the requests per
endpoint and the floor on the run's duration. A plan is not a promise: the segment and the
ledger may change before the run is planned, and Klaviyo's answers (rejections, lookups that
find nobody, job time) are unknown until it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.queries import get_connector
from segops_sync.sync import planner
from segops_sync.sync.approvals import waiting_approval
from segops_sync.sync.costs import (
    Delta,
    RemovalKey,
    expected_requests,
    floor_seconds,
    goes_direct,
)

# Klaviyo's time to run one bulk import job, which no request tells in advance: 5 s is its
# best (sync/costs.py); under load it takes minutes, so the duration is a floor, not a forecast.
ASSUMED_JOB_SECONDS = 5.0


@dataclass(frozen=True)
class GuardVerdict:
    """The mass-removal guard on this delta. ``held``: the run would stop before any
    change; ``approved``: an unexpired approval is waiting, which the next run takes (and
    which lifts the guard whether or not it is needed)."""

    would_hold: bool
    reason: str | None
    threshold: float
    approved: bool
    approved_by: str | None = None
    approval_expires_at: datetime | None = None

    @property
    def held(self) -> bool:
        return self.would_hold and not self.approved

    @property
    def verdict(self) -> str:
        if not self.would_hold:
            return "passes"
        return "approved" if self.approved else "held"


@dataclass(frozen=True)
class PlanReport:
    connector_id: str
    list_id: str
    joiners: int
    leavers: int
    # members on the list whose named traits changed: sent again through the add path
    updates: int
    # leavers by what the ledger knows of them (RemovalKey), and those it knows nothing of
    leavers_by_id: int
    leavers_by_external_id: int
    leavers_by_email: int
    leavers_unfindable: int
    direct: bool  # adds go synchronously (profile-import), not in bulk jobs
    guard: GuardVerdict
    requests: dict[str, int]  # endpoint ("METHOD path") -> requests, job polls excluded
    headroom: float
    seconds_at_headroom: float
    seconds_at_published_limits: float
    job_seconds: float = ASSUMED_JOB_SECONDS

    @property
    def adds(self) -> int:
        return self.joiners + self.updates

    @property
    def ids_unknown(self) -> int:
        """Leavers whose Klaviyo profile id the ledger lacks: each needs a lookup (or, with
        nothing to look up by, cannot be removed)."""
        return self.leavers - self.leavers_by_id

    def as_json(self) -> dict[str, Any]:
        g = self.guard
        return {
            "connector_id": self.connector_id,
            "list_id": self.list_id,
            "joiners": self.joiners,
            "leavers": self.leavers,
            "updates": self.updates,
            "adds": self.adds,
            "path": "direct" if self.direct else "bulk",
            "guard": {
                "verdict": g.verdict,
                "held": g.held,
                "reason": g.reason,
                "threshold": g.threshold,
                "approval": (
                    {
                        "by": g.approved_by,
                        "expires_at": g.approval_expires_at.isoformat()
                        if g.approval_expires_at
                        else None,
                    }
                    if g.approved
                    else None
                ),
            },
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "duration": {
                "seconds_at_headroom": self.seconds_at_headroom,
                "headroom": self.headroom,
                "seconds_at_published_limits": self.seconds_at_published_limits,
                "job_seconds_assumed": self.job_seconds,
            },
            "unknown": {
                "rejections": None,
                "leaver_ids_unknown": self.ids_unknown,
                "leavers_by_external_id": self.leavers_by_external_id,
                "leavers_by_email": self.leavers_by_email,
                "leavers_unfindable": self.leavers_unfindable,
            },
        }


def plan_report(session: Session, connector_id: str, settings: Settings) -> PlanReport:
    """The plan of the connector's next sync as of now, without writing or calling Klaviyo.

    Raises UnknownConnector (an InputError) for an unknown id. Reads every leaver's key
    (one row each) so the lookups are counted per removal batch, as sync/costs.py cuts them.
    """
    connector = get_connector(session, connector_id)
    joiners, leavers = planner.delta_sizes(session, connector)
    updates = planner.trait_updates(session, connector)
    keys = planner.leaver_keys(session, connector)
    known: list[tuple[str, RemovalKey]] = []
    counts = {"id": 0, "external_id": 0, "email": 0}
    unfindable = 0
    for user_id, key in keys:
        if key is None:  # nothing to find it by: it costs no lookup, and the run cannot remove it
            unfindable += 1
        else:
            known.append((user_id, key))
            counts[key] += 1
    adds = joiners + updates
    delta = Delta.of(adds, known)
    # The unfindable still count in the removal batches (their DELETEs); Delta.of cut the
    # lookups' batches without them, which shifts a boundary by at most their number.
    delta = Delta(adds, delta.removes + unfindable, delta.lookup_calls, delta.list_lookup_calls)
    direct = goes_direct(adds, settings)

    reason = planner.mass_removal_reason(session, connector, leavers, settings)
    approval = waiting_approval(session, connector.id)
    guard = GuardVerdict(
        would_hold=reason is not None,
        reason=reason,
        threshold=settings.mass_removal_threshold,
        approved=approval is not None,
        approved_by=approval.approved_by if approval else None,
        approval_expires_at=approval.expires_at if approval else None,
    )
    requests = expected_requests(delta, direct=direct).by_endpoint
    headroom = settings.limiter_headroom
    return PlanReport(
        connector_id=connector.id,
        list_id=connector.list_id,
        joiners=joiners,
        leavers=leavers,
        updates=updates,
        leavers_by_id=counts["id"],
        leavers_by_external_id=counts["external_id"],
        leavers_by_email=counts["email"],
        leavers_unfindable=unfindable,
        direct=direct,
        guard=guard,
        # the delta's cost as planned, held or not: what an approval would let through
        requests={str(e): n for e, n in sorted(requests.items())},
        headroom=headroom,
        seconds_at_headroom=floor_seconds(
            delta, job_seconds=ASSUMED_JOB_SECONDS, direct=direct, headroom=headroom
        ),
        seconds_at_published_limits=floor_seconds(
            delta, job_seconds=ASSUMED_JOB_SECONDS, direct=direct
        ),
    )


__all__ = ["ASSUMED_JOB_SECONDS", "GuardVerdict", "PlanReport", "plan_report"]
