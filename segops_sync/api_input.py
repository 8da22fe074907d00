"""What the HTTP API accepts: body fields, size limit, and what PostgreSQL can hold.

The field tables drive both the check of each request body and the request schemas of the
OpenAPI document, so the two cannot drift. The fields' rules (a list id's pattern, a segment
id's length, the settable statuses) come from shapes.py, whose rules the connector service
checks; this module only checks JSON types and storability.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from segops_sync.errors import InputError, UnknownConnector
from segops_sync.shapes import (
    API_KEY_PATTERN,
    CONNECTOR_TYPES,
    LIST_ID_PATTERN,
    SEGMENT_ID_MAX,
    SETTABLE_STATUSES,
)

MAX_BODY = 64 * 1024
# Arrays and objects inside one another: a body needs 2 (an object holding the traits array).
# Without a limit, 64 KiB of "[" reaches Python's recursion limit in json.loads: a 500.
MAX_DEPTH = 8


class BodyTooLarge(Exception):
    """A request body over MAX_BODY: answered 413, and never read past the limit."""

    def __init__(self) -> None:
        super().__init__(f"body is too large: at most {MAX_BODY} bytes")


@dataclass(frozen=True)
class BodyField:
    """One field of a JSON body: its JSON Schema (``string``, or ``array`` of strings)."""

    schema: dict[str, Any]
    required: bool = False


LIST_ID = BodyField(
    {
        "type": "string",
        "pattern": LIST_ID_PATTERN,
        "description": "Klaviyo list id: exactly 6 letters or digits, case-sensitive",
    }
)
API_KEY = BodyField(
    {
        "type": "string",
        "pattern": API_KEY_PATTERN,
        "writeOnly": True,
        "description": "Klaviyo private API key; stored encrypted, never shown again",
    }
)

CREATE_FIELDS: dict[str, BodyField] = {
    "type": BodyField(
        {"type": "string", "enum": list(CONNECTOR_TYPES), "default": CONNECTOR_TYPES[0]}
    ),
    "segment_id": BodyField(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": SEGMENT_ID_MAX,
            "description": "SegOps segment id",
        },
        required=True,
    ),
    "list_id": BodyField(LIST_ID.schema, required=True),
    "api_key": BodyField(API_KEY.schema, required=True),
    "traits": BodyField(
        {
            "type": "array",
            "items": {"type": "string"},
            "description": "context_identified traits sent to Klaviyo; [] = none but the email",
        }
    ),
}
PATCH_FIELDS: dict[str, BodyField] = {
    "status": BodyField({"type": "string", "enum": list(SETTABLE_STATUSES)}),
    "list_id": LIST_ID,
    "api_key": API_KEY,
    "traits": CREATE_FIELDS["traits"],
}

# POST /v1/klaviyo/lists: the key travels in the body, never in a URL that logs would keep
KLAVIYO_KEY_FIELDS: dict[str, BodyField] = {
    "api_key": BodyField(
        {
            "type": "string",
            "pattern": API_KEY_PATTERN,
            "writeOnly": True,
            "description": "Klaviyo private API key; used for this call only, never stored",
        },
        required=True,
    ),
    "counts": BodyField(
        {
            "type": "boolean",
            "default": True,
            "description": (
                "count the members of the first lists (one call a second in Klaviyo's XS "
                "tier); false answers at once, every profile_count null"
            ),
        }
    ),
}

RESYNC_FIELDS: dict[str, BodyField] = {
    "allow_mass_removal": BodyField(
        {
            "type": "boolean",
            "default": False,
            "description": (
                "approve a held mass removal for the next sync, in the API token's name "
                "(recorded; valid for an hour)"
            ),
        }
    ),
}


def body_schema(fields: dict[str, BodyField]) -> dict[str, Any]:
    """The JSON Schema of a body made of these fields (for the OpenAPI document)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: f.schema for name, f in fields.items()},
        "additionalProperties": False,
    }
    required = [name for name, f in fields.items() if f.required]
    if required:
        schema["required"] = required
    return schema


def storable(text: str) -> bool:
    """PostgreSQL TEXT holds neither NUL nor an unpaired surrogate (JSON's "\\ud800")."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string")
    if not storable(value):
        raise InputError(
            f"{name} holds a character that cannot be stored (a NUL byte or an unpaired surrogate)"
        )
    return value


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def nests_too_deeply(raw: bytes) -> bool:
    """Whether arrays and objects nest more than MAX_DEPTH deep in a JSON text, found without
    parsing it (brackets inside strings do not count)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False  # too few to nest deeper: skip the scan
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
        depth += 1 if bracket.group() in (b"[", b"{") else -1
        if depth > MAX_DEPTH:
            return True
    return False


def parse_body(raw: bytes, fields: dict[str, BodyField]) -> dict[str, Any]:
    """Check a JSON body against the field table: types, required, unknown, storable.

    No message echoes a value (or an unknown field's name): what was pasted into the wrong
    field may be a Klaviyo key."""
    if nests_too_deeply(raw):
        raise InputError(f"body nests arrays and objects too deeply: at most {MAX_DEPTH} levels")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise InputError("body is not valid JSON") from None
    except RecursionError:  # a backstop: nests_too_deeply refuses such bodies first
        raise InputError("body nests arrays and objects too deeply") from None
    if not isinstance(body, dict):
        raise InputError("body must be a JSON object")
    unknown = set(body) - set(fields)
    if unknown:
        raise InputError(f"{len(unknown)} unknown field(s): the fields are {', '.join(fields)}")
    for name, spec in fields.items():
        if name not in body:
            if spec.required:
                raise InputError(f"{name} is required")
            continue
        value = body[name]
        if spec.schema.get("type") == "boolean":
            if not isinstance(value, bool):
                raise InputError(f"{name} must be true or false")
        elif spec.schema.get("type") == "array":
            if not isinstance(value, list):
                raise InputError(f"{name} must be a list of strings")
            for item in value:
                _check_string(f"each of {name}", item)
        else:
            _check_string(name, value)
    return body


def path_id(request: Request) -> str:
    """The ``{id}`` of the path; one the database cannot hold names no connector (404)."""
    value = str(request.path_params["id"])
    if not storable(value):
        raise UnknownConnector(value)
    return value


async def read_body(request: Request) -> bytes:
    """The request body, refused (413) as soon as it passes MAX_BODY."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise BodyTooLarge()
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > MAX_BODY:
            raise BodyTooLarge()
    return bytes(received)
