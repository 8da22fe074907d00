"""The Celery app: ``celery -A segops_sync worker`` finds it here.

Queues: ``segops`` takes the external messages (docs/contract.md#messages) and the orchestration tasks;
``segops.klaviyo`` takes the rate-limited Klaviyo batches, so a backlog of batches never delays
a recompute message. A worker started with no flags consumes both.
"""

from __future__ import annotations

import sys
from typing import Any

import redis
from celery import Celery, signals
from kombu import Queue

from segops_sync.config import ConfigError, Settings, get_settings

SEGOPS_QUEUE = "segops"
KLAVIYO_QUEUE = "segops.klaviyo"

# Every task has an explicit route (tests/test_celery_app.py enforces it).
TASK_ROUTES: dict[str, dict[str, str]] = {
    "segops.recompute_finished": {"queue": SEGOPS_QUEUE},
    "segops.context_identified": {"queue": SEGOPS_QUEUE},
    "segops.sync_connector": {"queue": SEGOPS_QUEUE},
    "segops.plan_run": {"queue": SEGOPS_QUEUE},
    "segops.finish_run": {"queue": SEGOPS_QUEUE},
    "segops.run_failed": {"queue": SEGOPS_QUEUE},
    "segops.sweep_runs": {"queue": SEGOPS_QUEUE},
    "segops.verify_connectors": {"queue": SEGOPS_QUEUE},
    # a list read back takes minutes at 1M members: it waits among the Klaviyo work, never
    # in front of a recompute message
    "segops.verify_connector": {"queue": KLAVIYO_QUEUE},
    "segops.add_batch": {"queue": KLAVIYO_QUEUE},
    "segops.remove_batch": {"queue": KLAVIYO_QUEUE},
}


def configure(app: Celery, settings: Settings) -> None:
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.redis_key_prefix:
        transport["global_keyprefix"] = settings.redis_key_prefix
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=SEGOPS_QUEUE,
        task_queues=[Queue(SEGOPS_QUEUE), Queue(KLAVIYO_QUEUE)],
        task_create_missing_queues=False,
        task_routes=TASK_ROUTES,
        # A crash re-delivers the task; every task is idempotent on PostgreSQL state.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Chord counters live as long as results: far longer than any backlog.
        result_expires=7 * 24 * 3600,
        result_extended=True,  # task args are ids only, so this copies nothing sensitive
        broker_transport_options=transport,
        result_backend_transport_options=dict(transport),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        beat_schedule={
            "sweep-stuck-runs": {"task": "segops.sweep_runs", "schedule": settings.sweep_interval},
            "verify-connectors": {
                "task": "segops.verify_connectors",
                "schedule": settings.verify_interval,
            },
        },
    )


def _survive_broker_loss() -> None:
    """Keep the worker alive when Redis goes away while it holds unacked messages.

    Celery 5.7 / kombu 5.7: after a broker connection loss the consumer collects the
    connection (which detaches its transport) and then closes it again. When the first close
    failed because Redis refused connections, the second one gives the unacked messages back
    through the detached transport, meets ``AttributeError`` (it has no broker address any
    more), and Celery takes that as unrecoverable: the worker exits and needs a manual restart
    (issue 5, ``test_redis_restarted_mid_sync``). A detached channel cannot reach Redis: say so
    with the connection error Celery already recovers from. Messages it could not give back stay
    in Redis's unacked set and are redelivered after the visibility timeout.
    """
    from kombu.transport import redis as kombu_redis

    original = getattr(kombu_redis.Channel, "_connparams", None)
    if original is None or getattr(original, "__segops_guard__", False):
        return  # a kombu without this private hook: nothing to guard

    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("the broker connection is already closed")
        return original(self, *args, **kwargs)

    setattr(_connparams, "__segops_guard__", True)  # noqa: B010
    kombu_redis.Channel._connparams = _connparams


_survive_broker_loss()
app = Celery("segops_sync", include=["segops_sync.tasks"])
try:
    configure(app, get_settings())
except ConfigError as exc:  # pragma: no cover - reported when the worker starts
    _config_error: str | None = str(exc)
else:
    _config_error = None


@signals.worker_init.connect
def _check_settings(**_: Any) -> None:
    """A missing or malformed setting stops the worker at start, in one line."""
    try:
        if _config_error:
            raise ConfigError(_config_error)
        settings = get_settings()
        settings.require_database_url()
        settings.require_secret_key()
    except ConfigError as exc:
        print(f"segops-sync: {exc}", file=sys.stderr)
        sys.exit(2)


@signals.worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # Pooled sockets must not be shared with the parent after fork.
    from segops_sync.db.session import reset_engine

    reset_engine()
