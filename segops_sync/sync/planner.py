"""Starting a run and planning it: the delta in SQL, cut into batches stored as key ranges.

The delta never passes through Python. One ordered pass over ``segment - ledger`` (joiners)
and ``ledger - segment`` (leavers) numbers both directions and returns only every
DIRECT_BATCH_SIZE-th joiner and every REMOVE_BATCH_SIZE-th leaver (first and last); the
planner writes one ``sync_batches`` row per batch with the user-id range [first, last] it covers. Each batch writes its own
members (``sync_batch_items``, :func:`materialize_batch`) when it first runs, so a million adds
cost the planner 1.5 s instead of a million rows, and the first job leaves in seconds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.inserts import insert_unless_conflict
from segops_sync.db.models import Connector, LedgerEntry, SyncBatch, SyncRun
from segops_sync.db.queries import get_connector
from segops_sync.states import (
    OPEN_BATCH,
    BatchKind,
    ConnectorStatus,
    PlanStatus,
    RunPhase,
    RunStatus,
    StartReason,
    Trigger,
)
from segops_sync.sync.approvals import take_approval
from segops_sync.sync.costs import DIRECT_BATCH_SIZE, RemovalKey, goes_direct
from segops_sync.sync.inputs.identity import (
    SQL_EMAIL,
    SQL_EMAIL_ONCE,
    SQL_EXTERNAL_ID,
    SQL_EXTERNAL_ID_ONCE,
    SQL_IS_EMAIL,
)
from segops_sync.sync.inputs.traits import SELECTED_TRAITS_SQL, TRAITS_HASH_SQL
from segops_sync.sync.ledger import adopt_in_doubt
from segops_sync.sync.pause import stops_for_pause
from segops_sync.sync.rejected import WAITING_SQL, has_waiting

# One bulk import job takes up to 10,000 profiles; the client splits further by the 5 MB cap.
# (A run with few adds sends them synchronously instead, DIRECT_BATCH_SIZE to a batch.)
ADD_BATCH_SIZE = 10_000
# One relationship DELETE takes up to 1,000 profile ids.
REMOVE_BATCH_SIZE = 1_000

_ADDED_SQL = f"""
    SELECT sm.user_id, {SQL_EMAIL} AS email, {SQL_EXTERNAL_ID} AS external_id
    FROM segment_members sm LEFT JOIN identities i ON i.user_id = sm.user_id
    WHERE sm.segment_id = :seg
      AND NOT EXISTS (SELECT 1 FROM connector_members cm
                      WHERE cm.connector_id = :c AND cm.user_id = sm.user_id AND cm.confirmed)
      AND NOT {WAITING_SQL.format(user="sm.user_id")}
"""
_REMOVED_SQL = """
    SELECT cm.user_id, cm.email, cm.external_id, cm.profile_id
    FROM connector_members cm
    WHERE cm.connector_id = :c
      AND NOT EXISTS (SELECT 1 FROM segment_members sm
                      WHERE sm.segment_id = :seg AND sm.user_id = cm.user_id)
"""

# Members on the list whose named traits changed since Klaviyo confirmed them (the ledger's
# traits_hash): sent again through the add path, costing only those members. (An unconfirmed
# member in the segment is sent again as a joiner: sync/ledger.py adopt_in_doubt.)
_CHANGED_SQL = f"""
    SELECT cm.user_id FROM connector_members cm
    JOIN segment_members s ON s.segment_id = :seg AND s.user_id = cm.user_id
    LEFT JOIN identities i ON i.user_id = cm.user_id
    WHERE cm.connector_id = :c AND cm.confirmed
      AND cm.traits_hash IS DISTINCT FROM {TRAITS_HASH_SQL}
