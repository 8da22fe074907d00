"""Forget a member (``members forget``, ``segops.forget_user``): off every Klaviyo list, out of
every table, and (asked for) deleted in Klaviyo.

1. A ``forget_records`` row says a forget began (source, whether Klaviyo deletes too): nothing
   personal, not even a hash of the user id. A Redis marker (an HMAC of the user id, for
   FORGOTTEN_FOR) makes a late ``context_identified`` of the member a no-op.
2. One transaction deletes what we keep of the member: its ``segment_members`` rows (in every
   segment: no plan includes it again), ``identities``, ``connector_members``,
   ``sync_batch_items``, ``member_rejections``, the ``list_snapshots`` rows of its email or
   external id, and what any connector's read-back entered of its profiles as foreign (on that
   connector's list too); its user id leaves the member lists and key bounds of
   ``sync_batches``. It first takes the member's advisory lock (an identity write under way
   commits first), then locks the open batches of the running runs of every connector that
   knows the member, then those connectors' rows (``FOR UPDATE``, the order a batch step takes
   them), then the open batches again (a planner may have written new ones meanwhile): no
   materialization or ledger write (sync/ledger.py, which holds the connector row per
   statement) interleaves, so nothing written from the member's rows survives the
   transaction. What the member's identifiers were (emails, external ids, profile ids per
   list) is kept in memory only.
3. Each list that knew the member (its ledger, a batch of a run, a list read back) is asked to
   drop it: the profile ids we knew, and those Klaviyo finds by external id (account-wide) and
   by email on the list, in one DELETE per list and account.
4. A batch that had already sent the member and not yet recorded Klaviyo's answer may still add
   it: that batch is waited for until it settles or its run ends (``run_wait`` at most; a batch
   takes seconds where its run may take hours), then its list is asked again. From a worker
   (``segops.forget_user``) that wait comes first, and off the worker: while such a batch is
   open (``member_in_flight`` without locks, then the purge under its locks, which rolls back
   with ``MemberInFlight``), nothing is kept and the message comes back later (``deferral``;
   ``tasks.forget_user``), since a wait inside the task would hold a pool slot, and as many
   forgets as slots would hold the very batch steps they wait for (a submitted batch settles
   in a step of its own). Past ``RUN_WAIT`` the purge goes ahead and waits no more.
5. ``klaviyo_delete``: one data-privacy deletion request per profile found, per Klaviyo account
   (by email when no profile was found but an email is known).

The record is closed with its counts and, if something failed, what in words without the
member's identifiers (and how to repair the list). A forget of an unknown user deletes nothing
and is not an error; running it again does no harm: nothing is left to delete, and nothing is
left to ask Klaviyo with, so a list that may have kept the member is repaired by a read-back
(``connectors verify --repair --remove-extra``: the member is in no segment any more).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import redis
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from segops_sync.config import ConfigError, Settings
from segops_sync.db.models import ForgetRecord
from segops_sync.db.session import session_scope
from segops_sync.errors import InputError
from segops_sync.klaviyo import InvalidRequest, KlaviyoClient, KlaviyoError
from segops_sync.secrets import decrypt_api_key
from segops_sync.states import OPEN_BATCH, BatchKind, RunStatus
from segops_sync.sync.fleet.access import KlaviyoAccess, LimitedSession, Throttled
from segops_sync.sync.inputs.identity import hold_member, is_email, known_user_id_problem
from segops_sync.sync.outcomes import Action, decide
from segops_sync.sync.retry import backoff, jitter, wait_or_backoff
from segops_sync.sync.verify import FOREIGN_PREFIX

log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], None]

# How long a forget waits for a run that was sending the member when its rows were deleted.
RUN_WAIT = 600.0
RUN_POLL = 1.0
# When a forget message that waits for such a batch before its purge comes back (step 4):
# 2 s, then twice as long each time up to 30 s, so a deletion pipeline's burst of thousands of
# messages does not churn through the queue every 2 s while a big sync runs.
DEFER_POLL = 2.0
DEFER_POLL_MAX = 30.0


def deferral(deferrals: object) -> tuple[float, float]:
    """(how long a forget message has waited before its purge, how long to wait next) after
    ``deferrals`` deferrals (step 4): the countdowns so far, added up. ``deferrals`` comes from
    the message's headers (Celery's ``retries``), which any producer writes: anything but a
    count is taken as none."""
    n = deferrals if type(deferrals) is int and deferrals > 0 else 0
    waited, poll = 0.0, DEFER_POLL
    while n and poll < DEFER_POLL_MAX:  # the doubling part: a few steps
        waited, poll, n = waited + poll, min(2 * poll, DEFER_POLL_MAX), n - 1
    return waited + n * poll, poll


# The purge transaction is retried when PostgreSQL breaks a lock cycle with a batch step.
PURGE_ATTEMPTS = 3
_RETRYABLE = ("40P01", "40001")  # deadlock_detected, serialization_failure


# A message that carried the member's data before the forget may still arrive after it: a
# context_identified retried after a database error, redelivered after its worker died (the
# broker's visibility timeout is an hour), or queued behind a backlog. For this long after a
# forget, such a message is dropped instead of writing the member's identity back.
FORGOTTEN_FOR = 24 * 3600


def _markers(settings: Settings, user_id: str) -> list[str]:
    """The Redis keys that say the member was forgotten lately, one per key of the
    SEGOPS_SECRET_KEY ring (the first is set; any is found, so a rotation loses none): a keyed
    hash (HMAC-SHA256 under a key derived from the secret), so Redis holds no user id, and no
    one without the secret can test a guess against it."""
    markers = []
    for secret in settings.require_secret_key().split(","):
        if secret.strip():
            key = hashlib.sha256(b"segops forgotten-member marker\0" + secret.strip().encode())
            digest = hmac.new(key.digest(), user_id.encode(), hashlib.sha256).hexdigest()
            markers.append(f"{settings.redis_key_prefix}segops:forgotten:{digest}")
    return markers


def forgotten_lately(session: Session, r: redis.Redis, settings: Settings, user_id: str) -> bool:
    """Whether the member was forgotten within FORGOTTEN_FOR: asked by an identity write, in
    its transaction and under the member's lock (a forget that began before it is done by now,
    and one that begins after it waits for its commit, then deletes what it wrote)."""
    hold_member(session, user_id)
    return bool(r.exists(*_markers(settings, user_id)))


class ForgetSource(StrEnum):
    CLI = "cli"
    MESSAGE = "message"


class BadUserId(InputError):
    pass


def check_user_id(user_id: object) -> str:
    """The user id as given, or BadUserId saying what is wrong (never echoing it). A blank id
    is refused too: forgetting "   " is surely a mistake in the caller."""
    problem = known_user_id_problem(user_id)
    if problem is None and isinstance(user_id, str) and not user_id.strip():
        problem = "the user id is empty"
    if problem is not None:
        raise BadUserId(problem)
    assert isinstance(user_id, str)
    return user_id


Batch = tuple[str, str, int]  # run id, kind, seq


@dataclass(frozen=True)
class KnownList:
    """One connector's list that knew the member, and how Klaviyo knows the member there."""

    connector_id: str
    list_id: str
    api_key_encrypted: bytes
    profile_ids: frozenset[str]
    # batches (run id, kind, seq) of running runs that sent the member without recording
    # Klaviyo's answer yet
    in_flight: frozenset[Batch] = frozenset()


