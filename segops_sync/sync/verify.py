"""Reading a Klaviyo list back and comparing it with the segment (read-back reconciliation).

Everyone else trusts their own state; a list edited in Klaviyo's UI, or a profile merged there,
then never heals. Here the list is read back (``GET /api/lists/{id}/profiles``, L tier, 100 a
page, under the fleet limiter) into ``list_snapshots`` page by page, and compared with the
segment in SQL: a million-member list is a join, not a Python set.

- missing: segment members not on the list. Those the ledger counts as present leave the
  ledger (it is wrong about them), so the next sync adds them again.
- extra: list profiles that are no segment member. The ledger's own leavers go at the next
  sync anyway. Those the ledger does not know but our run history shows this connector added
  to this list are ours: ``--repair`` enters them in the ledger, so that the normal removal
  path and its mass-removal guard handle them. Foreign profiles (never ours) are only removed
  on request (``--remove-extra``), the same way.

Members are matched on the identifiers the sync sends (external_id, email) and on the profile
id the ledger learnt.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from segops_sync.config import Settings
from segops_sync.db.models import Connector, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.klaviyo import KlaviyoError, ListMember
from segops_sync.secrets import decrypt_api_key
from segops_sync.states import (
    BatchKind,
    ConnectorStatus,
    ItemOutcome,
    RunStatus,
    StartReason,
    Trigger,
)
from segops_sync.sync.fleet.access import KlaviyoAccess, LimitedSession, Throttled
from segops_sync.sync.fleet.locks import refreshed_lock
from segops_sync.sync.inputs.identity import SQL_EMAIL, SQL_EXTERNAL_ID
from segops_sync.sync.ledger import (
    adopt_foreign,
    adopt_in_doubt,
    forget_missing,
    learn_profile_ids,
    mark_suppressed,
)
from segops_sync.sync.ledger import release_foreign as ledger_release_foreign
from segops_sync.sync.outcomes import Action, decide, describe_for_person
from segops_sync.sync.planner import StartOutcome, start_run
from segops_sync.sync.retention import snapshot_lease
from segops_sync.sync.retry import backoff, jitter, wait_or_backoff

log = logging.getLogger(__name__)

# Foreign profiles entered in the ledger for removal carry this user_id prefix.
FOREIGN_PREFIX = "klaviyo-profile:"
# A verification killed halfway leaves its snapshot; the next one of the connector clears it.
STALE_SNAPSHOT = timedelta(hours=6)

Sleep = Callable[[float], None]


class VerifyError(Exception):
    """The list could not be read back (Klaviyo kept failing); nothing was changed."""


class ReadBackBusy(VerifyError):
    """Another read-back of this connector's list is running (the beat's, or a CLI's)."""


@contextmanager
def one_read_back(connector_id: str, access: KlaviyoAccess, settings: Settings) -> Iterator[None]:
    """One read-back per connector at a time, fleet-wide. At about 4M members a read-back
    outlasts the broker's visibility timeout (an hour), and Redis hands the same task to a
    second worker: that one must not read the list a second time. The lock is refreshed while
    the read-back runs (sync/fleet/locks.py): a live holder keeps it however long, a dead one's
    expires within a minute."""
    key = f"{settings.redis_key_prefix}segops:verify:{connector_id}"
    with refreshed_lock(access.redis, key) as held:
        if not held:
            raise ReadBackBusy(
                f"another read-back of connector {connector_id}'s list is running; "
                "try again after it"
            )
        yield


@dataclass(frozen=True)
class Comparison:
    connector_id: str
    verify_id: str
    in_list: int  # profiles on the Klaviyo list
    expected: int  # members of the segment
    missing: int  # segment members not on the list
    extra: int  # list profiles that are no segment member
    foreign: int  # extra profiles the connector never added (as far as its history goes)
    suppressed: int  # segment members on the list whose email Klaviyo suppresses
    forgotten: int  # ledger rows dropped: the ledger said "on the list", Klaviyo did not
    # extra profiles the ledger does not know that our run history shows we added (--repair)
    added_by_us: int = 0

    @property
    def matches(self) -> bool:
        return self.missing == 0 and self.extra == 0


# -- reading ---------------------------------------------------------------------------------