"""


# Both directions of the delta in one pass: a hash full join of the segment against the ledger
# reads each table once (index-only when vacuumed); two anti-joins read each twice. A segment
# member the ledger holds unconfirmed joins again (sent again, which confirms it).
_DELTA_SQL = """
    SELECT COALESCE(s.user_id, cm.user_id) AS user_id, s.user_id IS NOT NULL AS joins,
           cm.email, cm.external_id, cm.profile_id
    FROM (SELECT user_id FROM segment_members WHERE segment_id = :seg) s
    FULL JOIN (SELECT user_id, email, external_id, profile_id, confirmed FROM connector_members
               WHERE connector_id = :c) cm ON cm.user_id = s.user_id
    WHERE (s.user_id IS NULL OR cm.user_id IS NULL OR NOT cm.confirmed){waiting}
"""


def _delta_sql(waiting: bool) -> str:
    """The delta; with ``waiting``, without the joiners that wait for new data after Klaviyo
    rejected them (sync/rejected.py): only connectors that have such members pay for the check."""
    clause = f" AND NOT (cm.user_id IS NULL AND {WAITING_SQL.format(user='s.user_id')})"
    return _DELTA_SQL.format(waiting=clause if waiting else "")


def _waiting_clause(session: Session, connector_id: str, user: str) -> str:
    """`` AND NOT <waiting>`` for a joiners' statement of a connector with waiting members."""
    if not has_waiting(session, connector_id):
        return ""
    return f" AND NOT {WAITING_SQL.format(user=user)}"


# Enough for the hash of a few million ids in one batch instead of spilling to disk in eight.
_DELTA_WORK_MEM = "SET LOCAL work_mem = '128MB'"


@dataclass(frozen=True)
class StartOutcome:
    run_id: str | None
    reason: StartReason


def start_run(
    session: Session,
    connector_id: str,
    *,
    trigger: Trigger,
    recompute_id: str | None = None,
) -> StartOutcome:
    """Open a run for a connector, unless one is going: then the trigger is coalesced.

    The connector row lock serialises concurrent triggers; the partial unique index on
    running runs is the backstop. No trigger lifts the mass-removal guard: only a person's
    approval in PostgreSQL does, taken when the run is planned (sync/approvals.py).
    """
    connector = get_connector(session, connector_id, lock=True)
    if connector.status == ConnectorStatus.INACTIVE:
        return StartOutcome(None, StartReason.INACTIVE)
    if connector.status == ConnectorStatus.PAUSED:
        # ignored, not queued: the resume's own run catches up (sync/pause.py)
        return StartOutcome(None, StartReason.PAUSED)
    if recompute_id is not None:
        seen = session.scalar(
            select(SyncRun.id).where(
                SyncRun.connector_id == connector_id, SyncRun.recompute_id == recompute_id
            )
        )
        if seen is not None:
            return StartOutcome(seen, StartReason.DUPLICATE)
    running = session.scalar(
        select(SyncRun.id).where(
            SyncRun.connector_id == connector_id, SyncRun.status == RunStatus.RUNNING
        )
    )
    if running is not None:
        connector.resync_requested = True
        connector.resync_trigger = trigger
        return StartOutcome(running, StartReason.COALESCED)
    run = SyncRun(
        id=str(uuid.uuid4()),
        connector_id=connector_id,
        trigger=trigger,
        recompute_id=recompute_id,
        status=RunStatus.RUNNING,
        phase=RunPhase.PLANNING,
        # The clock, not the transaction start: a follow-up run opens in the transaction that
        # closes the previous one, and must not seem to start before it ended.
        started_at=datetime.now(UTC),
    )
    connector.resync_requested = False
    connector.resync_trigger = None
    session.add(run)
    session.flush()
    return StartOutcome(run.id, StartReason.STARTED)


@dataclass
class Plan:
    run_id: str
    status: PlanStatus
    add_batch_ids: list[int] = field(default_factory=list)
    remove_batch_ids: list[int] = field(default_factory=list)
    # Set by the call that planned the run (not by a repeated call): for the "run started" line.
    planned_now: bool = False
    connector_id: str | None = None
    trigger: str | None = None
    adds: int = 0
    removes: int = 0

    @property
    def batch_ids(self) -> list[int]:
        return self.add_batch_ids + self.remove_batch_ids