@dataclass(frozen=True)
class Known:
    """What the deleted rows said of the member: held in memory while Klaviyo is asked."""

    emails: tuple[str, ...]
    external_ids: tuple[str, ...]
    lists: tuple[KnownList, ...]


@dataclass
class ForgetOutcome:
    record_id: int
    lists_removed: int = 0
    klaviyo_deletions: int = 0
    # what failed, in words without the member's identifiers (also the record's ``error``)
    problems: list[str] = field(default_factory=list)


def forget_member(
    user_id: str,
    *,
    source: ForgetSource,
    klaviyo_delete: bool,
    settings: Settings,
    access: KlaviyoAccess | None = None,
    run_wait: float = RUN_WAIT,
    waited: float = 0.0,
    defer_in_flight: bool = False,
    sleep: Sleep = time.sleep,
    on_wait: Callable[[str], None] | None = None,
) -> ForgetOutcome:
    """Forget one member everywhere (see the module); BadUserId before anything is written.
    ``defer_in_flight``: MemberInFlight, with nothing kept, instead of a purge that would wait
    for a batch. ``waited``: how long the caller already waited for the member's batches
    before the purge, counted with ``run_wait`` when a batch is still open."""
    user_id = check_user_id(user_id)
    marker = _markers(settings, user_id)[0]  # a missing secret stops it before any record
    access = access or KlaviyoAccess(settings)
    outcome = ForgetOutcome(_open_record(source, klaviyo_delete))
    known: Known | None = None
    try:
        # Before the purge: a late message that finds no marker has committed its write before
        # the purge takes the member's lock, and the purge deletes it. Without Redis the purge
        # still goes ahead (a lost forget could never be redone: nothing says whom it was for).
        try:
            access.redis.set(marker, b"1", ex=FORGOTTEN_FOR)
        except redis.RedisError as exc:
            outcome.problems.append(
                f"a message sent before the forget may write the member's identity back for "
                f"{FORGOTTEN_FOR // 3600} hours (Redis took no marker: {type(exc).__name__})"
            )
        known = purge_member(user_id, defer_in_flight=defer_in_flight)
        if known.lists:
            _forget_in_klaviyo(
                known,
                outcome,
                settings,
                access,
                klaviyo_delete=klaviyo_delete,
                run_wait=run_wait,
                waited=waited,
                sleep=sleep,
                on_wait=on_wait,
            )
    except MemberInFlight:
        _delete_record(outcome.record_id)  # nothing happened: the forget comes back later
        raise
    except Exception as exc:
        outcome.problems.append(f"the forget stopped on an error ({type(exc).__name__})")
        # The rows are gone: a retry of this forget would find no list. Each one the member was
        # known on is named with its repair, since the removal may not have gone out.
        for known_list in known.lists if known is not None else ():
            outcome.problems.append(_may_remain(known_list))
        with contextlib.suppress(Exception):  # the failure to report is the one above
            _close_or_log(outcome)
        raise
    _close_or_log(outcome)
    return outcome


