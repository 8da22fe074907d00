"""The Celery app: ``celery -A segops_sync worker`` finds it here.

Queues: ``segops`` takes the external messages (docs/contract.md#messages) and the orchestration tasks;
``segops.klaviyo`` takes the rate-limited Klaviyo batches, so a backlog of batches never delays
a recompute message; ``segops.klaviyo.small`` takes the batches of small runs (sync/lanes.py),
so a small change never waits behind a big run's batches. A worker started with no flags
consumes all three.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import redis
from celery import Celery, signals
from kombu import Queue

from segops_sync.config import (
    ConfigError,
    Settings,
    check_flower_basic_auth,
    get_settings,
    is_redis_url,
    redis_tls_options,
)
from segops_sync.observability import logging as obs_log
from segops_sync.observability.logging import klaviyo_url_label
from segops_sync.observability.metrics import MetricsNode, process_exited
from segops_sync.sync.fleet import liveness
from segops_sync.sync.retention import PURGE_INTERVAL

log = logging.getLogger("segops_sync.celery")

SEGOPS_QUEUE = "segops"
KLAVIYO_QUEUE = "segops.klaviyo"
# The lane of small runs' batches (sync/lanes.py): the batch tasks' route is KLAVIYO_QUEUE,
# dispatch() sends a small run's batches here, and their retries stay here (tasks._run_batch).
SMALL_QUEUE = "segops.klaviyo.small"
KLAVIYO_QUEUES = (KLAVIYO_QUEUE, SMALL_QUEUE)
DECLARED_QUEUES = (SEGOPS_QUEUE, *KLAVIYO_QUEUES)

# Message priorities on the Redis broker, which takes 0 first (kombu keeps a list per step of 0,
# 3, 6, 9). Work for Klaviyo waits at BATCH_PRIORITY; a batch that built its job body and lost
# the race for a submission slot comes back at AHEAD_PRIORITY: at the tail of its queue it would
# wait behind every batch not yet started (7.5 s behind 88 on a 1M first sync) and be submitted
# last, on the run's critical path. Only that batch goes ahead: its jobs' polls and settling
# ahead too would take the CPUs from the bodies being built (a 1M first sync: 22 s, not 18).
# RabbitMQ's queues are not declared as priority queues (x-max-priority cannot be added to an
# existing queue), so there the numbers are ignored.
BATCH_PRIORITY = 6
AHEAD_PRIORITY = 0

# Every task has an explicit route (tests/test_celery_app.py enforces it).
TASK_ROUTES: dict[str, dict[str, str | int]] = {
    "segops.recompute_finished": {"queue": SEGOPS_QUEUE},
    "segops.context_identified": {"queue": SEGOPS_QUEUE},
    # the platform's deletion pipeline sends it to `segops`, as it sends the other messages
    "segops.forget_user": {"queue": SEGOPS_QUEUE},
    "segops.sync_connector": {"queue": SEGOPS_QUEUE},
    "segops.plan_run": {"queue": SEGOPS_QUEUE},
    "segops.finish_run": {"queue": SEGOPS_QUEUE},
    "segops.run_failed": {"queue": SEGOPS_QUEUE},
    "segops.sweep_runs": {"queue": SEGOPS_QUEUE},
    "segops.purge_expired": {"queue": SEGOPS_QUEUE},
    "segops.verify_connectors": {"queue": SEGOPS_QUEUE},
    # a list read back takes minutes at 1M members: it waits among the Klaviyo work, never
    # in front of a recompute message
    "segops.verify_connector": {"queue": KLAVIYO_QUEUE, "priority": BATCH_PRIORITY},
    "segops.deliver_alert": {"queue": SEGOPS_QUEUE},
    "segops.add_batch": {"queue": KLAVIYO_QUEUE, "priority": BATCH_PRIORITY},
    "segops.remove_batch": {"queue": KLAVIYO_QUEUE, "priority": BATCH_PRIORITY},
}


def configure(app: Celery, settings: Settings) -> None:
    # Visibility timeout and key prefix are Redis transport options; RabbitMQ has neither (it
    # gives a dead consumer's messages back at once, and tests isolate by vhost).
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.redis_key_prefix:
        transport["global_keyprefix"] = settings.redis_key_prefix
    broker_transport = transport if settings.broker_is_redis else {}
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        # rediss://: the URL's TLS parameters, certificate checked unless it says otherwise
        broker_use_ssl=redis_tls_options(settings.broker_url, "SEGOPS_BROKER_URL"),
        redis_backend_use_ssl=redis_tls_options(settings.result_backend, "SEGOPS_RESULT_BACKEND"),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=SEGOPS_QUEUE,
        task_queues=[Queue(name) for name in DECLARED_QUEUES],
        task_create_missing_queues=False,
        task_routes=TASK_ROUTES,
        # A crash re-delivers the task; every task is idempotent on PostgreSQL state.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Chord counters live as long as results: far longer than any backlog.
        result_expires=7 * 24 * 3600,
        # Stores a task's args with its result: ids only, except context_identified's, which
        # never stores a result (observability/task_data.py)
        result_extended=True,
        broker_transport_options=broker_transport,
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
            # member details past SEGOPS_RETENTION_DAYS, snapshots of crashed verifications
            "purge-expired-data": {"task": "segops.purge_expired", "schedule": PURGE_INTERVAL},
        },
    )


def _survive_broker_loss() -> None:
    """Keep the worker alive when Redis goes away while it holds unacked messages.

    Celery 5.7 / kombu 5.7: after a broker connection loss the consumer collects the
    connection (which detaches its transport) and then closes it again. When the first close
    failed because Redis refused connections, the second one gives the unacked messages back
    through the detached transport, meets ``AttributeError`` (it has no broker address any
    more), and Celery takes that as unrecoverable: the worker exits and needs a manual restart
    (``test_redis_restarted_mid_sync``). A detached channel cannot reach Redis: say so
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
# MaskingAMQP: every message published from here carries masked argsrepr / kwargsrepr
app = Celery(
    "segops_sync",
    include=["segops_sync.tasks"],
    amqp="segops_sync.observability.task_data:MaskingAMQP",
)
try:
    configure(app, get_settings())
