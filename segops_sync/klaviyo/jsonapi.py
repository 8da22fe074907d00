"""Reading JSON:API documents defensively: Klaviyo's answers are data, never trusted shapes."""

from __future__ import annotations

from typing import Any


def obj(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """``doc[name]`` when it is an object, else an empty one."""
    value = doc.get(name)
    return value if isinstance(value, dict) else {}
