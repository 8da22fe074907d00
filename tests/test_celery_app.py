"""Every task has a stable name and an explicit route (the addons-server habit)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from segops_sync.celery import (
    AHEAD_PRIORITY,
    BATCH_PRIORITY,
    KLAVIYO_QUEUE,
    SEGOPS_QUEUE,
    SMALL_QUEUE,
    TASK_ROUTES,
    app,
    configure,
)
from segops_sync.config import Settings


def _our_tasks() -> set[str]:
    app.loader.import_default_modules()
    return {name for name in app.tasks if not name.startswith("celery.")}


def test_every_task_is_named_and_routed() -> None:
    tasks = _our_tasks()
    assert tasks, "no tasks registered"
    assert all(name.startswith("segops.") for name in tasks)
    assert tasks == set(TASK_ROUTES), (
        f"unrouted: {tasks - set(TASK_ROUTES)}, stale: {set(TASK_ROUTES) - tasks}"
    )


def test_every_route_uses_a_declared_queue_and_every_queue_is_used() -> None:
    declared = {q.name for q in app.conf.task_queues}
    # the small-run lane is no task's route: dispatch() sends a small run's batches there
    used = {route["queue"] for route in TASK_ROUTES.values()} | {SMALL_QUEUE}
    assert used <= declared
    assert declared == used == {SEGOPS_QUEUE, KLAVIYO_QUEUE, SMALL_QUEUE}


def test_external_messages_arrive_on_the_segops_queue() -> None:
    for name in ("segops.recompute_finished", "segops.context_identified", "segops.sync_connector"):
        assert TASK_ROUTES[name]["queue"] == "segops"


def test_reliability_settings() -> None:
    conf = app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.result_expires >= 2 * 24 * 3600
    for name in ("segops.add_batch", "segops.remove_batch"):
        assert app.tasks[name].rate_limit, "the per-worker local ceiling is set"


def test_every_task_takes_its_retry_and_result_options_from_one_base() -> None:
    from segops_sync.tasks import INFRA_ERRORS, BatchTask, SegopsTask

    chord_header = {"segops.add_batch", "segops.remove_batch"}
    for name in _our_tasks():
        task = app.tasks[name]
        assert isinstance(task, SegopsTask), f"{name} does not use SegopsTask"
        assert tuple(task.autoretry_for) == INFRA_ERRORS, name
        assert task.retry_backoff is True and task.retry_jitter is True, name
        assert task.retry_backoff_max == 60, name
        assert task.acks_late is True, name
        assert task.trail is False, name
        # A chord counts its header's results; nothing else's result is read.
        assert task.ignore_result is (name not in chord_header), name
        assert isinstance(task, BatchTask) is (name in chord_header), name
        # Periodic work gives up after a few tries (the next tick comes); the rest never drops.
        periodic = {
            "segops.sweep_runs",
            "segops.verify_connectors",
            "segops.verify_connector",
            "segops.purge_expired",
        }
        assert task.max_retries == (3 if name in periodic else None), name


def test_the_beat_verifies_connectors_at_the_configured_interval() -> None:
    from segops_sync.config import Settings

    entry = app.conf.beat_schedule["verify-connectors"]
    assert entry["task"] == "segops.verify_connectors"
    assert entry["schedule"] == Settings().verify_interval
    assert Settings.model_fields["verify_interval"].default == 6 * 3600  # docs/design.md: why
    # the long list read waits among the Klaviyo work, never before a recompute message
    assert TASK_ROUTES["segops.verify_connector"]["queue"] == KLAVIYO_QUEUE


REMOVE, ADD = "segops.remove_batch", "segops.add_batch"


@pytest.mark.parametrize(
    ("removals_go_first", "expected"),
    [
        # a churn's floor is its lookups when they outlast a minute: they go first
        (True, [(REMOVE, 7), (REMOVE, 8), (ADD, 1), (ADD, 2), (ADD, 3)]),
        # otherwise the first bulk jobs run at Klaviyo while the lookups go out
        (False, [(ADD, 1), (REMOVE, 7), (ADD, 2), (REMOVE, 8), (ADD, 3)]),
    ],
)
def test_the_chord_queues_the_runs_longer_path_first(
    removals_go_first: bool, expected: list[tuple[str, int]]
) -> None:
    from segops_sync.tasks import chord_header

    header = chord_header([7, 8], [1, 2, 3], removals_go_first=removals_go_first)
    assert [(sig.task, *sig.args) for sig in header] == expected
    assert all(sig.immutable for sig in header)  # a batch never receives another's result


def _dispatched_queues(
    monkeypatch: pytest.MonkeyPatch, remove_ids: list[int], add_ids: list[int]
) -> list[str | None]:
    """The queue each batch of dispatch()'s chord is sent to (None: the task's route)."""
    import segops_sync.tasks as tasks

    published: list[list[Any]] = []

    def fake_chord(header: list[Any]) -> Any:
        published.append(header)
        return lambda body: None

    monkeypatch.setattr(tasks, "chord", fake_chord)
    tasks.dispatch("run-1", remove_ids, add_ids)
    (header,) = published
    assert len(header) == len(remove_ids) + len(add_ids)
    return [sig.options.get("queue") for sig in header]


def test_a_small_runs_batches_go_to_the_small_run_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5-out/5-in change (one add batch, one removal batch) never queues behind a big run."""
    assert _dispatched_queues(monkeypatch, [7], [1]) == [SMALL_QUEUE, SMALL_QUEUE]