def read_list(
    connector_id: str,
    access: KlaviyoAccess,
    settings: Settings,
    *,
    sleep: Sleep = time.sleep,
    verify_id: str | None = None,
) -> tuple[str, datetime]:
    """Read the connector's list into ``list_snapshots``; returns (verify_id, read start).

    Waits (sleeps) when the fleet limiter or a 429 says so, retries transient failures with
    backoff; permanent Klaviyo errors (a revoked key, an unknown list) propagate."""
    with session_scope() as s:
        connector = s.get_one(Connector, connector_id)
        list_id = connector.list_id
        api_key = decrypt_api_key(connector.api_key_encrypted, settings.require_secret_key())
        started = datetime.now(UTC)
        s.execute(
            text("DELETE FROM list_snapshots WHERE connector_id = :c AND taken_at < :t"),
            {"c": connector_id, "t": started - STALE_SNAPSHOT},
        )
    verify_id = verify_id or str(uuid.uuid4())
    client, limited = _with_waits(
        lambda: access.client(api_key, claimant=f"verify:{connector_id}"),
        None,
        settings,
        sleep,
        list_id,
    )
    try:
        with client:
            # one L-tier call: the list still exists for this key, and its opt-in process
            found = _with_waits(
                partial(client.get_list, list_id), limited, settings, sleep, list_id
            )
            with session_scope() as s:
                s.get_one(Connector, connector_id).opt_in_process = found.opt_in_process
            next_url: str | None = None
            while True:
                page, nxt = _with_waits(
                    partial(client.list_members_page, list_id, next_url),
                    limited,
                    settings,
                    sleep,
                    list_id,
                )
                _store(connector_id, verify_id, page)
                if nxt is None:
                    return verify_id, started
                next_url = nxt
    except BaseException:
        discard(connector_id, verify_id)  # a half-read list compares with nothing
        raise


def _with_waits(
    call: Callable[[], Any],
    limited: LimitedSession | None,
    settings: Settings,
    sleep: Sleep,
    list_id: str,
) -> Any:
    """``call()``, doing what ``outcomes.decide`` says of each failure: wait (a 429's
    Retry-After, the limiter's refusal), retry transient failures with backoff until the
    transient budget is spent, and let the rest (a revoked key, an unknown list) propagate."""
    failures = 0
    while True:
        try:
            return call()
        except (Throttled, KlaviyoError) as exc:
            decision = decide(exc, list_id=list_id)
            if decision.action is Action.WAIT:
                # A 429 spends no transient budget: without Retry-After it waits as a first
                # failure would.
                wait = wait_or_backoff(decision.wait, 1, settings)
                if limited is not None and not isinstance(exc, Throttled):
                    limited.rate_limited(wait)  # a 429 backs off the whole fleet
                sleep(wait + jitter(wait))
            elif decision.action is Action.RETRY:
                failures += 1
                if failures > settings.transient_retry_budget:
                    raise VerifyError(
                        f"Klaviyo kept failing while the list was read back ({decision.message})"
                    ) from None
                sleep(backoff(failures, settings))
            else:
                raise


def _store(connector_id: str, verify_id: str, page: list[ListMember]) -> None:
    if not page:
        return
    with session_scope() as s:
        s.execute(
            text(
                "INSERT INTO list_snapshots (verify_id, profile_id, connector_id, email, "
                "external_id, suppressed) "
                "SELECT :v, p.id, :c, p.email, p.ext, p.sup FROM unnest(CAST(:ids AS text[]), "
                "CAST(:emails AS text[]), CAST(:exts AS text[]), CAST(:sups AS boolean[])) "
                "AS p(id, email, ext, sup) ON CONFLICT DO NOTHING"
            ),
            {
                "v": verify_id,
                "c": connector_id,
                "ids": [m.id for m in page],
                "emails": [m.email for m in page],
                "exts": [m.external_id for m in page],
                "sups": [m.suppressed for m in page],
            },
        )


# -- comparing -------------------------------------------------------------------------------

