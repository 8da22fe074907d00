"""Thin Celery tasks: check the message, load ids, call ``sync/``, record, publish after commit.

Messages carry ids, never keys or member lists. Expected failures come back as results, so
the chord body always runs; unexpected ones reach the body's errback. Every task takes its
retry and result options from :class:`SegopsTask` (``tests/test_celery_app.py`` checks them
all).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from typing import Any

import redis
from celery import Signature, Task, chord
from celery.exceptions import Reject
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from segops_sync.celery import (
    AHEAD_PRIORITY,
    KLAVIYO_QUEUE,
    KLAVIYO_QUEUES,
    SMALL_QUEUE,
    app,
    liveness_redis,
    node_id,
)
from segops_sync.config import ConfigError, get_settings
from segops_sync.db.models import Connector, SegmentMember, SyncBatch, SyncRun
from segops_sync.db.session import session_scope
from segops_sync.errors import UnknownConnector
from segops_sync.observability import logging as obs_log
from segops_sync.observability.run_log import run_ended, run_started
from segops_sync.states import CloseOutcome, ConnectorStatus, PlanStatus, StartReason, Trigger
from segops_sync.sync import rejected, retry
from segops_sync.sync.alerts import deliver, lost_alerts, record_alert
from segops_sync.sync.batch_step import Finished, Later
from segops_sync.sync.batches import run_batch
from segops_sync.sync.costs import removals_first
from segops_sync.sync.fleet import liveness
from segops_sync.sync.fleet.access import KlaviyoAccess
from segops_sync.sync.forget import (
    FORGOTTEN_FOR,
    RUN_WAIT,
    BadUserId,
    ForgetSource,
    MemberInFlight,
    check_user_id,
    deferral,
    forget_member,
    forgotten_lately,
    member_in_flight,
)
from segops_sync.sync.inputs.identity import BadIdentity, record_identity
from segops_sync.sync.lanes import small_run
from segops_sync.sync.planner import StartOutcome, plan_run, start_run
from segops_sync.sync.recovery import fail_crashing_batch, run_ready_to_close
from segops_sync.sync.retention import purge_expired
from segops_sync.sync.runs import (
    RunClosed,
    closed_summary,
    fail_run,
    finish_run,
    refresh_statistics,
)
from segops_sync.sync.sweeper import StuckAction, find_open_runs, find_stuck_runs
from segops_sync.sync.verify import Comparison

log = logging.getLogger("segops_sync.tasks")

# Infrastructure hiccups (PostgreSQL or Redis away for a while) are retried, never fatal.
INFRA_ERRORS = (OperationalError, redis.ConnectionError, redis.TimeoutError)
MAX_COUNTDOWN = retry.MAX_DELAY
MAX_ID_LENGTH = 255
# What closing a run reports on: the call that closed it (or held it), never a repeat.
CLOSED_BY_THIS_CALL = (
    CloseOutcome.SUCCEEDED,
    CloseOutcome.FAILED,
    CloseOutcome.HELD,
    CloseOutcome.CANCELLED,  # paused: sync/pause.py
)


class SegopsTask(Task):  # type: ignore[misc]
    """The retry and result options of every task, in one place.

    Infrastructure errors are retried with capped, jittered exponential backoff, without end:
    a database or Redis outage delays work, it never drops it. Results are ignored except
    where a chord counts them (the batch tasks).
    """

    autoretry_for = INFRA_ERRORS
    retry_backoff = True
    retry_backoff_max = retry.INFRA_BACKOFF_MAX
    retry_jitter = True
    max_retries = None
    acks_late = True  # a crash re-delivers the task; every task is idempotent
    ignore_result = True
    trail = False  # no child results kept on the parent: the chord reads none of them
    # events, Flower, `celery inspect` and the result backend see masked arguments only
    Request = "segops_sync.observability.task_data:MaskingRequest"


class BatchTask(SegopsTask):
    """Chord header tasks: their (tiny) results count toward the chord."""

    ignore_result = False


class Malformed(ValueError):
    pass


def _text_field(kwargs: dict[str, Any], name: str) -> str:
    value = kwargs.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise Malformed(f"{name} must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    return value


def _drop(task: str, reason: str) -> None:
    log.error("dropped malformed %s message: %s", task, reason)


_access: tuple[int, KlaviyoAccess] | None = None


def klaviyo_access() -> KlaviyoAccess:
    """One limiter connection pool per process (rebuilt after fork)."""
    global _access
    if _access is None or _access[0] != os.getpid():
        _access = (os.getpid(), KlaviyoAccess(get_settings()))
    return _access[1]


# -- the external messages (docs/contract.md#messages) -------------------------------


@app.task(base=SegopsTask, name="segops.recompute_finished")
def recompute_finished(*args: Any, **kwargs: Any) -> None:
    try:
        if args:
            raise Malformed("arguments must be keyword arguments segment_id and recompute_id")
        segment_id = _text_field(kwargs, "segment_id")
        recompute_id = _text_field(kwargs, "recompute_id")
    except Malformed as exc:
        _drop("segops.recompute_finished", str(exc))
        return
    with session_scope() as s:
        connector_ids = list(
            s.scalars(
                select(Connector.id).where(
                    Connector.segment_id == segment_id,
                    Connector.status != ConnectorStatus.INACTIVE,
                )
            )
        )
        known = (
            connector_ids
            or s.scalar(select(Connector.id).where(Connector.segment_id == segment_id).limit(1))
            or s.scalar(
                select(SegmentMember.user_id).where(SegmentMember.segment_id == segment_id).limit(1)
            )
        )
    if not known:
        _drop("segops.recompute_finished", f"unknown segment {segment_id!r}")
        return
    for connector_id in connector_ids:
        with obs_log.bound(connector_id=connector_id):
            trigger_sync(connector_id, trigger=Trigger.RECOMPUTE, recompute_id=recompute_id)


@app.task(base=SegopsTask, name="segops.context_identified")
def context_identified(*args: Any, **kwargs: Any) -> None:
    try:
        if args:
            raise Malformed("arguments must be keyword arguments user_id and traits")
        user_id = _text_field(kwargs, "user_id")
        traits = kwargs.get("traits")
        if not isinstance(traits, dict):
            raise Malformed("traits must be an object")
        email = traits.get("email")
        if email is not None and not isinstance(email, str):
            raise Malformed("traits.email must be a string")
        with session_scope() as s:
            if forgotten_lately(s, klaviyo_access().redis, get_settings(), user_id):
                log.warning(
                    "dropped a segops.context_identified message of a member forgotten within "
                    "the last %d hours (sent before the forget, delivered after it)",
                    FORGOTTEN_FOR // 3600,
                )
                return
            # every trait is kept; connectors choose the ones they send (sync/inputs/traits.py)
            if record_identity(s, user_id, email, traits):
                rejected.data_changed(s, user_id)  # members rejected for their data: retried
    except (Malformed, BadIdentity) as exc:
        _drop("segops.context_identified", str(exc))


@app.task(base=SegopsTask, name="segops.sync_connector")
def sync_connector(*args: Any, **kwargs: Any) -> None:
    """Manual re-sync: ``celery -A segops_sync call segops.sync_connector --args='["<id>"]'``."""
    connector_id = args[0] if len(args) == 1 else kwargs.get("connector_id")
    if not isinstance(connector_id, str) or not connector_id:
        _drop("segops.sync_connector", "expected args [connector_id]")
        return
    try:
        trigger_sync(connector_id, trigger=Trigger.RESYNC)
    except UnknownConnector as exc:
        _drop("segops.sync_connector", str(exc))
        return
    if "allow_mass_removal" in kwargs:
        # A message can ask for a sync, never approve a held mass removal: a person does, with
        # `connectors resync ID --allow-mass-removal`, in PostgreSQL (sync/approvals.py).
        log.warning(
            "segops.sync_connector: allow_mass_removal is ignored, the sync keeps the "
            "mass-removal guard (a message cannot approve a mass removal: "
            "`segops-sync connectors resync %s --allow-mass-removal` does)",
            connector_id,
        )


@app.task(base=SegopsTask, bind=True, name="segops.forget_user")
def forget_user(self: Task, *args: Any, **kwargs: Any) -> None:
    """The platform's deletion pipeline: forget one member everywhere (sync/forget.py). Its
    arguments are member data: masked wherever Celery shows them, its result never stored, and
    nothing here logs them.

    While a running sync's batch has sent the member and awaits Klaviyo's answer, the message
    comes back later (2 s, doubling up to 30 s; 23 times, 600 s of countdowns, at most), having
    kept nothing (sync/forget.py, step 4): waiting inside the task would hold the pool slot
    that batch's own steps need. (Infrastructure retries count as deferrals: a bound, not a
    clock.) If the message cannot be sent again, the forget goes ahead here and waits."""
    try:
        user_id, klaviyo_delete = _forget_arguments(args, kwargs)
        user_id = check_user_id(user_id)
    except (Malformed, BadUserId) as exc:
        _drop("segops.forget_user", str(exc))
        return
    waited, countdown = deferral(self.request.retries)
    defer = waited < RUN_WAIT  # past it, the purge goes ahead and waits no more
    try:
        if defer and member_in_flight(user_id):  # the cheap check, without locks
            raise MemberInFlight
        _forget_from_message(user_id, klaviyo_delete, defer=defer, run_wait=0.0, waited=waited)
        return
    except MemberInFlight:
        if not self.request.retries:
            log.info(
                "forget deferred: a running sync has sent the member and awaits Klaviyo's "
                "answer; asked again later, for %.0fs at most",
                RUN_WAIT,
            )
    try:
        raise self.retry(countdown=countdown)
    except Reject:
        # Celery could not publish the retry and would drop this message: no trace of the
        # erasure request would be left. Forget now, waiting here as the command does.
        log.warning("forget: its deferral could not be sent; forgetting now, waiting here")
    _forget_from_message(
        user_id, klaviyo_delete, defer=False, run_wait=max(0.0, RUN_WAIT - waited), waited=waited
    )


def _forget_from_message(
    user_id: str, klaviyo_delete: bool, *, defer: bool, run_wait: float, waited: float
) -> None:
    outcome = forget_member(
        user_id,
        source=ForgetSource.MESSAGE,
        klaviyo_delete=klaviyo_delete,
        settings=get_settings(),
        access=klaviyo_access(),
        defer_in_flight=defer,
        run_wait=run_wait,
        waited=waited,
    )
    log.info(
        "forget %d: removed from %d Klaviyo lists, %d Klaviyo deletions requested",
        outcome.record_id,
        outcome.lists_removed,
        outcome.klaviyo_deletions,
    )
    for problem in outcome.problems:
        log.warning("forget %d: %s", outcome.record_id, problem)


def _forget_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """(user_id, klaviyo_delete) from ``(user_id, klaviyo_delete=False)``, given by position or
    by name; the user id is checked by check_user_id."""
    names = ("user_id", "klaviyo_delete")
    unknown = set(kwargs) - set(names)
    if len(args) > len(names) or unknown or any(n in kwargs for n in names[: len(args)]):
        raise Malformed("arguments must be user_id and, optionally, klaviyo_delete")
    given = dict(zip(names, args, strict=False)) | kwargs
    if "user_id" not in given:
        raise Malformed("user_id is missing")
    klaviyo_delete = given.get("klaviyo_delete", False)
    if not isinstance(klaviyo_delete, bool):
        raise Malformed("klaviyo_delete must be true or false")
    return given["user_id"], klaviyo_delete


def trigger_sync(
    connector_id: str,
    *,
    trigger: Trigger,
    recompute_id: str | None = None,
) -> StartOutcome:
    """Open a run (or coalesce into the running one), then plan it after commit."""
    obs_log.bind(connector_id=connector_id)
    with session_scope() as s:
        outcome = start_run(s, connector_id, trigger=trigger, recompute_id=recompute_id)
    log.info(
        "connector %s: %s trigger -> %s",
        connector_id,
        trigger,
        outcome.reason,
        extra={"run_id": outcome.run_id} if outcome.run_id else None,
    )
    if outcome.reason == StartReason.STARTED and outcome.run_id:
        plan_run_task.delay(outcome.run_id)
    return outcome


# -- orchestration -----------------------------------------------------------------------


@app.task(base=SegopsTask, name="segops.plan_run")
def plan_run_task(run_id: str) -> None:
    _bind_run(run_id)
    settings = get_settings()
    closed: RunClosed | None = None
    alert: int | None = None
    with session_scope() as s:
        plan = plan_run(s, run_id, settings)
        if plan.status == PlanStatus.HELD:
            closed = closed_summary(s, run_id)
            alert = record_alert(s, run_id, settings)
    if plan.planned_now and plan.connector_id:
        run_started(
            connector_id=plan.connector_id,
            run_id=run_id,
            trigger=plan.trigger or "?",
            to_add=plan.adds,
            to_remove=plan.removes,
        )
    if closed is not None:
        _report_closed(closed, alert)
    if plan.status == PlanStatus.EMPTY:
        finish_run_task.delay(run_id)
    elif plan.status == PlanStatus.DISPATCH:
        dispatch(run_id, plan.remove_batch_ids, plan.add_batch_ids)


def dispatch(run_id: str, remove_ids: list[int], add_ids: list[int]) -> None:
    """Publish the chord; safe to repeat (batches are idempotent, finishing is too).

    The planner and the sweeper's re-dispatch both come here, so a run's open batches take the
    small-run lane by the same rule (sync/lanes.py) whoever sends them."""
    body = finish_run_task.si(run_id).on_error(run_failed.si(run_id))
    first = removals_first(len(remove_ids), get_settings().limiter_headroom)
    small = small_run(len(add_ids), len(remove_ids))
    chord(chord_header(remove_ids, add_ids, removals_go_first=first, small=small))(body)


def chord_header(
    remove_ids: list[int], add_ids: list[int], *, removals_go_first: bool, small: bool = False
) -> list[Signature]:
    """The order the batches are queued in: the run's longer path first (sync/costs.py).

    Removals first when their lookups outlast a minute (a 1M churn: 73 s -> 68 s for a 63 s
    floor); a removal the limiter holds back goes back to the queue with a countdown, so the
    adds start as soon as the minute's lookups are spent. Otherwise adds and removals alternate
    and the first bulk jobs run at Klaviyo while the lookups go out (a 100k churn's floor is one
    job). A small run's batches go to the small-run lane, never behind a big run's."""
    adds = [add_batch.si(b) for b in add_ids]
    removes = [remove_batch.si(b) for b in remove_ids]
    if removals_go_first:
        header = removes + adds
    else:
        pairs = itertools.zip_longest(adds, removes)
        header = [task for pair in pairs for task in pair if task is not None]
    if small:
        header = [sig.set(queue=SMALL_QUEUE) for sig in header]
    return header


@app.task(base=SegopsTask, name="segops.finish_run")
def finish_run_task(run_id: str) -> None:
    _bind_run(run_id)
    with session_scope() as s:
        closed = finish_run(s, run_id)
        alert = record_alert(s, run_id, get_settings()) if closed.closed_now else None
    _report_closed(closed, alert)
    _follow_up(closed)
    if closed.closed_now:  # after the run is recorded: its end is not delayed by this
        with session_scope() as s:
            analyzed = refresh_statistics(s, run_id)
        if analyzed:
            log.info("statistics refreshed after the run: %s", ", ".join(analyzed))


@app.task(base=SegopsTask, name="segops.run_failed")
def run_failed(run_id: str) -> None:
    """Errback of the chord body: something unexpected broke the run."""
    _bind_run(run_id)
    with session_scope() as s:
        closed = fail_run(
            s, run_id, "the sync stopped on an internal error; it is retried at the next sync"
        )
        alert = record_alert(s, run_id, get_settings()) if closed.closed_now else None
    _report_closed(closed, alert)
    _follow_up(closed)


def _bind_batch(batch_id: int) -> None:
    with session_scope() as s:
        run_id = s.scalar(select(SyncBatch.run_id).where(SyncBatch.id == batch_id))
    if run_id is not None:
        _bind_run(run_id)


def _bind_run(run_id: str) -> None:
    """Tag this task's log lines with the run and its connector."""
    with session_scope() as s:
        connector_id = s.scalar(select(SyncRun.connector_id).where(SyncRun.id == run_id))
    obs_log.bind(run_id=run_id, connector_id=connector_id)