def _close_or_log(outcome: ForgetOutcome) -> None:
    """Close the record; when the database will not take it, its problems (which hold nothing
    of the member) go to the log, the one place left that says which lists to repair."""
    try:
        _close_record(outcome)
    except Exception:
        for problem in outcome.problems:
            log.error("forget %d (record not closed): %s", outcome.record_id, problem)
        raise


def _open_record(source: ForgetSource, klaviyo_delete: bool) -> int:
    with session_scope() as s:
        record = ForgetRecord(source=str(source), klaviyo_delete=klaviyo_delete)
        s.add(record)
        s.flush()
        return record.id


def _delete_record(record_id: int) -> None:
    with session_scope() as s:
        s.execute(text("DELETE FROM forget_records WHERE id = :i"), {"i": record_id})


def _close_record(outcome: ForgetOutcome) -> None:
    with session_scope() as s:
        record = s.get_one(ForgetRecord, outcome.record_id)
        record.lists_removed = outcome.lists_removed
        record.klaviyo_deletions = outcome.klaviyo_deletions
        record.error = "; ".join(outcome.problems) or None
        record.finished_at = datetime.now(UTC)


# -- the database ------------------------------------------------------------------------------


# A batch (b) of a run (r) that a forget waits for: the run still running, and the batch open,
# or failed with a send unanswered (in_doubt: its job may still run at Klaviyo). One definition
# for _wait_for_batches and _IN_FLIGHT, which must agree (test_forget checks that they do).
_OPEN = f"b.status IN ({', '.join(repr(str(x)) for x in OPEN_BATCH)})"  # a batch (b) not settled
_AWAITED = f"r.status = '{RunStatus.RUNNING}' AND ({_OPEN} OR b.in_doubt)"
# The member's items in add batches with no answer recorded, whose batch is awaited: what the
# purge counts as in flight and then waits for. Read without locks, from the running runs only
# (one index probe each).
_IN_FLIGHT = f"""
SELECT EXISTS (
    SELECT 1 FROM sync_runs r
    JOIN sync_batch_items it ON it.run_id = r.id AND it.user_id = :u
    JOIN sync_batches b ON b.run_id = it.run_id AND b.kind = it.kind AND b.seq = it.seq
    WHERE {_AWAITED} AND r.purged_at IS NULL
    AND it.kind = '{BatchKind.ADD}' AND it.outcome IS NULL
)
"""


def member_in_flight(user_id: str) -> bool:
    """Whether a batch of a running sync has sent the member (or may yet send it, once
    written) and not recorded Klaviyo's answer: a forget now would have to wait for it after
    its purge (step 4). A check without locks: the purge decides again under its locks."""
    with session_scope() as s:
        return _in_flight(s, user_id)


