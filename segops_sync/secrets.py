"""Klaviyo API keys at rest: Fernet-encrypted with ``SEGOPS_SECRET_KEY``.

``SEGOPS_SECRET_KEY`` is a key ring, ``new,old,…``: the first key encrypts, every key decrypts,
so a key can be rotated without a moment where some process cannot read the stored keys.
Showing or masking a key is ``segops_sync.klaviyo.redact``'s job, not this module's.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from segops_sync.config import ConfigError

MIN_SECRET_LENGTH = 16


def _fernet(secret_key: str) -> Fernet:
    if len(secret_key) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"SEGOPS_SECRET_KEY is malformed: use at least {MIN_SECRET_LENGTH} characters"
        )
    try:
        return Fernet(secret_key.encode())  # a ready Fernet key is used as it is
    except ValueError:
        # Any other passphrase: derive a 32-byte key from it.
        digest = hashlib.sha256(b"segops-sync/api-keys\0" + secret_key.encode()).digest()
        return Fernet(base64.urlsafe_b64encode(digest))


@lru_cache(maxsize=8)
def _ring(secret_keys: str) -> tuple[Fernet, ...]:
    """The keys of ``SEGOPS_SECRET_KEY`` in order; a comma separates them (none may hold one)."""
    keys = [k.strip() for k in secret_keys.split(",") if k.strip()]
    if not keys:
        raise ConfigError("SEGOPS_SECRET_KEY is malformed: it holds no key")
    return tuple(_fernet(k) for k in keys)


def key_ring(secret_keys: str) -> MultiFernet:
    return MultiFernet(_ring(secret_keys))


def encrypt_api_key(api_key: str, secret_key: str) -> bytes:
    return key_ring(secret_key).encrypt(api_key.encode())


def decrypt_api_key(token: bytes, secret_key: str) -> str:
    try:
        return key_ring(secret_key).decrypt(bytes(token)).decode()
    except InvalidToken:
        raise ConfigError(
            "SEGOPS_SECRET_KEY does not decrypt the stored API keys (was it changed?)"
        ) from None


def encrypted_with_first(token: bytes, secret_key: str) -> bool:
    """Whether the first key of the ring already decrypts ``token`` (nothing to rotate)."""
    try:
        _ring(secret_key)[0].decrypt(bytes(token))
    except InvalidToken:
        return False
    return True


def reencrypt_api_key(token: bytes, secret_key: str) -> bytes:
    """The same API key, encrypted again with the first key of the ring."""
    try:
        return key_ring(secret_key).rotate(bytes(token))
    except InvalidToken:
        raise ConfigError(
            "SEGOPS_SECRET_KEY does not decrypt a stored API key: no key in it was used to store it"
        ) from None
