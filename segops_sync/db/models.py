"""SQLAlchemy models: the tables segops-sync owns, plus ``segment_members`` (docs/contract.md#tables)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from segops_sync.states import (
    AlertEvent,
    BatchKind,
    BatchStatus,
    ConnectorStatus,
    ItemOutcome,
    RejectionRetry,
    RunPhase,
    RunStatus,
    Trigger,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


E = TypeVar("E", bound=StrEnum)


class StateText(TypeDecorator[E]):
    """A state stored as plain TEXT (the check constraint lists its values), read as its enum."""

    impl = Text
    cache_ok = True

    def __init__(self, enum: type[E]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: E | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


def _values(enum: type[StrEnum]) -> str:
    return ", ".join(f"'{member.value}'" for member in enum)


class SegmentMember(Base):
    """Written by the recompute service: the current membership of every segment."""

    __tablename__ = "segment_members"
    segment_id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)


class Identity(Base):
    """The latest ``context_identified`` event per user: its email and all its traits."""

    __tablename__ = "identities"
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # The latest email seen; an event without one keeps it.
    email: Mapped[str | None] = mapped_column(Text)
    # Every trait of the latest event, as received; connectors pick the ones they send.
    traits: Mapped[dict[str, Any]] = mapped_column(
        JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    # When the email or traits last changed (an identical event leaves it): a member rejected by
    # a run that started before this is due to be sent again (sync/rejected.py).
    identified_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class Connector(Base):
    __tablename__ = "connectors"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text, default="klaviyo")
    segment_id: Mapped[str] = mapped_column(Text, index=True)
    list_id: Mapped[str] = mapped_column(Text)
    # Fernet token of the Klaviyo private key; the clear key is never stored.
    api_key_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    api_key_hint: Mapped[str] = mapped_column(Text)
    status: Mapped[ConnectorStatus] = mapped_column(
        StateText(ConnectorStatus), default=ConnectorStatus.INACTIVE
    )
    last_synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # A trigger that arrived while a run was going: the finishing run starts one more.
    resync_requested: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    resync_trigger: Mapped[Trigger | None] = mapped_column(StateText(Trigger))
    # The list's opt_in_process as Klaviyo last reported it (double_opt_in | single_opt_in).
    opt_in_process: Mapped[str | None] = mapped_column(Text)
    # The context_identified traits this connector sends to Klaviyo (besides the email).
    traits: Mapped[list[str]] = mapped_column(
        ARRAY(Text), default=list, server_default=text("'{}'::text[]")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    __table_args__ = (
        CheckConstraint(f"status IN ({_values(ConnectorStatus)})", name="status"),
        CheckConstraint("type = 'klaviyo'", name="type"),
    )


class LedgerEntry(Base):
    """Who this connector has put on its Klaviyo list, as Klaviyo confirmed it.

    It changes only on Klaviyo's confirmation, so any run can be repeated or resumed.
    No foreign key: a per-row check of the connector was 45 % of confirming a million members.
    Its writers lock the connector row once per statement (sync/ledger.py); the trigger
    connectors_delete_ledger (migration 0005) deletes a deleted connector's ledger.
    """

    __tablename__ = "connector_members"
    connector_id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    email: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text)
    profile_id: Mapped[str | None] = mapped_column(Text)
    # Hash of the named traits Klaviyo confirmed (NULL: none); a different hash is resent.
    traits_hash: Mapped[str | None] = mapped_column(Text)
    # Klaviyo suppresses the profile's email (as the last read-back of the list saw it).
    suppressed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # False: sent to Klaviyo by a batch that ended before its outcome was recorded (migration
    # 0009). Possibly on the list: removed when it leaves the segment, sent again while in it.
    confirmed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # the few suppressed members, counted at the end of every run
    __table_args__ = (
        Index(
            "ix_connector_members_suppressed",
            "connector_id",
            postgresql_where=text("suppressed"),
        ),
    )


class SyncRun(Base):
    __tablename__ = "sync_runs"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    connector_id: Mapped[str] = mapped_column(
        Text, ForeignKey("connectors.id", ondelete="CASCADE"), index=True
    )
    trigger: Mapped[Trigger] = mapped_column(StateText(Trigger))
    recompute_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[RunStatus] = mapped_column(StateText(RunStatus), default=RunStatus.RUNNING)
    phase: Mapped[RunPhase] = mapped_column(
        StateText(RunPhase), default=RunPhase.PLANNING, server_default="planning"
    )
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    planned_adds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    planned_removes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    added: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    removed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rejected: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pending: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    allow_mass_removal: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    # Set by the first batch that meets a permanent error, so the other batches stop early.
    abort_reason: Mapped[str | None] = mapped_column(Text)
    # The Klaviyo list this run wrote to (NULL: a run from before migration 0009).
    list_id: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    # Members already on the list whose named traits were sent again.
    updated: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Trait values Klaviyo would refuse, left out of the profiles sent (members still joined).
    traits_dropped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Members on the list whose profiles are suppressed in Klaviyo (they get no email).
    suppressed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A run started by `connectors verify` or the beat verification: what the read-back found.
    verify_in_list: Mapped[int | None] = mapped_column(Integer)
    verify_expected: Mapped[int | None] = mapped_column(Integer)
    verify_missing: Mapped[int | None] = mapped_column(Integer)
    verify_extra: Mapped[int | None] = mapped_column(Integer)
    # When the retention purge deleted its member details (batch items, batch member lists);
    # the counts above stay (sync/retention.py).
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The person's approval this run took when it was planned (None: it took none).
    approval: Mapped[MassRemovalApproval | None] = relationship(
        primaryjoin="SyncRun.id == MassRemovalApproval.run_id",
        foreign_keys="MassRemovalApproval.run_id",
        viewonly=True,
        uselist=False,
    )
    __table_args__ = (
        CheckConstraint(f"status IN ({_values(RunStatus)})", name="status"),
        # At most one run per connector at a time; extra triggers coalesce.
        Index(
            "uq_sync_runs_one_running",
            "connector_id",
            unique=True,
            postgresql_where=text("status = 'running'"),
        ),
        # the finished runs whose details the purge has yet to delete, oldest first
        Index(
            "ix_sync_runs_unpurged",
            "finished_at",
            postgresql_where=text("purged_at IS NULL AND finished_at IS NOT NULL"),
        ),
    )


class MassRemovalApproval(Base):
    """A person's approval of a mass removal the guard held (``connectors resync
    --allow-mass-removal``, or the API's resync). Only this row lifts the guard: no message can.

    The next run planned for the connector before ``expires_at`` takes it (``run_id``), whether
    or not it needs it, so one approval serves one run; a newer approval ends an unused one.
    """

    __tablename__ = "mass_removal_approvals"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    connector_id: Mapped[str] = mapped_column(
        Text, ForeignKey("connectors.id", ondelete="CASCADE"), index=True
    )
    # The connector's newest held run when the approval was given (None: none was held).
    held_run_id: Mapped[str | None] = mapped_column(
        Text, ForeignKey("sync_runs.id", ondelete="SET NULL"), index=True
    )
    # The run that took it (None: not taken yet).
    run_id: Mapped[str | None] = mapped_column(
        Text, ForeignKey("sync_runs.id", ondelete="SET NULL")
    )
    approved_by: Mapped[str] = mapped_column(Text)
    approved_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        CheckConstraint("length(approved_by) BETWEEN 1 AND 100", name="approved_by"),
        Index(
            "uq_mass_removal_approvals_run_id",
            "run_id",
            unique=True,
            postgresql_where=text("run_id IS NOT NULL"),
        ),
    )


class SyncBatch(Base):
    __tablename__ = "sync_batches"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(Text, ForeignKey("sync_runs.id", ondelete="CASCADE"))
    kind: Mapped[BatchKind] = mapped_column(StateText(BatchKind))
    seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[BatchStatus] = mapped_column(StateText(BatchStatus), default=BatchStatus.PENDING)
    # Transient failures so far; throttling and job polling do not count.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    job_ids: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list, server_default="{}")
    first_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    added: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    removed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rejected: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pending: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # members whose traits were sent again, and trait values left out (refused by our checks)
    updated: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    traits_dropped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    permanent: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # The user ids the batch covers, [lo, hi], from its first member to its last as planned.
    # Its members are written to sync_batch_items when it first runs (materialized).
    lo_user_id: Mapped[str | None] = mapped_column(Text)
    hi_user_id: Mapped[str | None] = mapped_column(Text)
    # A small delta's batch lists its members instead: no range scan of a million rows for 5.
    user_ids: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    materialized: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # The bulk job that holds every member of the batch with neither a job_id nor an outcome of
    # its own: a batch sent in one job (the common case) writes this, not 10,000 member rows.
    whole_job_id: Mapped[str | None] = mapped_column(Text)
    # An add batch asks Klaviyo only after setting both: when it first sent members, and that
    # some of them may be on the list unrecorded until the batch finishes (or the next run's
    # planner enters them in the ledger unconfirmed: sync/ledger.py adopt_in_doubt).
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    in_doubt: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    __table_args__ = (
        CheckConstraint(f"kind IN ({_values(BatchKind)})", name="kind"),
        CheckConstraint(f"status IN ({_values(BatchStatus)})", name="status"),
        Index("uq_sync_batches_run_kind_seq", "run_id", "kind", "seq", unique=True),
        Index("ix_sync_batches_in_doubt", "run_id", postgresql_where=text("in_doubt")),
    )


class SyncBatchItem(Base):
    """One member of one batch: what to send, and what Klaviyo said.

    No foreign key on run_id: a per-row check doubled the cost of writing a batch's members.
    The trigger sync_runs_delete_items (migration 0004) deletes a deleted run's items."""

    __tablename__ = "sync_batch_items"
    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[BatchKind] = mapped_column(StateText(BatchKind))
    seq: Mapped[int] = mapped_column(Integer)
    email: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text)
    profile_id: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(Text)
    # The connector's named traits of this member at planning time, and their hash.
    traits: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    traits_hash: Mapped[str | None] = mapped_column(Text)
    # An add of a member already on the list, whose traits changed: outcome 'updated'.
    refresh: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Names of the traits left out because Klaviyo would refuse their values.
    dropped_traits: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    outcome: Mapped[ItemOutcome | None] = mapped_column(StateText(ItemOutcome))  # NULL in flight
    reason: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (Index("ix_sync_batch_items_batch", "run_id", "kind", "seq"),)