def plan_run(session: Session, run_id: str, settings: Settings) -> Plan:
    """Compute the delta into batch rows. Safe to call again: a planned run keeps its batches."""
    run = session.scalars(select(SyncRun).where(SyncRun.id == run_id).with_for_update()).one()
    if run.status != RunStatus.RUNNING:
        return Plan(run_id, PlanStatus.FINISHED)
    if run.phase != RunPhase.PLANNING:
        return _open_batches(session, run)
    if stops_for_pause(run.abort_reason):  # paused before it was planned: no batch at all
        run.phase = RunPhase.DISPATCHED
        return Plan(run_id, PlanStatus.EMPTY)
    connector = session.get_one(Connector, run.connector_id)
    run.list_id = connector.list_id
    # Members an ended run sent without recording Klaviyo's answer may be on the list: the
    # ledger holds them unconfirmed before the delta is taken.
    adopt_in_doubt(session, connector.id, connector.list_id)
    params: dict[str, Any] = {
        "run": run.id,
        "seg": connector.segment_id,
        "c": connector.id,
        "names": list(connector.traits or []),
    }
    session.execute(text(_DELTA_WORK_MEM))
    bounds = _delta_bounds(session, params, traits=bool(connector.traits))
    adds, removes = bounds.total(True), bounds.total(False)
    add_size = DIRECT_BATCH_SIZE if goes_direct(adds, settings) else ADD_BATCH_SIZE
    run.planned_adds, run.planned_removes = adds, removes

    # The first run planned after a person's approval takes it, needed or not (one use).
    if take_approval(session, connector.id, run.id) is not None:
        run.allow_mass_removal = True
    held = (
        _mass_removal_reason(session, connector, removes, settings)
        if not run.allow_mass_removal
        else None
    )
    if held is not None:
        run.status, run.phase, run.error = RunStatus.HELD, RunPhase.FINISHED, held
        run.finished_at = datetime.now(UTC)
        connector.last_error = held
        return Plan(run_id, PlanStatus.HELD, **_planned(run))

    ranges = [(BatchKind.ADD, *r) for r in bounds.ranges(True, add_size)] + [
        (BatchKind.REMOVE, *r) for r in bounds.ranges(False, REMOVE_BATCH_SIZE)
    ]
    if ranges:
        session.execute(
            text(
                "INSERT INTO sync_batches (run_id, kind, seq, status, attempts, job_ids, added, "
                "removed, rejected, pending, permanent, lo_user_id, hi_user_id, user_ids, "
                "materialized) SELECT :run, b.kind, b.seq, 'pending', 0, CAST('{}' AS text[]), "
                "0, 0, 0, 0, false, b.lo, b.hi, CAST(b.members AS text[]), false "
                "FROM unnest(CAST(:kinds AS text[]), CAST(:seqs AS int[]), "
                "CAST(:los AS text[]), CAST(:his AS text[]), CAST(:members AS text[])) "
                "AS b(kind, seq, lo, hi, members)"
            ),
            {
                "run": run.id,
                "kinds": [str(k) for k, *_ in ranges],
                "seqs": [q for _, q, _, _, _ in ranges],
                "los": [lo for _, _, lo, _, _ in ranges],
                "his": [hi for _, _, _, hi, _ in ranges],
                # a text[] per batch, passed as its literal (unnest flattens nested arrays)
                "members": [_text_array(m) for *_, m in ranges],
            },
        )
    run.phase = RunPhase.DISPATCHED
    plan = _open_batches(session, run)
    if not plan.batch_ids:
        plan.status = PlanStatus.EMPTY
    for name, value in _planned(run).items():
        setattr(plan, name, value)
    return plan


def _planned(run: SyncRun) -> dict[str, Any]:
    return {
        "planned_now": True,
        "connector_id": run.connector_id,
        "trigger": run.trigger,
        "adds": run.planned_adds,
        "removes": run.planned_removes,
    }