# The comparison runs on indexed temporary tables of this transaction: expected (the segment
# with its identifiers), snap (the read-back), pairs (user_id, profile_id: a member and the list
# profile that is it) and ours (list profiles the ledger knows). Equi-joins only, ANALYZEd, so
# PostgreSQL hash-joins a million rows instead of nesting loops.
_PREPARE = (
    "DROP TABLE IF EXISTS v_expected, v_snap, v_pairs, v_ours",
    f"""CREATE TEMP TABLE v_expected ON COMMIT DROP AS
        SELECT sm.user_id, lower({SQL_EMAIL}) AS email, {SQL_EXTERNAL_ID} AS external_id
        FROM segment_members sm LEFT JOIN identities i ON i.user_id = sm.user_id
        WHERE sm.segment_id = :seg""",
    """CREATE TEMP TABLE v_snap ON COMMIT DROP AS
        SELECT profile_id, lower(email) AS email, external_id, suppressed
        FROM list_snapshots WHERE verify_id = :v""",
    "ANALYZE v_expected",
    "ANALYZE v_snap",
    """CREATE TEMP TABLE v_pairs ON COMMIT DROP AS
        SELECT e.user_id, s.profile_id FROM v_expected e JOIN v_snap s
          ON s.external_id = e.external_id
        UNION
        SELECT e.user_id, s.profile_id FROM v_expected e JOIN v_snap s ON s.email = e.email
        UNION
        SELECT e.user_id, s.profile_id FROM v_expected e
        JOIN connector_members cm ON cm.connector_id = :c AND cm.user_id = e.user_id
        JOIN v_snap s ON s.profile_id = cm.profile_id""",
    """CREATE TEMP TABLE v_ours ON COMMIT DROP AS
        SELECT s.profile_id FROM v_snap s JOIN connector_members cm
          ON cm.connector_id = :c AND cm.profile_id = s.profile_id
        UNION
        SELECT s.profile_id FROM v_snap s JOIN connector_members cm
          ON cm.connector_id = :c AND cm.external_id = s.external_id
        UNION
        SELECT s.profile_id FROM v_snap s JOIN connector_members cm
          ON cm.connector_id = :c AND lower(cm.email) = s.email""",
    "CREATE INDEX ON v_pairs (user_id)",
    "CREATE INDEX ON v_pairs (profile_id)",
    "ANALYZE v_pairs",
    "ANALYZE v_ours",
)
_MISSING = "SELECT e.user_id FROM v_expected e WHERE NOT EXISTS (SELECT 1 FROM v_pairs p WHERE p.user_id = e.user_id)"
_EXTRA = "SELECT s.profile_id FROM v_snap s WHERE NOT EXISTS (SELECT 1 FROM v_pairs p WHERE p.profile_id = s.profile_id)"
_SUPPRESSED = "SELECT p.user_id FROM v_pairs p JOIN v_snap s ON s.profile_id = p.profile_id WHERE s.suppressed"
_UNLEDGERED = f"SELECT x.profile_id FROM ({_EXTRA}) x WHERE NOT EXISTS (SELECT 1 FROM v_ours o WHERE o.profile_id = x.profile_id)"

# What this connector sent to this very list by its run history: members added or updated, and
# members a batch sent before it ended without recording the outcome (they may be on the list).
# Only as far back as batch items are kept: the retention purge (SEGOPS_RETENTION_DAYS, 30 days
# by default) deletes older runs' items, and a profile only they would name counts as foreign.
_SENT_HISTORY = f"""
    SELECT lower(it.email) AS email, it.external_id, it.profile_id
    FROM sync_runs r JOIN sync_batch_items it ON it.run_id = r.id AND it.kind = '{BatchKind.ADD}'
    JOIN sync_batches b ON b.run_id = it.run_id AND b.kind = it.kind AND b.seq = it.seq
    WHERE r.connector_id = :c AND r.list_id = :list
      AND (it.outcome IN ('{ItemOutcome.ADDED}', '{ItemOutcome.UPDATED}')
           OR (it.outcome IS NULL AND b.sent_at IS NOT NULL))"""
# The unledgered extra profiles that history names (built only when there are any).
_ADDED_BY_US = (
    "DROP TABLE IF EXISTS v_added",
    f"""CREATE TEMP TABLE v_added ON COMMIT DROP AS
        WITH u AS (SELECT s.profile_id, s.email, s.external_id FROM v_snap s
                   WHERE s.profile_id IN ({_UNLEDGERED})),
             h AS ({_SENT_HISTORY})
        SELECT u.profile_id FROM u JOIN h ON h.external_id = u.external_id
        UNION SELECT u.profile_id FROM u JOIN h ON h.email = u.email
        UNION SELECT u.profile_id FROM u JOIN h ON h.profile_id = u.profile_id""",
)