def _report_closed(closed: RunClosed, alert: int | None) -> None:
    """After commit: the run's end line and metrics (once: only the call that closed it), then
    its alert (only when this call recorded it)."""
    if closed.connector_id is not None and closed.status in CLOSED_BY_THIS_CALL:
        run_ended(
            connector_id=closed.connector_id,
            run_id=closed.run_id,
            status=closed.status,
            seconds=closed.seconds,
            added=closed.added,
            removed=closed.removed,
            rejected=closed.rejected,
            error=closed.error,
        )
    if alert is not None:
        deliver_alert.delay(alert)


def _follow_up(closed: RunClosed) -> None:
    if (
        closed.next_run is not None
        and closed.next_run.reason == StartReason.STARTED
        and closed.next_run.run_id
    ):
        plan_run_task.delay(closed.next_run.run_id)


def _run_batch(task: Task, batch_id: Any) -> dict[str, Any]:
    if not isinstance(batch_id, int):
        _drop(task.name, "batch id must be an integer")
        return Finished(-1, False).as_result()
    settings = get_settings()
    started = time.monotonic()
    r, keys = liveness_redis()
    holder = liveness.batch_holder(node_id() or "no-worker")
    entry = liveness.enter_batch(
        r, keys, batch_id, holder, worker_lost_budget=settings.worker_lost_budget
    )
    if entry.outcome == "busy":  # another copy of it is running (a re-sent duplicate)
        _bind_batch(batch_id)  # Celery's retry line names the run too
        raise task.retry(countdown=1.0 + random.uniform(0, 1), queue=_lane(task))
    try:
        if entry.outcome == "poisoned":
            log.error("batch %s killed its worker %d times: given up", batch_id, entry.crashes)
            with session_scope() as s:
                fail_crashing_batch(s, batch_id, entry.crashes)
            step: Finished | Later = Finished(batch_id, False)
        else:
            step = run_batch(batch_id, klaviyo_access(), settings)
    finally:
        liveness.leave_batch(r, keys, batch_id, holder)
    # Each step's time and outcome (at -l debug): where a sync's process time goes.
    took = time.monotonic() - started
    if isinstance(step, Finished):
        _close_if_last(batch_id)
        log.debug("batch %s step %.3fs: finished", batch_id, took)
        return step.as_result()
    log.debug(
        "batch %s step %.3fs, again in %.2fs: %s", batch_id, took, step.countdown, step.reason
    )
    countdown = min(step.countdown, MAX_COUNTDOWN)
    if step.ahead:
        raise task.retry(countdown=countdown, priority=AHEAD_PRIORITY, queue=_lane(task))
    raise task.retry(countdown=countdown, queue=_lane(task))


