"""Errors a person or a script caused: each says, in one line, what is wrong.

The faces (CLI, API) turn them into exit 2 or HTTP 422/404; nothing below them prints.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from a person or a script: one line that says what is wrong."""


class UnknownConnector(InputError):
    def __init__(self, connector_id: str) -> None:
        super().__init__(f"unknown connector id {connector_id!r}")