def compare(
    session: Session,
    connector_id: str,
    verify_id: str,
    started: datetime,
    *,
    adopt_extra: bool = False,
    adopt_ours: bool = False,
) -> Comparison:
    """Count what differs, and drop from the ledger the members Klaviyo no longer has on the
    list (only rows confirmed before the read began: a run may have added others since). Each
    member the read-back pairs with a profile keeps that profile's id in the ledger.

    With ``adopt_ours`` the extra profiles our run history shows we added enter the ledger
    (``--repair``), with ``adopt_extra`` the foreign ones too (``--remove-extra``), so that
    the next sync removes them through the normal removal path, mass-removal guard included."""
    connector = session.get_one(Connector, connector_id)
    params: dict[str, Any] = {
        "seg": connector.segment_id,
        "c": connector_id,
        "v": verify_id,
        "list": connector.list_id,
    }
    # Members an ended run sent without recording Klaviyo's answer are ours if on the list:
    # in the ledger (unconfirmed), as the next run's planner would enter them.
    adopt_in_doubt(session, connector_id, connector.list_id)
    for statement in _PREPARE:
        session.execute(text(statement), params)
    row = session.execute(
        text(
            f"""SELECT (SELECT count(*) FROM v_snap), (SELECT count(*) FROM v_expected),
                   (SELECT count(*) FROM ({_MISSING}) m), (SELECT count(*) FROM ({_EXTRA}) x),
                   (SELECT count(*) FROM ({_UNLEDGERED}) f),
                   (SELECT count(DISTINCT x.user_id) FROM ({_SUPPRESSED}) x)"""
        )
    ).one()
    in_list, expected, missing, extra, unledgered, suppressed = (int(v) for v in row)
    added_by_us = 0
    if unledgered:  # the ledger may have lost track of what we added (a failed run, a list
        # changed and changed back): the run history tells
        for statement in _ADDED_BY_US:
            session.execute(text(statement), params)
        added_by_us = int(session.scalar(text("SELECT count(*) FROM v_added")) or 0)
    forgotten = forget_missing(session, connector_id, _MISSING, params, started) if missing else 0
    if forgotten:
        log.warning(
            "connector %s: %d members the ledger counted are not on Klaviyo list %s; "
            "the next sync adds them again",
            connector_id,
            forgotten,
            connector.list_id,
        )
    mark_suppressed(session, connector_id, _SUPPRESSED, params)
    # The read-back names each member's profile: a later removal of it is then one DELETE.
    learn_profile_ids(session, connector_id, "SELECT user_id, profile_id FROM v_pairs", params)
    adopted = (
        _UNLEDGERED
        if adopt_extra and unledgered
        else "SELECT profile_id FROM v_added"
        if adopt_ours and added_by_us
        else None
    )
    if adopted is not None:
        adopt_foreign(
            session,
            connector_id,
            f"SELECT s.profile_id FROM v_snap s WHERE s.profile_id IN ({adopted})",
            params,
            FOREIGN_PREFIX,
        )
    return Comparison(
        connector_id=connector_id,
        verify_id=verify_id,
        in_list=in_list,
        expected=expected,
        missing=missing,
        extra=extra,
        foreign=unledgered - added_by_us,
        suppressed=suppressed,
        forgotten=forgotten,
        added_by_us=added_by_us,
    )


def release_foreign(session: Session, connector_id: str) -> int:
    """A held removal of foreign profiles must not hold every later sync: forget them again."""
    return ledger_release_foreign(session, connector_id, FOREIGN_PREFIX)


def discard(connector_id: str, verify_id: str) -> None:
    with session_scope() as s:
        s.execute(
            text("DELETE FROM list_snapshots WHERE connector_id = :c AND verify_id = :v"),
            {"c": connector_id, "v": verify_id},
        )