def _in_flight(s: Session, user_id: str) -> bool:
    return bool(s.scalar(text(_IN_FLIGHT), {"u": user_id}))


class MemberInFlight(Exception):
    """A batch of a running sync has sent the member and awaits Klaviyo's answer: the purge
    was rolled back and its record deleted (a forget that may not wait comes back later)."""


def purge_member(user_id: str, *, defer_in_flight: bool = False) -> Known:
    """Delete every row of the member in one transaction (see the module); what they said.
    ``defer_in_flight``: MemberInFlight, with nothing deleted, when under the purge's locks a
    batch is found that has sent the member and awaits Klaviyo's answer."""
    for attempt in range(1, PURGE_ATTEMPTS + 1):
        try:
            with session_scope() as s:
                return _purge(s, user_id, defer_in_flight)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) not in _RETRYABLE or attempt == PURGE_ATTEMPTS:
                raise
            log.info("forget: a lock cycle with a running sync broke the purge; again")
    raise AssertionError("unreachable")


# Items live under their run's primary key (run_id, user_id): one index probe per run whose
# details the retention purge has not deleted yet, never a scan of every run's members.
_ITEMS = (
    "FROM sync_runs r JOIN sync_batch_items it ON it.run_id = r.id AND it.user_id = ANY(:us) "
    "WHERE r.purged_at IS NULL"
)
# A read-back in progress holds a whole list: two index probes (ix_list_snapshots_email and
# _external_id), since the connectors' rows are held meanwhile.
SNAPSHOT_ROWS_DELETE = (
    "DELETE FROM list_snapshots WHERE lower(email) = ANY(:emails) "
    "OR external_id = ANY(:exts) RETURNING connector_id, profile_id"
)
# Each segment id once, one index probe each (a skip scan of segment_members' primary key).
_SEGMENT_IDS = """
WITH RECURSIVE g AS (
    (SELECT segment_id FROM segment_members ORDER BY segment_id LIMIT 1)
    UNION ALL
    SELECT (SELECT s.segment_id FROM segment_members s WHERE s.segment_id > g.segment_id
            ORDER BY s.segment_id LIMIT 1)
    FROM g WHERE g.segment_id IS NOT NULL
)
SELECT segment_id FROM g WHERE segment_id IS NOT NULL
"""


