"""A Redis lock for work that may outlast any fixed TTL: its holder refreshes it while it lives.

A read-back of a 4M-member list takes longer than Redis's visibility timeout (an hour), after
which the broker hands the same task to a second worker. A lock with a fixed TTL would have to
outlive the longest read-back, and then a holder that died would block the next one as long.
Here the TTL is short and a thread of the holder extends it every third of it (as the worker
heartbeats do): a live holder never loses the lock, a dead one's lock expires within ``ttl``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

log = logging.getLogger(__name__)

# Extend, or release, only a lock that still holds our token.
_EXTEND_IF_OURS = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_DEL_IF_OURS = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# A dead holder's lock is free again this long after its last refresh (seconds).
DEFAULT_TTL = 60.0


def refresh_once(r: redis.Redis, key: str, token: str, *, ttl: float = DEFAULT_TTL) -> bool:
    """One tick of a holder's refresh: ``key`` lives a full ``ttl`` again if ``token`` still
    holds it. False once the lock is lost (the holder stops refreshing); a Redis error is not
    a loss, the next tick tries again."""
    try:
        if r.eval(_EXTEND_IF_OURS, 1, key, token, max(1, int(ttl * 1000))):
            return True
    except redis.RedisError as exc:  # Redis away for a moment: try at the next tick
        log.warning("lock %s not refreshed: %s", key, exc)
        return True
    log.warning("lock %s was lost (Redis lost its data?)", key)
    return False


@contextmanager
def refreshed_lock(r: redis.Redis, key: str, *, ttl: float = DEFAULT_TTL) -> Iterator[bool]:
    """Yields whether this caller holds ``key``; while it does, the lock is refreshed every
    ``ttl / 3`` seconds and released at the end. A caller that got False did not take it."""
    token = uuid.uuid4().hex
    ttl_ms = max(1, int(ttl * 1000))
    if not r.set(key, token, nx=True, px=ttl_ms):
        yield False
        return
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(ttl / 3):
            if not refresh_once(r, key, token, ttl=ttl):
                return

    keeper = threading.Thread(target=refresh, name="segops-lock", daemon=True)
    keeper.start()
    try:
        yield True
    finally:
        stop.set()
        keeper.join(timeout=5)
        try:
            r.eval(_DEL_IF_OURS, 1, key, token)
        except redis.RedisError as exc:  # it expires on its own within ttl
            log.warning("lock %s not released: %s", key, exc)