def _lane(task: Task) -> str:
    """The Klaviyo queue this delivery came from: a batch's retries stay in its run's lane.

    Celery's retry copies the delivery's routing key too (both brokers deliver ours through the
    default exchange, the routing key naming the queue); said explicitly so that the lane never
    depends on that copy, and a delivery from anywhere else goes to the batches' route."""
    delivery = task.request.delivery_info or {}
    queue = delivery.get("routing_key")
    return queue if queue in KLAVIYO_QUEUES else KLAVIYO_QUEUE


def _close_if_last(batch_id: int) -> None:
    """A re-sent batch is outside its run's chord: the last open batch closes the run."""
    with session_scope() as s:
        run_id = run_ready_to_close(s, batch_id)
    if run_id is not None:
        finish_run_task.delay(run_id)


def _local_ceiling() -> str | None:
    """Celery's per-worker token bucket: a local ceiling under the fleet-wide limiter."""
    try:
        return get_settings().klaviyo_task_rate_limit
    except ConfigError:
        return None  # the worker refuses to start anyway, naming the variable


@app.task(base=BatchTask, bind=True, name="segops.add_batch", rate_limit=_local_ceiling())
def add_batch(self: Task, batch_id: int) -> dict[str, Any]:
    return _run_batch(self, batch_id)