@dataclass
class DeltaBounds:
    """Every ``step``-th member of each direction of the delta in key order, and the last:
    enough to cut either direction into batches of any multiple of ``step``."""

    marks: dict[bool, list[tuple[int, str]]]  # joins -> [(row number, user_id)], ascending
    totals: dict[bool, int]

    def total(self, joins: bool) -> int:
        return self.totals.get(joins, 0)

    def ranges(
        self, joins: bool, size: int
    ) -> list[tuple[int, str | None, str | None, list[str] | None]]:
        """(seq, lo, hi, members): the key range [lo, hi] of each batch of ``size`` members,
        from its first member to its last as planned (a range never spans keys that held no
        change of this direction: a churn's first range does not cover the whole segment
        below its first joiner). A small direction (every member came back) lists each
        batch's members instead."""
        total = self.total(joins)
        if total == 0:
            return []
        marks = self.marks.get(joins, [])
        if len(marks) == total:
            users = [u for _, u in marks]
            return [
                (seq, None, None, users[start : start + size])
                for seq, start in enumerate(range(0, total, size))
            ]
        at = dict(marks)
        return [
            (seq, at[start + 1], at[min(start + size, total)], None)
            for seq, start in enumerate(range(0, total, size))
        ]


# One ordered pass over the delta numbers the joiners and the leavers; only the first and last
# of every DIRECT_BATCH_SIZE joiners and REMOVE_BATCH_SIZE leavers, and the last of each, come
# back (20,000 rows for a million adds), instead of a million item rows written up front.
_BOUNDS_SQL = """
    SELECT joins, rn, user_id, total FROM (
      SELECT user_id, joins, row_number() OVER w AS rn,
             count(*) OVER (PARTITION BY joins) AS total
      FROM ({delta}) d WINDOW w AS (PARTITION BY joins ORDER BY user_id)) n
    WHERE rn % CASE WHEN joins THEN :add_step ELSE :remove_step END IN (0, 1) OR rn = total
       OR total <= :listed
"""
# Up to this many members a direction's batches list their members (every row comes back):
# a small change then never scans a key range that spans a million-member segment.
LISTED_DELTA = 1_000
assert ADD_BATCH_SIZE % DIRECT_BATCH_SIZE == 0  # the add marks serve both batch sizes


# Each direction as one anti-join numbered in key order: a merge anti-join over the two primary
# keys reads both in that order already, so nothing is sorted. A first sync of a million members
# (an empty ledger): 0.21 s, against 0.58 s for the hash full join and its sort of the million.
# Against a full ledger it reads each table twice and is slower than the full join (1M against
# 1M: 0.71 s against 0.61, the freshness of every small change), so it serves only a connector
# with no ledger yet, where no member has traits to compare either. Every row up to LISTED_DELTA
# comes back too, so a small direction is listed without counting it first; the last row of each
# direction says its total.
_ORDERED_BOUNDS_SQL = """
    SELECT true AS joins, rn, user_id, last FROM (
      SELECT s.user_id, row_number() OVER w AS rn, lead(s.user_id) OVER w IS NULL AS last
      FROM segment_members s
      WHERE s.segment_id = :seg
        AND NOT EXISTS (SELECT 1 FROM connector_members cm
                        WHERE cm.connector_id = :c AND cm.user_id = s.user_id){waiting}
      WINDOW w AS (ORDER BY s.user_id)) j
    WHERE rn % :add_step IN (0, 1) OR last OR rn <= :listed
    UNION ALL
    SELECT false, rn, user_id, last FROM (
      SELECT cm.user_id, row_number() OVER w AS rn, lead(cm.user_id) OVER w IS NULL AS last
      FROM connector_members cm
      WHERE cm.connector_id = :c
        AND NOT EXISTS (SELECT 1 FROM segment_members s
                        WHERE s.segment_id = :seg AND s.user_id = cm.user_id)
      WINDOW w AS (ORDER BY cm.user_id)) l
    WHERE rn % :remove_step IN (0, 1) OR last OR rn <= :listed
"""


