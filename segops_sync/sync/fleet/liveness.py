"""Who holds which task, and which workers are dead: a killed worker costs seconds, not an hour.

Celery on Redis acknowledges a late-ack message only when the task ends; the messages a worker
held when it was killed (running tasks, and the countdown retries it keeps in memory while a
Klaviyo bulk job runs) come back only after the broker's visibility timeout: an hour. So we keep
our own record, after Sidekiq's super_fetch and RQ's abandoned-job registry:

* each worker node (the ``celery worker`` main process) refreshes ``hb:<node>`` in Redis with a
  short TTL from a thread: the key vanishes ``heartbeat_ttl`` seconds after the node died;
* every task message a node receives is recorded in the ``held`` hash (task id -> node, task
  name, arguments) and dropped when the task ends; a task that only retries keeps its entry,
  which the next receiver of its new message overwrites;
* a scan, at ``worker_ready`` and then periodically in every node, one node at a time (a
  Redis lock), claims the entries of nodes whose heartbeat expired and re-sends them. On
  RabbitMQ the broker already gave those messages back when the connection dropped, so the
  scan only forgets the entries.

Redis itself may lose its data (a restart without persistence, a failover to an empty replica):
queued messages on Redis as the broker, chord counters, held records. PostgreSQL still knows every
open run and batch. Each Redis the fleet uses holds a marker key; the scan of every node checks
it, and the node that finds it gone re-sends every open run at once (the sweeper's re-dispatch,
``segops.sweep_runs`` with ``redis_data_lost``), instead of after the sweeper's ``stuck_after``
(15 minutes). The bound is by design: detection within ``liveness_scan_interval`` (5 s), then
the batches' own work.

Re-sent work may meet its original message again (Redis redelivers it after the visibility
timeout): batches are idempotent on PostgreSQL state, and :func:`enter_batch` lets one copy of
a batch run at a time. It also counts deliveries that killed their process: a batch that keeps
killing its worker (a poison pill) is given up after ``worker_lost_budget`` of them.

Plain functions over a Redis client, so fakeredis can test them; ``segops_sync.celery`` wires
them to Celery's signals.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

# Compare-and-delete: a key (or hash field) goes only if it still holds what we read.
_DEL_IF_EQUAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_HDEL_IF_EQUAL = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('hdel', KEYS[1], ARGV[1]) end
return 0
"""
# A batch lock is free, ours, or held by a node whose heartbeat is gone: then it is ours.
_TAKE_LOCK = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
local node = holder and string.match(holder, '^(.*)|[^|]*|[^|]*$')
if not holder or not node or redis.call('exists', ARGV[3] .. node) == 0 then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# How long a batch step may hold its lock; far above a step's runtime (seconds), and a dead
# holder's lock is taken over as soon as its node's heartbeat is gone anyway. (One step can
# outlast it: reading the import errors of jobs Klaviyo refused by the thousand, bulk_add.py;
# a copy of that batch re-sent meanwhile may then step it too, its settle waiting for the
# batch row's lock.)
BATCH_LOCK_TTL = 120.0
# Our messages carry ids; a bigger one is malformed (dropped by its task) and is not recorded.
MAX_HELD_BYTES = 64 * 1024
CRASH_COUNT_TTL = 24 * 3600


@dataclass(frozen=True)
class Keys:
    """Every key lives under the environment's prefix (``SEGOPS_REDIS_KEY_PREFIX``)."""

    prefix: str

    @classmethod
    def for_prefix(cls, redis_key_prefix: str) -> Keys:
        return cls(f"{redis_key_prefix}segops:live:")

    @property
    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}hb:"

    def heartbeat(self, node: str) -> str:
        return f"{self.heartbeat_prefix}{node}"

    @property
    def held(self) -> str:
        return f"{self.prefix}held"

    @property
    def scan_lock(self) -> str:
        return f"{self.prefix}scan"

    def batch_lock(self, batch_id: int) -> str:
        return f"{self.prefix}lock:batch:{batch_id}"

    def crashes(self, batch_id: int) -> str:
        return f"{self.prefix}crashes:batch:{batch_id}"

    @property
    def marker(self) -> str:
        return f"{self.prefix}marker"