def verify_list(
    connector_id: str,
    access: KlaviyoAccess,
    settings: Settings,
    *,
    adopt_extra: bool = False,
    adopt_ours: bool = False,
    sleep: Sleep = time.sleep,
) -> Comparison:
    """Read the list back and compare it with the segment (the ledger is corrected; with
    ``adopt_ours`` the extra profiles we added, with ``adopt_extra`` foreign ones too, are
    entered for removal). The snapshot is discarded; its lease lets the beat's purge delete it
    should this process die first (sync/retention.py)."""
    verify_id = str(uuid.uuid4())
    with one_read_back(connector_id, access, settings), snapshot_lease(verify_id) as lease:
        _, started = read_list(connector_id, access, settings, sleep=sleep, verify_id=verify_id)
        try:
            if not lease.held():  # the purge may have taken the snapshot: compare nothing
                raise VerifyError("the database connection was lost while the list was read")
            with session_scope() as s:
                return compare(
                    s,
                    connector_id,
                    verify_id,
                    started,
                    adopt_extra=adopt_extra,
                    adopt_ours=adopt_ours,
                )
        finally:
            discard(connector_id, verify_id)


def start_verified_run(session: Session, connector_id: str, result: Comparison) -> StartOutcome:
    """Open a run with trigger ``verify`` that carries what the read-back found; the normal
    planning then adds the members the ledger forgot (and removes adopted foreign profiles)."""
    outcome = start_run(session, connector_id, trigger=Trigger.VERIFY)
    if outcome.reason == StartReason.STARTED and outcome.run_id:
        record_on_run(session, outcome.run_id, result)
    return outcome


# The beat's read-back skips connectors nobody syncs now.
_NOT_VERIFIED = (ConnectorStatus.INACTIVE, ConnectorStatus.PAUSED)


def verifiable_connectors(session: Session) -> list[str]:
    """Active connectors (and those in error: a repair may be what they need) with no run going:
    a list read while a run writes to it would count its members as missing. A paused one is
    left alone until it is resumed (its catch-up run follows)."""
    return list(
        session.scalars(
            select(Connector.id)
            .where(Connector.status.not_in(_NOT_VERIFIED))
            .where(
                ~select(SyncRun.id)
                .where(SyncRun.connector_id == Connector.id, SyncRun.status == RunStatus.RUNNING)
                .exists()
            )
            .order_by(Connector.id)
        )
    )


def is_running(session: Session, connector_id: str) -> bool:
    return (
        session.scalar(
            select(SyncRun.id).where(
                SyncRun.connector_id == connector_id, SyncRun.status == RunStatus.RUNNING
            )
        )
        is not None
    )


def verify_for_beat(
    connector_id: str, access: KlaviyoAccess, settings: Settings, *, sleep: Sleep = time.sleep
) -> Comparison | None:
    """The beat's verification of one connector: None when there is nothing to do (gone,
    inactive or paused, a run writing to the list) or the list could not be read (logged, retried at the
    next tick). Extra profiles are reported, never removed from here."""
    with session_scope() as s:
        connector = s.get(Connector, connector_id)
        if connector is None or connector.status in _NOT_VERIFIED or is_running(s, connector_id):
            return None
        list_id = connector.list_id
    try:
        result = verify_list(connector_id, access, settings, sleep=sleep)
    except ReadBackBusy:  # a redelivered task, or a CLI verify: that one does the work
        log.info("connector %s: a read-back of its list is already running: skipped", connector_id)
        return None
    except VerifyError as exc:
        log.warning("connector %s: list not verified: %s", connector_id, exc)
        return None
    except KlaviyoError as exc:
        log.warning(
            "connector %s: list not verified: %s", connector_id, describe_for_person(exc, list_id)
        )
        return None
    if result.extra:
        log.warning(
            "connector %s: %d profiles on Klaviyo list %s are in no segment (%d never added by "
            "this connector); `segops-sync connectors verify %s --repair` removes those it "
            "added, with --remove-extra the others too",
            connector_id,
            result.extra,
            list_id,
            result.foreign,
            connector_id,
        )
    return result


def record_on_run(session: Session, run_id: str, result: Comparison) -> None:
    """What a verification found, on the run it started (shown in the run history)."""
    run = session.get_one(SyncRun, run_id)
    run.verify_in_list = result.in_list
    run.verify_expected = result.expected
    run.verify_missing = result.missing
    run.verify_extra = result.extra
    run.suppressed = result.suppressed