def _purge(s: Session, u: str, defer_in_flight: bool) -> Known:
    p: dict[str, Any] = {"u": u, "us": [u]}
    hold_member(s, u)  # an identity write in progress commits first: its row is deleted below
    connectors = {
        row.id: row
        for row in s.execute(
            text("SELECT id, segment_id, list_id, api_key_encrypted FROM connectors")
        )
    }
    everyone = sorted(connectors)
    ledger_sql = (
        "SELECT cm.connector_id, cm.email, cm.external_id, cm.profile_id FROM connector_members cm "
        "WHERE cm.connector_id = ANY(:all) AND cm.user_id = ANY(:us)"
    )
    items_sql = (
        "SELECT r.connector_id, r.id AS run_id, r.status, it.kind, it.seq, it.outcome, it.email, "
        f"it.external_id, it.profile_id {_ITEMS}"
    )

    def as_foreign(rows: Iterable[Any]) -> dict[str, Any]:
        """The ledger keys and items of the member's profiles where a read-back entered them
        as foreign (verify.adopt_foreign): on that connector's list too, to be removed."""
        return {"us": sorted({FOREIGN_PREFIX + r.profile_id for r in rows if r.profile_id})}

    def knowing() -> set[str]:
        own = [
            *s.execute(text(ledger_sql), {**p, "all": everyone}),
            *s.execute(text(items_sql), p),
        ]
        return (
            {r.connector_id for r in own}
            | {
                r.connector_id
                for r in s.execute(text(ledger_sql), {**as_foreign(own), "all": everyone})
            }
            | set(
                s.scalars(
                    text(
                        "SELECT c.id FROM connectors c WHERE EXISTS (SELECT 1 FROM "
                        "segment_members sm WHERE sm.segment_id = c.segment_id AND sm.user_id = :u)"
                    ),
                    p,
                )
            )
        ) & set(connectors)

    lock_open_batches = text(
        "SELECT b.id FROM sync_batches b JOIN sync_runs r ON r.id = b.run_id "
        f"WHERE r.status = '{RunStatus.RUNNING}' AND r.connector_id = ANY(:c) "
        f"AND {_OPEN} ORDER BY b.id FOR UPDATE OF b"
    )

    def lock(connector_ids: list[str]) -> None:
        """Before reading what to delete: batch rows first, then connector rows, the order a
        batch step takes them (its materialization holds its batch row, its ledger write then
        the connector row). Then the batch rows again: a planner holds the connector row while
        it writes a run's batches, so the wait may end on batches that did not exist before.
        Their first step would write the member's items from rows not deleted yet; locked now,
        each has either written them (committed: found and deleted below) or finds none. (A
        batch step of such a batch that waits for the connector row meanwhile is a lock cycle
        PostgreSQL breaks: the purge is tried again, PURGE_ATTEMPTS.)"""
        if connector_ids:
            s.execute(lock_open_batches, {"c": connector_ids})
            s.execute(
                text("SELECT id FROM connectors WHERE id = ANY(:c) ORDER BY id FOR UPDATE"),
                {"c": connector_ids},
            )
            s.execute(lock_open_batches, {"c": connector_ids})

    locked = sorted(knowing())
    lock(locked)
    # A batch step materializing the member's batch held its row until now: its items are
    # committed, and found here (member_in_flight's question, asked under the locks).
    if defer_in_flight and _in_flight(s, u):
        raise MemberInFlight

    ledger = list(s.execute(text(ledger_sql), {**p, "all": everyone}).all())
    items = list(s.execute(text(items_sql), p).all())
    identity_email = s.scalar(text("SELECT email FROM identities WHERE user_id = :u"), p)
    emails = _distinct_emails(
        [u if is_email(u) else None, identity_email]
        + [r.email for r in ledger]
        + [r.email for r in items]
    )
    external_ids = sorted(
        {x for x in [None if is_email(u) else u] + [r.external_id for r in ledger + items] if x}
    )
    snapshots = s.execute(
        text(SNAPSHOT_ROWS_DELETE),
        {"emails": [e.lower() for e in emails], "exts": external_ids},
    ).all()

    foreign = as_foreign([*ledger, *items, *snapshots])

    def of_foreign() -> tuple[list[Any], list[Any]]:
        return (
            list(s.execute(text(ledger_sql), {**foreign, "all": everyone})),
            list(s.execute(text(items_sql), foreign)),
        )

    # profile ids learnt since knowing() (a snapshot's, say) may name other connectors
    rows, runs = of_foreign()
    lock(sorted({r.connector_id for r in rows + runs} - set(locked)))
    rows, runs = of_foreign()
    ledger += rows
    items += runs
    p["us"] = [u, *foreign["us"]]

    profile_ids: dict[str, set[str]] = {}
    in_flight: dict[str, set[Batch]] = {}
    for row in [*ledger, *snapshots]:
        profile_ids.setdefault(row.connector_id, set())
        if row.profile_id:
            profile_ids[row.connector_id].add(row.profile_id)
    for item in items:
        profile_ids.setdefault(item.connector_id, set())
        if item.profile_id:
            profile_ids[item.connector_id].add(item.profile_id)
        if item.status == RunStatus.RUNNING and item.kind == BatchKind.ADD and item.outcome is None:
            in_flight.setdefault(item.connector_id, set()).add((item.run_id, item.kind, item.seq))

    segments = list(s.scalars(text(_SEGMENT_IDS)))
    s.execute(
        text("DELETE FROM segment_members WHERE segment_id = ANY(:g) AND user_id = :u"),
        {**p, "g": segments},
    )
    s.execute(text("DELETE FROM identities WHERE user_id = :u"), p)
    s.execute(
        text("DELETE FROM connector_members WHERE connector_id = ANY(:all) AND user_id = ANY(:us)"),
        {**p, "all": everyone},
    )
    s.execute(
        text(
            "DELETE FROM sync_batch_items it USING sync_runs r WHERE it.run_id = r.id "
            "AND it.user_id = ANY(:us) AND r.purged_at IS NULL"
        ),
        p,
    )
    s.execute(text("DELETE FROM member_rejections WHERE user_id = :u"), p)
    s.execute(
        text(
            "UPDATE sync_batches b SET user_ids = ARRAY(SELECT x FROM unnest(b.user_ids) "
            "WITH ORDINALITY AS m(x, n) WHERE x <> ALL(:us) ORDER BY n) FROM sync_runs r "
            "WHERE r.id = b.run_id AND r.purged_at IS NULL AND b.user_ids && CAST(:us AS text[])"
        ),
        p,
    )
    _clear_bounds(s, p["us"])

    lists = tuple(
        KnownList(
            connector_id=cid,
            list_id=connectors[cid].list_id,
            api_key_encrypted=bytes(connectors[cid].api_key_encrypted),
            profile_ids=frozenset(ids),
            in_flight=frozenset(in_flight.get(cid, ())),
        )
        for cid, ids in sorted(profile_ids.items())
        if cid in connectors
    )
    return Known(tuple(emails), tuple(external_ids), lists)