def _delta_bounds(session: Session, params: dict[str, Any], *, traits: bool) -> DeltaBounds:
    ledger = session.scalar(
        text("SELECT EXISTS (SELECT 1 FROM connector_members WHERE connector_id = :c)"), params
    )
    if not ledger:  # a first sync
        return _ordered_delta_bounds(session, params)
    waiting = has_waiting(session, params["c"])
    delta = f"SELECT user_id, joins FROM ({_delta_sql(waiting)}) x"
    if traits:  # members whose named traits changed go with the adds
        delta += f" UNION ALL SELECT c.user_id, true FROM ({_CHANGED_SQL}) c"
    marks: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
    totals: dict[bool, int] = {}
    for joins, rn, user_id, total in session.execute(
        text(_BOUNDS_SQL.format(delta=delta)),
        {
            **params,
            "add_step": DIRECT_BATCH_SIZE,
            "remove_step": REMOVE_BATCH_SIZE,
            "listed": LISTED_DELTA,
        },
    ):
        marks[bool(joins)].append((int(rn), user_id))
        totals[bool(joins)] = int(total)
    for rows in marks.values():
        rows.sort()
    return DeltaBounds(marks, totals)


def _ordered_delta_bounds(session: Session, params: dict[str, Any]) -> DeltaBounds:
    steps = {True: DIRECT_BATCH_SIZE, False: REMOVE_BATCH_SIZE}
    rows: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
    totals: dict[bool, int] = {}
    for joins, rn, user_id, last in session.execute(
        text(
            _ORDERED_BOUNDS_SQL.format(waiting=_waiting_clause(session, params["c"], "s.user_id"))
        ),
        {**params, "add_step": steps[True], "remove_step": steps[False], "listed": LISTED_DELTA},
    ):
        rows[bool(joins)].append((int(rn), user_id))
        if last:
            totals[bool(joins)] = int(rn)
    marks: dict[bool, list[tuple[int, str]]] = {}
    for joins, found in rows.items():
        found.sort()
        total = totals.get(joins, 0)
        if total > LISTED_DELTA:  # a big direction: its first rows were only in case it was small
            found = [(rn, u) for rn, u in found if rn % steps[joins] in (0, 1) or rn == total]
        marks[joins] = found
    return DeltaBounds(marks, totals)