@app.task(base=BatchTask, bind=True, name="segops.remove_batch", rate_limit=_local_ceiling())
def remove_batch(self: Task, batch_id: int) -> dict[str, Any]:
    return _run_batch(self, batch_id)


# Periodic: the next beat tick comes anyway, so a few retries are enough.
@app.task(base=SegopsTask, name="segops.sweep_runs", max_retries=3)
def sweep_runs(*, redis_data_lost: Any = False) -> None:
    """Beat: finish or re-dispatch runs that made no progress for too long (lost chords).

    ``redis_data_lost``: sent by a worker node that found a Redis marker gone (sync/fleet/liveness.py,
    within ``liveness_scan_interval``): every open run is re-sent now, not after
    ``stuck_after``, with the same re-dispatch as a stuck run."""
    settings = get_settings()
    data_lost = redis_data_lost is True
    with session_scope() as s:
        stuck = find_open_runs(s) if data_lost else find_stuck_runs(s, settings.stuck_after)
        lost = lost_alerts(s, settings.stuck_after)
    for delivery_id in lost:
        deliver_alert.delay(delivery_id)
    for item in stuck:
        obs_log.bind(run_id=item.run_id)
        if data_lost:
            log.warning("run %s re-sent after Redis lost its data: %s", item.run_id, item.action)
        else:
            log.warning("run %s made no progress: %s", item.run_id, item.action)
        if item.action == StuckAction.PLAN:
            plan_run_task.delay(item.run_id)
        elif item.action == StuckAction.FINISH:
            finish_run_task.delay(item.run_id)
        else:
            dispatch(item.run_id, item.remove_batch_ids, item.add_batch_ids)


