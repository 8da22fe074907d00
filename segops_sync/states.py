"""The names of every state a connector, run, batch or member can be in.

They are ``StrEnum``s, so mypy checks them and they compare equal to the text PostgreSQL stores
(the check constraints in ``db/models.py`` list the same values; a test keeps the two in step).
This module imports nothing of ours: every room may use it.
"""

from __future__ import annotations

from enum import StrEnum


class ConnectorStatus(StrEnum):
    INACTIVE = "inactive"  # never synced
    ACTIVE = "active"
    ERROR = "error"  # the last run failed; still synced at the next trigger
    PAUSED = "paused"  # a person paused it: recomputes are ignored until it is resumed


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HELD = "held"  # the mass-removal guard stopped it before Klaviyo was touched
    CANCELLED = "cancelled"  # the connector was paused: it stopped at a batch boundary


class RunPhase(StrEnum):
    """Lets the sweeper tell a stalled plan from a stalled chord."""

    PLANNING = "planning"
    DISPATCHED = "dispatched"
    FINISHED = "finished"


class BatchKind(StrEnum):
    ADD = "add"
    REMOVE = "remove"


class BatchStatus(StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"  # a bulk job holds some of its members
    DONE = "done"
    FAILED = "failed"


OPEN_BATCH = (BatchStatus.PENDING, BatchStatus.SUBMITTED)


class ItemOutcome(StrEnum):
    """What Klaviyo said of one member of a batch (NULL while in flight)."""

    ADDED = "added"
    UPDATED = "updated"  # already on the list: only its changed traits were sent again
    REMOVED = "removed"
    REJECTED = "rejected"
    PENDING = "pending"  # not indexed by Klaviyo yet: the next sync retries it


class StartReason(StrEnum):
    """What a trigger did."""

    STARTED = "started"
    COALESCED = "coalesced"  # a run is going; one more follows it
    INACTIVE = "inactive"
    DUPLICATE = "duplicate"  # this recompute was already served
    PAUSED = "paused"  # the connector is paused: nothing runs until it is resumed


class Trigger(StrEnum):
    """Why a run started (``sync_runs.trigger``)."""

    RECOMPUTE = "recompute"
    RESYNC = "resync"
    COALESCED = "coalesced"  # triggers that arrived during the previous run
    # A queued resync that approved a mass removal, in databases older than approval rows
    # (sync/approvals.py): read, never written, and it approves nothing.
    MASS_REMOVAL = "mass-removal"
    VERIFY = "verify"  # a read-back of the list found what this run repairs
    RESUME = "resume"  # a paused connector was resumed: one run catches up


class PlanStatus(StrEnum):
    DISPATCH = "dispatch"
    HELD = "held"
    EMPTY = "empty"
    FINISHED = "finished"


class CloseOutcome(StrEnum):
    """What closing a run did."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HELD = "held"  # closed by the planner: the mass-removal guard (for logs, metrics, alerts)
    STILL_OPEN = "still-open"  # a batch is still open: a duplicate chord fired early
    ALREADY_CLOSED = "already-closed"
    CANCELLED = "cancelled"  # the connector was paused mid-run


class AlertEvent(StrEnum):
    """The alert webhooks (docs/contract.md): one per run at most, per event."""

    FAILED = "sync.failed"  # a run ended in error
    HELD = "sync.held"  # the mass-removal guard held a run
    RECOVERED = "sync.recovered"  # the first clean success after any of the others
    DEGRADED = "sync.degraded"  # a success that rejected too many members or ran too slowly


class RejectionRetry(StrEnum):
    """When a member Klaviyo rejected for its data is sent again (``member_rejections``)."""

    WAITING = "waiting"  # not before a context_identified event changes its data
    DUE = "due"  # its data changed: the next run sends it again


class MemberAction(StrEnum):
    """What one run did to one member (``members trace``): an ``ItemOutcome``, or why it has none."""

    ADDED = "added"
    UPDATED = "updated"  # already on the list: its changed traits were sent again
    REMOVED = "removed"
    REJECTED = "rejected"  # Klaviyo refused its data (the reason says why)
    PENDING = "pending"  # a removal Klaviyo could not find yet: the next sync retries it
    IN_FLIGHT = "in-flight"  # its batch is running: sent, or about to be
    QUEUED = "queued"  # in a batch of the running run that has not started yet
    UNSETTLED = "unsettled"  # its batch ended (failed, cancelled) before Klaviyo's answer was kept
