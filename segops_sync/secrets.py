"""Klaviyo API keys at rest: Fernet-encrypted with ``SEGOPS_SECRET_KEY``.

Showing or masking a key is ``segops_sync.klaviyo.redact``'s job, not this module's.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

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


def encrypt_api_key(api_key: str, secret_key: str) -> bytes:
    return _fernet(secret_key).encrypt(api_key.encode())


def decrypt_api_key(token: bytes, secret_key: str) -> str:
    try:
        return _fernet(secret_key).decrypt(bytes(token)).decode()
    except InvalidToken:
        raise ConfigError(
            "SEGOPS_SECRET_KEY does not decrypt the stored API keys (was it changed?)"
        ) from None