def materialize_batch(
    session: Session, batch: SyncBatch, connector: Connector, planned_adds: int, settings: Settings
) -> list[tuple[Any, ...]]:
    """Write the members of a batch planned as a key range, as the segment and the ledger are
    now (the caller holds the batch row locked). A member who joined or left since planning is
    taken as found (one outside every planned range waits): the recompute that changed the
    segment also queued a follow-up run, which settles whatever this run's ranges saw too early,
    too late or not at all. Returns the members written, in key order, as the batch reads
    its unsent members: (user_id, email, external_id, traits) for adds, (user_id, email,
    external_id, profile_id) for removals; the batch's first step needs no second read."""
    params: dict[str, Any] = {
        "run": batch.run_id,
        "seq": batch.seq,
        "kind": batch.kind,
        "seg": connector.segment_id,
        "c": connector.id,
        "lo": batch.lo_user_id,
        "hi": batch.hi_user_id,
        "ids": batch.user_ids,
        "names": list(connector.traits or []),
    }

    # Both sides of each anti-join carry the range, although the join implies it: statistics
    # taken while the ledger was empty otherwise plan a sort of the connector's whole ledger
    # per batch (0.4 s a batch at 300,000 confirmed members, growing with every batch of a
    # first sync).
    def in_range(column: str) -> str:
        if batch.user_ids is not None:  # a small delta's batch: its members, by index probes
            return f" AND {column} = ANY(CAST(:ids AS text[]))"
        # Spelled out per bound (not ":lo IS NULL OR …"), so every plan is an index range scan.
        lo = f" AND {column} >= :lo" if batch.lo_user_id is not None else ""
        return lo + (f" AND {column} <= :hi" if batch.hi_user_id is not None else "")

    if batch.kind == BatchKind.ADD:
        size = DIRECT_BATCH_SIZE if goes_direct(planned_adds, settings) else ADD_BATCH_SIZE
        joiners = (
            "SELECT s.user_id, false AS refresh FROM segment_members s "
            f"WHERE s.segment_id = :seg{in_range('s.user_id')} AND NOT EXISTS "
            "(SELECT 1 FROM connector_members cm WHERE cm.connector_id = :c "
            f"AND cm.user_id = s.user_id{in_range('cm.user_id')} AND cm.confirmed)"
            + _waiting_clause(session, connector.id, "s.user_id")
        )
        traits = "NULL, NULL"
        if connector.traits:
            joiners += (
                f" UNION ALL SELECT c.user_id, true FROM ({_CHANGED_SQL}{in_range('cm.user_id')}"
                f"{in_range('s.user_id')}) c"
            )
            traits = f"{SELECTED_TRAITS_SQL}, {TRAITS_HASH_SQL}"
        sql = (
            "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, "
            "traits, traits_hash, refresh) SELECT :run, sm.user_id, :kind, :seq, "
            f"{SQL_EMAIL_ONCE}, {SQL_EXTERNAL_ID_ONCE}, {traits}, sm.refresh FROM "
            f"(SELECT user_id, refresh FROM ({joiners}) j ORDER BY user_id LIMIT :size) sm "
            f"{SQL_IS_EMAIL} LEFT JOIN identities i ON i.user_id = sm.user_id"
        )
        returning = " RETURNING user_id, email, external_id, traits"
    else:
        size = REMOVE_BATCH_SIZE
        sql = (
            "INSERT INTO sync_batch_items (run_id, user_id, kind, seq, email, external_id, "
            "profile_id) SELECT :run, cm.user_id, :kind, :seq, cm.email, cm.external_id, "
            f"cm.profile_id FROM connector_members cm WHERE cm.connector_id = :c"
            f"{in_range('cm.user_id')} AND NOT EXISTS (SELECT 1 FROM segment_members s "
            f"WHERE s.segment_id = :seg AND s.user_id = cm.user_id{in_range('s.user_id')}) "
            "ORDER BY cm.user_id LIMIT :size"
        )
        returning = " RETURNING user_id, email, external_id, profile_id"
    # ON CONFLICT DO NOTHING, only once the plain insert met one (db/inserts.py): a member
    # added by one range and gone again before a removal range ran is already an item of this
    # run; the follow-up run removes it.
    written = insert_unless_conflict(
        session,
        text(sql + returning),
        text(sql + " ON CONFLICT DO NOTHING" + returning),
        {**params, "size": size},
        returning=True,
    )
    batch.materialized = True
    return sorted(map(tuple, written), key=itemgetter(0))  # user_id: text, never NULL


def _text_array(values: list[str] | None) -> str | None:
    """PostgreSQL's literal for a text[] (every element quoted and escaped), or None."""
    if values is None:
        return None
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


def _open_batches(session: Session, run: SyncRun) -> Plan:
    plan = Plan(run.id, PlanStatus.DISPATCH)
    rows = session.execute(
        select(SyncBatch.id, SyncBatch.kind)
        .where(SyncBatch.run_id == run.id, SyncBatch.status.in_(OPEN_BATCH))
        .order_by(SyncBatch.kind, SyncBatch.seq)
    )
    for batch_id, kind in rows:
        (plan.add_batch_ids if kind == BatchKind.ADD else plan.remove_batch_ids).append(batch_id)
    return plan