def _distinct_emails(values: Iterable[str | None]) -> list[str]:
    seen: dict[str, str] = {}
    for value in values:
        if value:
            seen.setdefault(value.strip().lower(), value)
    return sorted(seen.values())


def _clear_bounds(s: Session, keys: list[str]) -> None:
    """A batch whose key range starts or ends at the member (one of its ``keys``: its user id,
    its foreign profiles' ledger keys): the range is only used to write
    the members of a batch not run yet (sync/planner.py materialize_batch), so elsewhere the
    bound goes (as the retention purge does). For a batch still to be written, the bound becomes
    the nearest other member inside the range (the member itself is in neither table any more,
    so the range covers the same members); a range left with nobody becomes an empty list."""
    batches = s.execute(
        text(
            "SELECT b.id, b.lo_user_id, b.hi_user_id, c.segment_id, r.connector_id, "
            f"(r.status = '{RunStatus.RUNNING}' AND NOT b.materialized "
            f"AND {_OPEN}) AS to_write "
            "FROM sync_batches b JOIN sync_runs r ON r.id = b.run_id "
            "LEFT JOIN connectors c ON c.id = r.connector_id "
            "WHERE r.purged_at IS NULL AND (b.lo_user_id = ANY(:us) OR b.hi_user_id = ANY(:us))"
        ),
        {"us": keys},
    ).all()
    for b in batches:
        lo = None if b.lo_user_id in keys else b.lo_user_id
        hi = None if b.hi_user_id in keys else b.hi_user_id
        empty = False
        if b.to_write and b.segment_id is not None:
            near = {"g": b.segment_id, "c": b.connector_id}
            if b.lo_user_id in keys:
                lo = s.scalar(
                    text(
                        "SELECT min(x) FROM (SELECT min(user_id) AS x FROM segment_members "
                        "WHERE segment_id = :g AND user_id > :u UNION ALL SELECT min(user_id) "
                        "FROM connector_members WHERE connector_id = :c AND user_id > :u) n"
                    ),
                    {**near, "u": b.lo_user_id},
                )
                empty = lo is None
            if b.hi_user_id in keys and not empty:
                hi = s.scalar(
                    text(
                        "SELECT max(x) FROM (SELECT max(user_id) AS x FROM segment_members "
                        "WHERE segment_id = :g AND user_id < :u UNION ALL SELECT max(user_id) "
                        "FROM connector_members WHERE connector_id = :c AND user_id < :u) n"
                    ),
                    {**near, "u": b.hi_user_id},
                )
                empty = hi is None
            if not empty and lo is not None and hi is not None:
                empty = bool(
                    s.scalar(
                        text("SELECT CAST(:lo AS text) > CAST(:hi AS text)"), {"lo": lo, "hi": hi}
                    )
                )
        if empty:  # nobody left in the range: the batch lists its members, none
            s.execute(
                text(
                    "UPDATE sync_batches SET lo_user_id = NULL, hi_user_id = NULL, "
                    "user_ids = CAST('{}' AS text[]) WHERE id = :b"
                ),
                {"b": b.id},
            )
        else:
            s.execute(
                text("UPDATE sync_batches SET lo_user_id = :lo, hi_user_id = :hi WHERE id = :b"),
                {"b": b.id, "lo": lo, "hi": hi},
            )


# -- Klaviyo -----------------------------------------------------------------------------------

# Nothing of the member is left to ask Klaviyo with again: a list that may still hold it is
# repaired by a read-back, which removes what is in no segment (the member is in none now).
_REPAIR = "`segops-sync connectors verify {} --repair --remove-extra` removes it once fixed"


