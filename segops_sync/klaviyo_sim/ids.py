"""Identifiers shaped like Klaviyo's: 26-char ULIDs, 6-char list/account ids, pk_ keys."""

from __future__ import annotations

import hashlib
import random
import string
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Two digits per 10 bits: a million profiles get a million ids in a benchmark's first sync.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_ALNUM = string.ascii_letters + string.digits


class UlidFactory:
    """Monotonic ULIDs: ids sort in creation order, which the simulator's cursors rely on."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._last_ms = -1
        self._last_rand = 0
        self._prefix = ""

    def new(self) -> str:
        ms = int(time.time() * 1000)
        if ms <= self._last_ms:
            rand = self._last_rand + 1
            if rand & 1023:  # only the last two digits moved: ids made within one millisecond
                self._last_rand = rand
                return self._prefix + _PAIRS[rand & 1023]
        else:
            self._last_ms = ms
            rand = self._rng.getrandbits(79)  # headroom so increments never overflow 80 bits
        # the time part and all but the last two digits, shared until the low 10 bits wrap
        self._prefix = _digits(self._last_ms, 5) + _digits(rand >> 10, 7)
        self._last_rand = rand
        return self._prefix + _PAIRS[rand & 1023]


def encode_ulid(value: int) -> str:
    """The 26 Crockford base32 digits of a 128-bit value (130 bits, the top two zero): the
    time part (the top 50 bits) and the random part (80 bits) fall on a digit boundary."""
    return _digits(value >> 80, 5) + _digits(value & (2**80 - 1), 8)


def _digits(value: int, pairs: int) -> str:
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(10 * pairs - 10, -1, -10)])


def short_id(rng: random.Random, length: int = 6) -> str:
    return "".join(rng.choice(_ALNUM) for _ in range(length))


def private_key(rng: random.Random) -> str:
    return "pk_" + "".join(rng.choice(_ALNUM) for _ in range(34))


def key_fingerprint(key: str) -> str:
    """What the simulator records instead of a key: a short, non-reversible hash."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]