except ConfigError as exc:  # pragma: no cover - reported when the worker starts
    _config_error: str | None = str(exc)
else:
    _config_error = None


@signals.worker_init.connect
def _check_settings(sender: Any = None, **_: Any) -> None:
    """A missing or malformed setting stops the worker at start, in one line."""
    global NODE_ID
    NODE_ID = liveness.new_node_id(str(getattr(sender, "hostname", None) or "worker"))
    try:
        if _config_error:
            raise ConfigError(_config_error)
        settings = get_settings()
        settings.check_secrets()
        settings.require_database_url()
        settings.require_limiter_url()
        settings.require_alert_settings()
        # Refuse now, not at every connector's next sync, when the key ring cannot read them.
        from segops_sync.keys import check_keys_at_start

        warning = check_keys_at_start(settings)
        if warning:
            _say_warning(warning)
    except ConfigError as exc:
        _refuse(str(exc))
    if settings.metrics_port is not None:
        # Before the pool forks: the children inherit the samples directory.
        _metrics_node.prepare()
        try:
            _metrics_node.serve(settings.metrics_port, settings.metrics_host)
        except OSError as exc:
            _metrics_node.close()
            _refuse(
                f"SEGOPS_METRICS_PORT={settings.metrics_port}: cannot serve metrics "
                f"({exc.strerror or exc})"
            )


def _say_warning(message: str) -> None:
    """One warning line at start, before logging is set up; JSON when the logs are JSON."""
    if _json_logs():
        sys.stderr.flush()
        os.write(2, obs_log.json_line(message, level="WARNING", logger="segops_sync"))
    else:
        print(message, file=sys.stderr)


def _refuse(reason: str) -> NoReturn:
    """One line naming the variable, then exit 2; a JSON line when the logs are JSON."""
    if _json_logs():
        sys.stderr.flush()
        os.write(
            2, obs_log.json_line(f"segops-sync: {reason}", level="ERROR", logger="segops_sync")
        )
    else:
        # the real stderr: once beat has set up logging, sys.stderr is a logger that would
        # prefix the line (and Celery's log file, not the terminal, may take it)
        print(f"segops-sync: {reason}", file=sys.__stderr__ or sys.stderr, flush=True)
    sys.exit(2)


