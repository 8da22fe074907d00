"""SEGOPS_SECRET_KEY as a key ring: the first key encrypts, every key decrypts."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from segops_sync.config import ConfigError
from segops_sync.secrets import (
    decrypt_api_key,
    encrypt_api_key,
    encrypted_with_first,
    reencrypt_api_key,
)

KEY = "pk_live0123456789abcdef0123456789ab12"
OLD = "the old passphrase: long enough"
NEW = Fernet.generate_key().decode()  # a ready Fernet key works in a ring too


def test_the_first_key_encrypts() -> None:
    token = encrypt_api_key(KEY, f"{NEW},{OLD}")
    assert decrypt_api_key(token, NEW) == KEY
    with pytest.raises(ConfigError):
        decrypt_api_key(token, OLD)


def test_every_key_decrypts() -> None:
    under_old = encrypt_api_key(KEY, OLD)
    under_new = encrypt_api_key(KEY, NEW)
    for ring in (f"{NEW},{OLD}", f"{OLD},{NEW}", f" {NEW} , {OLD} ,"):
        assert decrypt_api_key(under_old, ring) == KEY
        assert decrypt_api_key(under_new, ring) == KEY


def test_no_key_of_the_ring_decrypts_names_the_variable() -> None:
    token = encrypt_api_key(KEY, OLD)
    with pytest.raises(ConfigError, match="SEGOPS_SECRET_KEY") as info:
        decrypt_api_key(token, f"{NEW},another passphrase: long")
    assert KEY not in str(info.value)


def test_reencrypt_moves_a_token_to_the_first_key() -> None:
    token = encrypt_api_key(KEY, OLD)
    assert not encrypted_with_first(token, f"{NEW},{OLD}")
    rotated = reencrypt_api_key(token, f"{NEW},{OLD}")
    assert encrypted_with_first(rotated, f"{NEW},{OLD}")
    assert decrypt_api_key(rotated, NEW) == KEY  # the old key can now be dropped
    with pytest.raises(ConfigError, match="SEGOPS_SECRET_KEY"):
        reencrypt_api_key(token, NEW)


@pytest.mark.parametrize("ring", ["", " , ", f"{NEW},short"])
def test_a_malformed_ring_is_refused(ring: str) -> None:
    with pytest.raises(ConfigError, match="SEGOPS_SECRET_KEY is malformed"):
        encrypt_api_key(KEY, ring)
