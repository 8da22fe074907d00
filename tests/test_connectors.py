"""What connectors create/update say of a refused API key: the truth, and never the key."""

from __future__ import annotations

import pytest

from segops_sync.connectors import validate_api_key
from segops_sync.errors import InputError


def test_an_empty_key_is_required_not_malformed() -> None:
    with pytest.raises(InputError, match=r"^API key is required"):
        validate_api_key("")


def test_a_malformed_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(InputError, match=r"^API key is malformed") as refused:
        validate_api_key("pk_has space")
    assert "has space" not in str(refused.value)
