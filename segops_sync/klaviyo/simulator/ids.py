"""Identifiers shaped like Klaviyo's: 26-char ULIDs, 6-char list/account ids, pk_ keys."""

from __future__ import annotations

import hashlib
import random
import string
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ALNUM = string.ascii_letters + string.digits


class UlidFactory:
    """Monotonic ULIDs: ids sort in creation order, which the simulator's cursors rely on."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._last_ms = -1
        self._last_rand = 0

    def new(self) -> str:
        ms = int(time.time() * 1000)
        if ms <= self._last_ms:
            ms, rand = self._last_ms, self._last_rand + 1
        else:
            rand = self._rng.getrandbits(79)  # headroom so increments never overflow 80 bits
        self._last_ms, self._last_rand = ms, rand
        value = (ms << 80) | rand
        return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def short_id(rng: random.Random, length: int = 6) -> str:
    return "".join(rng.choice(_ALNUM) for _ in range(length))


def private_key(rng: random.Random) -> str:
    return "pk_" + "".join(rng.choice(_ALNUM) for _ in range(34))


def key_fingerprint(key: str) -> str:
    """What the simulator records instead of a key: a short, non-reversible hash."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]