@dataclass(frozen=True)
class Held:
    """A task message a node received and has not finished."""

    task_id: str
    node: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    # The queue it came from (a small run's batch waits in the small-run lane, not its route's
    # queue); None when unknown (records written before it was kept): the task's route then.
    queue: str | None = None

    def encode(self) -> str:
        doc = {"node": self.node, "name": self.name, "args": self.args, "kwargs": self.kwargs}
        if self.queue is not None:
            doc["queue"] = self.queue
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, task_id: str, raw: str) -> Held | None:
        try:
            doc = json.loads(raw)
            queue = doc.get("queue")
            return cls(
                task_id,
                str(doc["node"]),
                str(doc["name"]),
                list(doc["args"]),
                dict(doc["kwargs"]),
                str(queue) if queue is not None else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def new_node_id(hostname: str) -> str:
    """Unique per start: a node restarted under the same hostname must not vouch for the
    work its previous, killed, incarnation held."""
    return f"{hostname.replace('|', '_')}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


# -- heartbeats ---------------------------------------------------------------------------------


def beat(r: redis.Redis, keys: Keys, node: str, ttl: float) -> None:
    r.set(keys.heartbeat(node), f"{time.time():.3f}", px=int(ttl * 1000))


def alive(r: redis.Redis, keys: Keys, nodes: list[str]) -> set[str]:
    if not nodes:
        return set()
    pipe = r.pipeline(transaction=False)
    for node in nodes:
        pipe.exists(keys.heartbeat(node))
    return {node for node, found in zip(nodes, pipe.execute(), strict=True) if found}


# -- what each node holds -------------------------------------------------------------------------


def hold(r: redis.Redis, keys: Keys, held: Held) -> bool:
    encoded = held.encode()
    if len(encoded) > MAX_HELD_BYTES:
        return False
    r.hset(keys.held, held.task_id, encoded)
    return True


def release(r: redis.Redis, keys: Keys, task_id: str) -> None:
    r.hdel(keys.held, task_id)


def held_by(r: redis.Redis, keys: Keys) -> list[Held]:
    out: list[Held] = []
    for field, raw in r.hscan_iter(keys.held, count=500):
        item = Held.decode(_text(field), _text(raw))
        if item is not None:
            out.append(item)
    return out


def forget_node(r: redis.Redis, keys: Keys, node: str) -> None:
    """A clean shutdown: the broker got the node's unfinished messages back already."""
    hdel = r.register_script(_HDEL_IF_EQUAL)
    for item in held_by(r, keys):
        if item.node == node:
            hdel(keys=[keys.held], args=[item.task_id, item.encode()])
    r.delete(keys.heartbeat(node))


def claim_orphans(r: redis.Redis, keys: Keys) -> list[Held]:
    """Take the entries of dead nodes out of ``held``: each is claimed by one caller only."""
    entries = held_by(r, keys)
    living = alive(r, keys, sorted({e.node for e in entries}))
    hdel = r.register_script(_HDEL_IF_EQUAL)
    claimed: list[Held] = []
    for item in entries:
        if item.node in living:
            continue
        # Unchanged since we read it: a live node that received the message since keeps it.
        if hdel(keys=[keys.held], args=[item.task_id, item.encode()]):
            claimed.append(item)
    return claimed


@dataclass(frozen=True)
class ScanResult:
    scanned: bool  # False: another node's scan was going
    orphans: list[Held]
    resent: int


def scan(
    r: redis.Redis,
    keys: Keys,
    node: str,
    resend: Callable[[Held], None],
    *,
    broker_gives_back: bool,
    lock_ttl: float = 60.0,
) -> ScanResult:
    """Re-send what dead nodes held (RabbitMQ already did: then only forget it)."""
    token = f"{node}|{uuid.uuid4().hex}"
    if not r.set(keys.scan_lock, token, nx=True, px=int(lock_ttl * 1000)):
        return ScanResult(False, [], 0)
    try:
        orphans = claim_orphans(r, keys)
        resent = 0
        if not broker_gives_back:
            for item in orphans:
                resend(item)
                resent += 1
        return ScanResult(True, orphans, resent)
    finally:
        r.register_script(_DEL_IF_EQUAL)(keys=[keys.scan_lock], args=[token])


# -- Redis lost its data: a marker key that vanished ----------------------------------------------

# While a node re-sends the open runs after a loss, its marker holds this lease (milliseconds):
# the other nodes leave the recovery to it, and a node that dies meanwhile leaves a lease that
# expires, so the next scan of any node tries again.
MARKER_LEASE_MS = 60_000
MARKER_OK = "ok"


def take_lost_markers(clients: Sequence[redis.Redis], keys: Keys, node: str) -> list[int]:
    """Which of these Redis servers lost the marker (a restart without persistence, a failover
    to an empty replica, a flush): for each, the one caller that finds it gone takes it with a
    lease, and must call :func:`confirm_markers` once it recovered (or :func:`drop_markers`)."""
    lease = f"recovering:{node}"
    return [
        index
        for index, client in enumerate(clients)
        if client.set(keys.marker, lease, nx=True, px=MARKER_LEASE_MS)
    ]


def confirm_markers(clients: Sequence[redis.Redis], keys: Keys) -> None:
    """The recovery is under way: the markers stay until Redis loses its data again."""
    for client in clients:
        client.set(keys.marker, MARKER_OK)


def drop_markers(clients: Sequence[redis.Redis], keys: Keys, node: str) -> None:
    """The recovery failed: the next scan (of any node) finds the markers gone again."""
    lease = f"recovering:{node}"
    for client in clients:
        client.register_script(_DEL_IF_EQUAL)(keys=[keys.marker], args=[lease])


# -- one copy of a batch at a time; a poison pill is stopped --------------------------------------


def batch_holder(node: str) -> str:
    """Who runs a batch step: the node, the process (a pool child), and this very call."""
    return f"{node}|{os.getpid()}|{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class BatchEntry:
    outcome: str  # run | busy | poisoned
    crashes: int = 0  # deliveries in a row that killed their process before this one


def enter_batch(
    r: redis.Redis,
    keys: Keys,
    batch_id: int,
    holder: str,
    *,
    worker_lost_budget: int,
    lock_ttl: float = BATCH_LOCK_TTL,
) -> BatchEntry:
    """Take the batch's lock, and count this delivery until :func:`leave_batch` uncounts it.

    A count left behind means a delivery died with its process (SIGKILL, OOM, a segfault):
    the count is the number of such deliveries in a row."""
    lock = keys.batch_lock(batch_id)
    taken = bool(
        r.register_script(_TAKE_LOCK)(
            keys=[lock], args=[holder, int(lock_ttl * 1000), keys.heartbeat_prefix]
        )
    )
    if not taken and _stale_local_holder(r.get(lock), holder):
        # A pool child of this very node died holding it (the node lives on): take it over.
        r.set(lock, holder, px=int(lock_ttl * 1000))
        taken = True
    if not taken:
        return BatchEntry("busy")
    pipe = r.pipeline(transaction=True)
    pipe.incr(keys.crashes(batch_id))
    pipe.expire(keys.crashes(batch_id), CRASH_COUNT_TTL)
    count = int(pipe.execute()[0])
    crashes = count - 1
    if crashes >= worker_lost_budget:
        return BatchEntry("poisoned", crashes)
    return BatchEntry("run", crashes)


def leave_batch(r: redis.Redis, keys: Keys, batch_id: int, holder: str) -> None:
    """The step ended (finished, retried or raised): it did not kill its process."""
    r.delete(keys.crashes(batch_id))
    r.register_script(_DEL_IF_EQUAL)(keys=[keys.batch_lock(batch_id)], args=[holder])


def _stale_local_holder(current: bytes | str | None, me: str) -> bool:
    if current is None:
        return True
    parts = _text(current).rsplit("|", 2)
    if len(parts) != 3 or parts[0] != me.rsplit("|", 2)[0]:
        return False  # another node's: its heartbeat decides (in the lock script)
    try:
        pid = int(parts[1])
    except ValueError:
        return True
    return pid == os.getpid() or not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the thread each worker node runs -------------------------------------------------------------


class NodeLiveness(threading.Thread):
    """Heartbeat every third of the TTL; a scan at start and every ``scan_interval``."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        node: str,
        resend: Callable[[Held], None],
        *,
        ttl: float,
        scan_interval: float,
        broker_gives_back: bool,
        markers: Sequence[redis.Redis] = (),
        on_data_lost: Callable[[list[int]], None] | None = None,
    ) -> None:
        super().__init__(name="segops-liveness", daemon=True)
        self.r, self.keys, self.node, self.resend = r, keys, node, resend
        self.ttl, self.scan_interval = ttl, scan_interval
        self.broker_gives_back = broker_gives_back
        # The Redis servers whose loss loses work (broker, result backend, limiter), and what
        # re-sends the open runs when one lost its data (given the indexes of those that did).
        self.markers, self.on_data_lost = list(markers), on_data_lost
        self.stopping = threading.Event()

    def run(self) -> None:
        next_scan = 0.0
        while not self.stopping.is_set():
            try:
                beat(self.r, self.keys, self.node, self.ttl)
                if time.monotonic() >= next_scan:
                    self.scan_once()
                    self.check_markers()
                    next_scan = time.monotonic() + self.scan_interval
            except redis.RedisError as exc:  # Redis away for a while: keep trying
                log.warning("liveness: %s", exc)
            self.stopping.wait(min(self.ttl / 3, self.scan_interval))

    def scan_once(self) -> ScanResult:
        result = scan(
            self.r, self.keys, self.node, self.resend, broker_gives_back=self.broker_gives_back
        )
        if result.orphans:
            names: dict[str, int] = {}
            for item in result.orphans:
                names[item.name] = names.get(item.name, 0) + 1
            dead = sorted({item.node for item in result.orphans})
            log.warning(
                "dead worker(s) %s left %d task(s) %s: %s",
                ", ".join(dead),
                len(result.orphans),
                names,
                "re-sent" if result.resent else "the broker gave them back",
            )
        return result

    def check_markers(self) -> list[int]:
        """Re-send the open runs when a Redis lost its data: found within one scan interval."""
        if self.on_data_lost is None or not self.markers:
            return []
        lost = take_lost_markers(self.markers, self.keys, self.node)
        if not lost:
            return []
        taken = [self.markers[i] for i in lost]
        try:
            self.on_data_lost(lost)
        except Exception as exc:  # PostgreSQL or the broker away: the next scan tries again
            log.warning("liveness: could not recover from lost Redis data yet: %s", exc)
            drop_markers(taken, self.keys, self.node)
            return []
        confirm_markers(taken, self.keys)
        return lost

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        try:
            forget_node(self.r, self.keys, self.node)
        except redis.RedisError as exc:
            log.warning("liveness: could not say goodbye: %s", exc)