# -- observability: metrics of the node, JSON logs, the run of each line ----------------------

_metrics_node = MetricsNode()


def _json_logs() -> bool:
    try:
        return get_settings().log_format == "json"
    except ConfigError:
        return False  # the worker stops at start anyway, naming the variable


# -- beat and Flower refuse to start, like the worker, on a setting they cannot run with ------


def _check_secrets_at_start() -> None:
    """Beat and Flower need no database: only settings that load and secrets that are real."""
    try:
        if _config_error:
            raise ConfigError(_config_error)
        get_settings().check_secrets()
    except ConfigError as exc:
        _refuse(str(exc))


@signals.beat_init.connect
def _check_beat_settings(**_: Any) -> None:
    _check_secrets_at_start()


def _starting_subcommand() -> str | None:
    """The ``celery`` sub-command this process runs, while ``celery -A segops_sync …`` imports
    this module: click picks the sub-command before the ``celery`` group's callback loads the
    app. None when the app is imported any other way (the API, the CLI, a test)."""
    import click

    context = click.get_current_context(silent=True)
    return context.invoked_subcommand if context is not None else None


if _starting_subcommand() == "flower":
    # Flower sends no signal of its own before it serves: this import is its start.
    try:
        check_flower_basic_auth()
    except ConfigError as exc:
        _refuse(str(exc))
    _check_secrets_at_start()


@signals.celeryd_init.connect
def _quiet_banner(instance: Any = None, **_: Any) -> None:
    """JSON logs: every line the worker writes is JSON, so Celery's text banner stays off, and
    its few direct writes to stdout (shutdown notices) become JSON lines."""
    if not _json_logs():
        return
    if instance is not None:
        instance.quiet = True
    # Warnings raised before logging is set up (Celery's own, about running as root, say) would
    # print as text; Celery routes later ones through logging (captureWarnings).
    warnings.showwarning = _warning_as_json
    from celery.apps import worker as celery_worker

    def say(msg: str, f: Any = None) -> None:
        stream = f or sys.__stdout__
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                os.write(stream.fileno(), obs_log.json_line(msg, logger="celery.worker"))

    celery_worker.safe_say = say


def _warning_as_json(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    text = f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})"
    with contextlib.suppress(OSError):
        os.write(2, obs_log.json_line(text, level="WARNING", logger="py.warnings"))


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger | None = None, **_: Any) -> None:
    loggers = [logging.getLogger(), logging.getLogger("celery.task")]
    if logger is not None:
        loggers.append(logger)
    from celery.utils.log import get_multiprocessing_logger

    mp_logger = get_multiprocessing_logger()
    if mp_logger is not None:
        loggers.append(mp_logger)
    obs_log.install(loggers, json_format=_json_logs(), labeler=klaviyo_url_label)


@signals.task_prerun.connect
def _task_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    # A pool process runs one task after another: nothing of the previous one may stick.
    obs_log.clear()
    obs_log.bind(task_id=task_id, task_name=getattr(task, "name", None))


@signals.worker_process_shutdown.connect
def _process_gone(pid: int | None = None, **_: Any) -> None:
    process_exited(pid or os.getpid())


@signals.worker_ready.connect
def _say_metrics(**_: Any) -> None:
    if _metrics_node.port is not None:
        logging.getLogger("segops_sync.observability").info(
            "metrics at :%d/metrics, summed over the pool processes' samples in %s",
            _metrics_node.port,
            _metrics_node.directory,
        )


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    _metrics_node.close()


@signals.worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # Pooled sockets must not be shared with the parent after fork.
    from segops_sync.db.session import reset_engine

    reset_engine()
    # What the pool process inherited (Celery, SQLAlchemy, our modules: ~100,000 objects) lives
    # as long as the process: frozen out of the collector's sight, it is not walked again for
    # every batch's 10,000 rows and profiles (that walk is a third of building a job body:
    # 64 ms with it, 41 without).
    gc.freeze()


# -- liveness: a dead worker's tasks are re-sent within seconds (sync/fleet/liveness.py) --------------