def test_a_big_runs_batches_go_to_the_klaviyo_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    queues = _dispatched_queues(monkeypatch, [], list(range(1, 101)))  # a 1M first sync
    assert set(queues) == {None}  # the route: KLAVIYO_QUEUE
    assert TASK_ROUTES["segops.add_batch"]["queue"] == KLAVIYO_QUEUE


@pytest.mark.parametrize("lane", [SMALL_QUEUE, KLAVIYO_QUEUE])
def test_a_batch_retry_stays_in_the_lane_it_was_taken_from(lane: str) -> None:
    """Both brokers deliver with the default exchange and the queue as routing key."""
    from segops_sync.tasks import _lane, add_batch

    add_batch.push_request(
        args=[5], kwargs={}, delivery_info={"exchange": "", "routing_key": lane, "priority": 6}
    )
    try:
        retry = add_batch.signature_from_request(queue=_lane(add_batch), countdown=1)
    finally:
        add_batch.pop_request()
    assert retry.options["queue"] == lane


def test_a_pool_process_freezes_what_it_inherited() -> None:
    """A batch's 10,000 rows should not make the collector walk Celery's and SQLAlchemy's
    objects: a new pool process moves them out of its sight."""
    import gc

    from celery import signals

    gc.unfreeze()
    try:
        signals.worker_process_init.send(sender=None)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_a_batch_that_lost_its_slot_race_is_taken_before_the_batches_not_started(
    redis_server_url: str,
) -> None:
    """On Redis, Klaviyo batches wait at BATCH_PRIORITY; the retry of a batch that built its job
    body and lost the race for a submission slot goes at AHEAD_PRIORITY, and a worker takes it
    before the batches that have not started (a retry otherwise joins the queue's tail)."""
    prefix = f"segops-prio-{uuid.uuid4().hex[:8]}:"
    probe = Celery("segops_prio_probe")
    configure(
        probe,
        Settings(
            broker_url=f"{redis_server_url}/0",
            result_backend=f"{redis_server_url}/1",
            redis_key_prefix=prefix,
        ),
    )
    try:
        for batch_id in (1, 2, 3):  # a chord's header: the batches, in order
            probe.send_task("segops.add_batch", args=[batch_id])
        probe.send_task("segops.add_batch", args=[4], priority=AHEAD_PRIORITY)  # the retry
        taken = []
        with probe.connection_for_read() as conn:
            channel = conn.default_channel
            while (message := channel.basic_get(KLAVIYO_QUEUE, no_ack=True)) is not None:
                taken.append(message.headers["argsrepr"])
        assert taken == ["[4]", "[1]", "[2]", "[3]"]
        assert TASK_ROUTES["segops.add_batch"]["priority"] == BATCH_PRIORITY > AHEAD_PRIORITY
    finally:
        client = redis.Redis.from_url(f"{redis_server_url}/0")
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        probe.close()


def test_a_dead_workers_task_is_resent_to_the_queue_it_was_taken_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from segops_sync import celery as celery_module
    from segops_sync.sync.fleet.liveness import Held

    sent: list[dict[str, object]] = []
    monkeypatch.setattr(
        celery_module.app, "send_task", lambda name, **options: sent.append(options)
    )
    celery_module._resend(Held("t1", "n1", "segops.add_batch", [7], {}, SMALL_QUEUE))
    celery_module._resend(Held("t2", "n1", "segops.add_batch", [8], {}))  # none recorded
    celery_module._resend(Held("t3", "n1", "segops.add_batch", [9], {}, "not.ours"))
    assert [o.get("queue") for o in sent] == [SMALL_QUEUE, None, None]