def _mass_removal_reason(
    session: Session, connector: Connector, removes: int, settings: Settings
) -> str | None:
    """A broken segment query must never empty a customer's list."""
    if removes == 0:
        return None
    on_list = (
        session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.connector_id == connector.id)
        )
        or 0
    )
    share = removes / on_list if on_list else 0.0
    if share <= settings.mass_removal_threshold:
        return None
    return (
        f"sync held: it would remove {removes} of the {on_list} members on Klaviyo list "
        f"{connector.list_id} ({share:.0%}, above the {settings.mass_removal_threshold:.0%} guard); "
        f"check the segment, then run `segops-sync connectors resync {connector.id} --allow-mass-removal`"
    )


@dataclass(frozen=True)
class Preview:
    adds: int
    removes: int
    sample_adds: list[dict[str, str | None]]
    sample_removes: list[dict[str, str | None]]
    # members on the list whose named traits changed: sent again, not added
    updates: int = 0


def preview(session: Session, connector_id: str, sample: int = 20) -> Preview:
    """The pending delta, computed exactly as a run would, without touching Klaviyo."""
    connector = get_connector(session, connector_id)
    params = {"seg": connector.segment_id, "c": connector.id}
    adds, removes = delta_sizes(session, connector)
    updates = trait_updates(session, connector)
    sample_adds = [
        dict(r._mapping)
        for r in session.execute(
            text(f"{_ADDED_SQL} ORDER BY sm.user_id LIMIT :n"), {**params, "n": sample}
        )
    ]
    sample_removes = [
        dict(r._mapping)
        for r in session.execute(
            text(f"{_REMOVED_SQL} ORDER BY cm.user_id LIMIT :n"), {**params, "n": sample}
        )
    ]
    return Preview(adds, removes, sample_adds, sample_removes, updates)


def delta_sizes(session: Session, connector: Connector) -> tuple[int, int]:
    """(adds, removes) by the planner's own one-pass delta, without writing anything."""
    session.execute(text(_DELTA_WORK_MEM))
    row = session.execute(
        text(
            "SELECT count(*) FILTER (WHERE joins), count(*) FILTER (WHERE NOT joins) "
            f"FROM ({_delta_sql(has_waiting(session, connector.id))}) d"
        ),
        {"seg": connector.segment_id, "c": connector.id},
    ).one()
    return int(row[0]), int(row[1])


def trait_updates(session: Session, connector: Connector) -> int:
    """Members on the list whose named traits changed: the run sends them again as adds."""
    if not connector.traits:
        return 0
    return int(
        session.scalar(
            text(f"SELECT count(*) FROM ({_CHANGED_SQL}) d"),
            {"seg": connector.segment_id, "c": connector.id, "names": list(connector.traits)},
        )
        or 0
    )


def leaver_keys(session: Session, connector: Connector) -> list[tuple[str, RemovalKey | None]]:
    """Each leaver of the planner's one-pass delta as (user_id, what a removal finds it by):
    ``id`` (the ledger holds its profile id: no lookup), ``external_id`` (an account-wide
    lookup), ``email`` (a lookup on the list), or None (nothing to find it by). The order of
    preference is sync/removal.py's."""
    session.execute(text(_DELTA_WORK_MEM))
    rows = session.execute(
        text(
            # NULLIF: removal.py skips an empty value as it skips a missing one
            "SELECT user_id, CASE WHEN NULLIF(profile_id, '') IS NOT NULL THEN 'id' "
            "WHEN NULLIF(external_id, '') IS NOT NULL THEN 'external_id' "
            "WHEN NULLIF(email, '') IS NOT NULL THEN 'email' END "
            f"FROM ({_delta_sql(False)}) d WHERE NOT joins"
        ),
        {"seg": connector.segment_id, "c": connector.id},
    )
    return [(str(u), cast(RemovalKey | None, k)) for u, k in rows]


def mass_removal_reason(
    session: Session, connector: Connector, removes: int, settings: Settings
) -> str | None:
    """Why the mass-removal guard would hold a run removing ``removes`` members (None: it
    would not), as the planner decides it before any approval is taken."""
    return _mass_removal_reason(session, connector, removes, settings)