class MemberRejection(Base):
    """A member Klaviyo rejected for its data, per connector: it is not sent again until a
    ``context_identified`` event changes that data (``retry`` becomes ``due``), and the row goes
    when Klaviyo accepts the member, the member leaves the segment, or is forgotten."""

    __tablename__ = "member_rejections"
    connector_id: Mapped[str] = mapped_column(
        Text, ForeignKey("connectors.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # Klaviyo's reason, as the batch item recorded it
    reason: Mapped[str | None] = mapped_column(Text)
    # the run whose batch recorded the rejection (its items may be purged before this row goes)
    run_id: Mapped[str | None] = mapped_column(Text)
    rejected_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    retry: Mapped[RejectionRetry] = mapped_column(
        StateText(RejectionRetry), default=RejectionRetry.WAITING, server_default="waiting"
    )
    __table_args__ = (
        CheckConstraint(f"retry IN ({_values(RejectionRetry)})", name="retry"),
        # the identity writer marks one user's rejections due
        Index("ix_member_rejections_user_id", "user_id"),
    )


class ForgetRecord(Base):
    """That a member was forgotten (``members forget``, ``segops.forget_user``): the one trace a
    forget leaves, and it holds nothing personal, not even a hash of the user id."""

    __tablename__ = "forget_records"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    requested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # cli | message | api
    source: Mapped[str] = mapped_column(Text)
    klaviyo_delete: Mapped[bool] = mapped_column(Boolean, default=False)
    # lists the member was removed from, and data-privacy deletions requested of Klaviyo
    lists_removed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    klaviyo_deletions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class AlertDelivery(Base):
    """One alert webhook of one run (``sync.failed``, ``sync.held``, ``sync.recovered``).

    Written in the transaction that closes the run; the unique (run, event) key makes a
    redelivered task unable to alert twice. ``body`` holds the exact bytes that are signed and
    sent, so every retry is identical. The newest row of a connector is its alert state: a success
    after a ``sync.failed`` or ``sync.held`` is a ``sync.recovered``.
    """

    __tablename__ = "alert_deliveries"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(Text, ForeignKey("sync_runs.id", ondelete="CASCADE"))
    connector_id: Mapped[str] = mapped_column(
        Text, ForeignKey("connectors.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[AlertEvent] = mapped_column(StateText(AlertEvent))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        CheckConstraint(f"event IN ({_values(AlertEvent)})", name="event"),
        Index("uq_alert_deliveries_run_event", "run_id", "event", unique=True),
    )


class ListSnapshotEntry(Base):
    """One profile of a Klaviyo list as a verification read it back (deleted after use).

    The read-back goes to PostgreSQL page by page so that comparing a million-member list with
    its segment is a join, not a Python set of a million profiles."""

    __tablename__ = "list_snapshots"
    verify_id: Mapped[str] = mapped_column(Text, primary_key=True)
    profile_id: Mapped[str] = mapped_column(Text, primary_key=True)
    connector_id: Mapped[str] = mapped_column(
        Text, ForeignKey("connectors.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text)
    suppressed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    taken_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# A forget deletes the member's snapshot rows by email (as Klaviyo spelled it) or external id,
# while it holds the rows of the connectors that know the member: a probe each, not a read of a
# whole list's snapshot (bench/bench_forget.py: 216 ms at 1M profiles without them).
Index("ix_list_snapshots_email", func.lower(ListSnapshotEntry.email))
Index("ix_list_snapshots_external_id", ListSnapshotEntry.external_id)