# This worker node; set in the main process before the pool forks, so children inherit it.
NODE_ID = ""
_redis: tuple[int, redis.Redis] | None = None
_liveness: liveness.NodeLiveness | None = None


def node_id() -> str:
    """This worker node's id ("" outside a worker, e.g. a task called in-process)."""
    return NODE_ID


def liveness_redis() -> tuple[redis.Redis, liveness.Keys]:
    """One client per process (rebuilt after fork) on the limiter's Redis."""
    global _redis
    settings = get_settings()
    if _redis is None or _redis[0] != os.getpid():
        client = redis.Redis.from_url(
            settings.require_limiter_url(), socket_timeout=10, socket_connect_timeout=10
        )
        _redis = (os.getpid(), client)
    return _redis[1], liveness.Keys.for_prefix(settings.redis_key_prefix)


def _resend(held: liveness.Held) -> None:
    # Back to the queue it was taken from (a small run's batch stays in its lane); a queue we do
    # not declare, or none recorded, falls back to the task's route.
    queue = held.queue if held.queue in DECLARED_QUEUES else None
    options: dict[str, Any] = {"queue": queue} if queue is not None else {}
    app.send_task(held.name, args=held.args, kwargs=held.kwargs, **options)


def _marker_redis(settings: Settings) -> tuple[list[str], list[redis.Redis]]:
    """Each Redis whose loss loses work, once: the broker's (queued and unacknowledged
    messages), the result backend's (chord counters), the limiter's (heartbeats, held tasks)."""
    roles: dict[str, list[str]] = {}
    for role, url in (
        ("broker", settings.broker_url),
        ("result backend", settings.result_backend),
        ("limiter", settings.limiter_url),
    ):
        if is_redis_url(url):
            roles.setdefault(url, []).append(role)
    names = [" and ".join(r) for r in roles.values()]
    clients = [
        redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10) for url in roles
    ]
    return names, clients


def _redis_data_lost(names: list[str]) -> Callable[[list[int]], None]:
    """Redis lost its data (or this is the fleet's first start): the sweeper's re-dispatch runs
    now for every open run PostgreSQL knows, instead of after ``stuck_after`` (15 minutes)."""

    def resend_open_runs(lost: list[int]) -> None:
        which = ", ".join(names[i] for i in lost)
        log.warning(
            "Redis (%s) has no marker: lost its data or first start; every open run is re-sent",
            which,
        )
        app.send_task("segops.sweep_runs", kwargs={"redis_data_lost": True})

    return resend_open_runs


@signals.worker_ready.connect
def _start_liveness(**_: Any) -> None:
    global _liveness
    settings = get_settings()
    r, keys = liveness_redis()
    names, markers = _marker_redis(settings)
    _liveness = liveness.NodeLiveness(
        r,
        keys,
        NODE_ID,
        _resend,
        ttl=settings.heartbeat_ttl,
        scan_interval=settings.liveness_scan_interval,
        broker_gives_back=not settings.broker_is_redis,
        markers=markers,
        on_data_lost=_redis_data_lost(names),
    )
    _liveness.start()


@signals.worker_shutdown.connect
def _stop_liveness(**_: Any) -> None:
    if _liveness is not None:
        _liveness.stop()


@signals.task_received.connect
def _hold(request: Any = None, **_: Any) -> None:
    if request is None or request.name not in TASK_ROUTES or not NODE_ID:
        return
    try:
        r, keys = liveness_redis()
        delivery = getattr(request, "delivery_info", None) or {}
        queue = delivery.get("routing_key")
        held = liveness.Held(
            request.id,
            NODE_ID,
            request.name,
            list(request.args),
            dict(request.kwargs),
            queue if isinstance(queue, str) else None,
        )
        liveness.hold(r, keys, held)
    except (redis.RedisError, TypeError, ValueError) as exc:
        log.warning("liveness: not recorded %s[%s]: %s", request.name, request.id, exc)


@signals.task_postrun.connect
def _release(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    # A retry keeps the entry: whoever receives the retry's message records it anew.
    if not task_id or state == "RETRY" or not NODE_ID:
        return
    try:
        r, keys = liveness_redis()
        liveness.release(r, keys, task_id)
    except redis.RedisError as exc:
        log.warning("liveness: not released %s: %s", task_id, exc)
