from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from segops_sync.config import ConfigError
from segops_sync.klaviyo.redact import redact_key, scrub
from segops_sync.secrets import decrypt_api_key, encrypt_api_key

KEY = "pk_live0123456789abcdef0123456789ab12"


def test_round_trip_and_ciphertext_hides_the_key() -> None:
    token = encrypt_api_key(KEY, "a passphrase of some length")
    assert KEY.encode() not in token
    assert decrypt_api_key(token, "a passphrase of some length") == KEY


def test_a_ready_fernet_key_is_accepted() -> None:
    secret = Fernet.generate_key().decode()
    assert decrypt_api_key(encrypt_api_key(KEY, secret), secret) == KEY


def test_wrong_secret_is_a_config_error_without_the_key() -> None:
    token = encrypt_api_key(KEY, "first secret: long enough")
    with pytest.raises(ConfigError) as info:
        decrypt_api_key(token, "another secret: long enough")
    assert KEY not in str(info.value)


def test_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="SEGOPS_SECRET_KEY"):
        encrypt_api_key(KEY, "short")


def test_redaction_keeps_only_the_tail() -> None:
    assert redact_key(KEY) == "pk_…ab12"
    assert KEY not in scrub(f"error with {KEY} inside", KEY)