def _may_remain(known_list: KnownList, why: str | None = None) -> str:
    """The problem of a list the member may still be on, with its repair (and why, if known)."""
    because = f" ({why})" if why else ""
    return (
        f"connector {known_list.connector_id}: the member may still be on Klaviyo list "
        f"{known_list.list_id}{because}; " + _REPAIR.format(known_list.connector_id)
    )


@dataclass
class _Account:
    """The lists of one Klaviyo account (one budget), reached with the first key that knew it."""

    client: KlaviyoClient
    limited: LimitedSession
    profile_ids: set[str] = field(default_factory=set)
    lists_done: set[str] = field(default_factory=set)  # asked in this pass
    lists_removed: set[str] = field(default_factory=set)  # sent a removal (counted once)


def _forget_in_klaviyo(
    known: Known,
    outcome: ForgetOutcome,
    settings: Settings,
    access: KlaviyoAccess,
    *,
    klaviyo_delete: bool,
    run_wait: float,
    waited: float,
    sleep: Sleep,
    on_wait: Callable[[str], None] | None,
) -> None:
    accounts: dict[str, _Account] = {}
    by_connector: dict[str, str] = {}
    try:
        for known_list in known.lists:
            name = _account_for(known_list, settings, access, accounts, outcome, sleep)
            if name is None:
                continue
            by_connector[known_list.connector_id] = name
            _remove(known_list, accounts[name], known, settings, sleep, outcome)
        in_flight = [k for k in known.lists if k.in_flight and k.connector_id in by_connector]
        if in_flight:
            batches = sorted({b for k in in_flight for b in k.in_flight})
            if on_wait is not None:
                on_wait(
                    f"waiting for {len(batches)} batch(es) of a running sync that sent the member"
                )
            still = _wait_for_batches(batches, run_wait, sleep)
            for known_list in in_flight:
                if still & known_list.in_flight:
                    outcome.problems.append(
                        f"connector {known_list.connector_id}: a batch that sent the member was "
                        f"still open after {waited + run_wait:.0f}s, so the member may be added to "
                        f"Klaviyo list {known_list.list_id} after it was removed; "
                        + _REPAIR.format(known_list.connector_id)
                    )
                again = accounts[by_connector[known_list.connector_id]]
                again.lists_done.discard(known_list.list_id)  # ask that list again
                _remove(known_list, again, known, settings, sleep, outcome)
        if klaviyo_delete:
            for account in accounts.values():
                _request_deletions(account, known, settings, sleep, outcome)
    finally:
        for account in accounts.values():
            account.client.close()


def _account_for(
    known_list: KnownList,
    settings: Settings,
    access: KlaviyoAccess,
    accounts: dict[str, _Account],
    outcome: ForgetOutcome,
    sleep: Sleep,
) -> str | None:
    try:
        api_key = decrypt_api_key(known_list.api_key_encrypted, settings.require_secret_key())
        account = _patiently(None, settings, sleep, access.account_of, api_key)
        if account not in accounts:
            client, limited = access.client(api_key, claimant="forget")
            accounts[account] = _Account(client, limited)
    except (KlaviyoError, ConfigError, ValueError, redis.RedisError) as exc:
        outcome.problems.append(_may_remain(known_list, _said(exc)))
        return None
    return account


def _remove(
    known_list: KnownList,
    account: _Account,
    known: Known,
    settings: Settings,
    sleep: Sleep,
    outcome: ForgetOutcome,
) -> None:
    list_id = known_list.list_id
    if list_id in account.lists_done:
        return  # another connector of the same account and list asked already
    account.lists_done.add(list_id)
    try:
        ids = set(known_list.profile_ids) | _look_up(account, list_id, known, settings, sleep)
        if not ids:
            return
        try:
            _patiently(
                account.limited,
                settings,
                sleep,
                account.client.remove_profiles_from_list,
                list_id,
                sorted(ids),
            )
        except InvalidRequest:
            # ids Klaviyo no longer knows (merged or deleted profiles): what it finds now
            ids = _look_up(account, list_id, known, settings, sleep)
            if not ids:
                return
            _patiently(
                account.limited,
                settings,
                sleep,
                account.client.remove_profiles_from_list,
                list_id,
                sorted(ids),
            )
        account.profile_ids |= ids
        if list_id not in account.lists_removed:
            account.lists_removed.add(list_id)
            outcome.lists_removed += 1
    except (KlaviyoError, redis.RedisError) as exc:  # Redis: the fleet limiter
        outcome.problems.append(_may_remain(known_list, _said(exc)))