@app.task(base=SegopsTask, name="segops.purge_expired", max_retries=3)
def purge_expired_data() -> None:
    """Beat: delete member details past SEGOPS_RETENTION_DAYS and the list snapshots of crashed
    verifications (sync/retention.py)."""
    purged = purge_expired(get_settings())
    if purged.runs or purged.snapshots:
        log.info(
            "retention: member details of %d runs (%d rows) and %d snapshot rows deleted",
            purged.runs,
            purged.items,
            purged.snapshots,
        )


@app.task(base=SegopsTask, bind=True, name="segops.deliver_alert")
def deliver_alert(self: Task, delivery_id: Any) -> None:
    """POST one signed alert; retried with backoff while the receiver is down (sync.alerts)."""
    if not isinstance(delivery_id, int):
        _drop("segops.deliver_alert", "delivery id must be an integer")
        return
    outcome = deliver(delivery_id, get_settings())
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)


# -- read-back verification ----------------------------------------------------------------


def trigger_verified_sync(connector_id: str, result: Comparison) -> StartOutcome:
    """A run with trigger ``verify`` carrying what the read-back found; planned after commit."""
    from segops_sync.sync.verify import start_verified_run

    with session_scope() as s:
        outcome = start_verified_run(s, connector_id, result)
    log.info("connector %s: verify trigger -> %s", connector_id, outcome.reason)
    if outcome.reason == StartReason.STARTED and outcome.run_id:
        plan_run_task.delay(outcome.run_id)
    return outcome


@app.task(base=SegopsTask, name="segops.verify_connectors", max_retries=3)
def verify_connectors() -> None:
    """Beat: read every connector's list back, one task per connector."""
    from segops_sync.sync.verify import verifiable_connectors

    with session_scope() as s:
        connector_ids = verifiable_connectors(s)
    for connector_id in connector_ids:
        verify_connector.delay(connector_id)


@app.task(base=SegopsTask, name="segops.verify_connector", max_retries=3)
def verify_connector(connector_id: Any) -> None:
    """Read one list back, correct the ledger, and let a ``verify`` run add the missing.

    The read waits for the fleet limiter in the task (a million members is ~15 minutes of
    L-tier pages), which is why it runs on the Klaviyo queue. Extra profiles are reported in
    the run history, never removed from here."""
    from segops_sync.sync.verify import verify_for_beat

    if not isinstance(connector_id, str) or not connector_id:
        _drop("segops.verify_connector", "expected args [connector_id]")
        return
    result = verify_for_beat(connector_id, klaviyo_access(), get_settings())
    if result is not None:
        trigger_verified_sync(connector_id, result)