def _look_up(
    account: _Account, list_id: str, known: Known, settings: Settings, sleep: Sleep
) -> set[str]:
    found: set[str] = set()
    client = account.client
    if known.external_ids:
        hits = _patiently(
            account.limited,
            settings,
            sleep,
            client.find_profile_ids,
            "external_id",
            list(known.external_ids),
        )
        found |= set(hits.values())
    if known.emails:
        hits = _patiently(
            account.limited,
            settings,
            sleep,
            client.find_list_profile_ids,
            list_id,
            list(known.emails),
        )
        found |= set(hits.values())
    return found


def _request_deletions(
    account: _Account, known: Known, settings: Settings, sleep: Sleep, outcome: ForgetOutcome
) -> None:
    """One deletion per profile found in the account; by email when none was found."""
    requests: list[dict[str, str]] = [{"profile_id": p} for p in sorted(account.profile_ids)]
    if not requests:
        requests = [{"email": e} for e in known.emails]
    for request in requests:
        try:
            _patiently(
                account.limited, settings, sleep, account.client.request_profile_deletion, **request
            )
        except (KlaviyoError, redis.RedisError) as exc:
            outcome.problems.append(
                f"a profile deletion was not requested of Klaviyo: {_said(exc)}"
            )
            continue
        outcome.klaviyo_deletions += 1


def _patiently(
    limited: LimitedSession | None,
    settings: Settings,
    sleep: Sleep,
    call: Callable[..., T],
    *args: Any,
    **kwargs: Any,
) -> T:
    """``call``, waiting when the fleet limiter or a 429 says so and retrying transient failures
    within the transient budget; any other failure propagates."""
    failures = 0
    while True:
        try:
            return call(*args, **kwargs)
        except (Throttled, KlaviyoError) as exc:
            decision = decide(exc, list_id="")
            if decision.action is Action.WAIT:
                wait = wait_or_backoff(decision.wait, 1, settings)
                if limited is not None and not isinstance(exc, Throttled):
                    limited.rate_limited(wait)  # a 429 backs off the whole fleet
                sleep(wait + jitter(wait))
            elif decision.action is Action.RETRY and isinstance(exc, KlaviyoError):
                failures += 1
                if failures > settings.transient_retry_budget:
                    raise
                sleep(backoff(failures, settings))
            else:
                raise


def _said(exc: Exception) -> str:
    """What failed, without Klaviyo's detail (it may quote the member's identifiers)."""
    if isinstance(exc, KlaviyoError):
        status = f" (HTTP {exc.status})" if exc.status is not None else ""
        return f"{exc.summary}{status}"
    return type(exc).__name__


def _wait_for_batches(batches: list[Batch], timeout: float, sleep: Sleep) -> set[Batch]:
    """Wait until each of these batches has settled (or its run ended); those still open at
    the timeout. A batch that failed with a send unanswered (``in_doubt``: its job may still
    run at Klaviyo) counts as open until its run ends, as it did when the whole run was waited
    for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with session_scope() as s:
                running = {
                    (b.run_id, b.kind, b.seq)
                    for b in s.execute(
                        text(
                            "SELECT b.run_id, b.kind, b.seq FROM sync_batches b "
                            "JOIN sync_runs r ON r.id = b.run_id "
                            "JOIN unnest(CAST(:r AS text[]), CAST(:k AS text[]), "
                            "CAST(:q AS int[])) w(run_id, kind, seq) "
                            "ON b.run_id = w.run_id AND b.kind = w.kind AND b.seq = w.seq "
                            f"WHERE {_AWAITED}"
                        ),
                        {
                            "r": [b[0] for b in batches],
                            "k": [b[1] for b in batches],
                            "q": [b[2] for b in batches],
                        },
                    )
                }
        except OperationalError:
            # The database is away (a restart, a dropped connection): the member's rows are
            # already gone and only this wait holds its lists, so wait on, as if still running.
            running = set(batches)
        if not running or time.monotonic() >= deadline:
            return running
        sleep(RUN_POLL)
