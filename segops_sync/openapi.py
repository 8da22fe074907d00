"""The API's OpenAPI 3 document, generated from the routes.

Each endpoint's docstring carries its own operation in YAML (after ``---``), Starlette's
SchemaGenerator collects them, and this module adds what every operation shares: the bearer
security, the JSON error answers (401, 429, 404 for ``{id}`` paths, 413/422 for bodies), the
``{id}`` parameter, and the component schemas: the request ones built from api_input's
field tables, the Connector and Run ones from the field tables of shapes.py that make their JSON.
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.routing import BaseRoute
from starlette.schemas import SchemaGenerator

from segops_sync.api_input import (
    CREATE_FIELDS,
    KLAVIYO_KEY_FIELDS,
    MAX_BODY,
    PATCH_FIELDS,
    RESYNC_FIELDS,
    body_schema,
)
from segops_sync.shapes import (
    CONNECTOR_FIELDS,
    KLAVIYO_LIST_FIELDS,
    MEMBER_TRACE_FIELDS,
    RUN_FIELDS,
    shape_schema,
)
from segops_sync.states import StartReason

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "what is wrong, in one line"}},
    "required": ["error"],
}
RESYNC = {
    "type": "object",
    "properties": {
        "run_id": {"type": "string", "nullable": True},
        "outcome": {"type": "string", "enum": [r.value for r in StartReason]},
    },
    "required": ["run_id", "outcome"],
}
CONNECTOR = shape_schema(CONNECTOR_FIELDS)
KLAVIYO_LIST = shape_schema(KLAVIYO_LIST_FIELDS)
RUN = shape_schema(RUN_FIELDS)
MEMBER_TRACE = shape_schema(MEMBER_TRACE_FIELDS)
REJECTED_MEMBER = {
    "type": "object",
    "properties": {
        "run_id": {"type": "string"},
        "run_started_at": {"type": "string", "format": "date-time"},
        "user_id": {"type": "string"},
        "email": {"type": "string", "nullable": True},
        "external_id": {"type": "string", "nullable": True},
        "reason": {"type": "string", "nullable": True, "description": "Klaviyo's reason"},
        "retry": {
            "type": "string",
            "nullable": True,
            "enum": ["waiting", "due", None],
            "description": "waiting: until a context_identified event changes the member's "
            "data; due: the next run sends it again; null: accepted since, or left the segment",
        },
    },
    "required": ["run_id", "run_started_at", "user_id", "email", "external_id", "reason", "retry"],
}


def _error_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _base_schema() -> dict[str, Any]:
    try:
        release = version("segops-sync")
    except PackageNotFoundError:  # running from a source tree
        release = "0"
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "segops-sync",
            "version": release,
            "description": "Connectors that mirror SegOps segments into Klaviyo lists.",
        },
        "security": [{"bearer": []}],
        "paths": {},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": ERROR,
                "Connector": CONNECTOR,
                "Run": RUN,
                "Resync": RESYNC,
                "RejectedMember": REJECTED_MEMBER,
                "MemberTrace": MEMBER_TRACE,
                "NewConnector": body_schema(CREATE_FIELDS),
                "ConnectorChange": body_schema(PATCH_FIELDS),
                "ResyncRequest": body_schema(RESYNC_FIELDS),
                "KlaviyoKey": body_schema(KLAVIYO_KEY_FIELDS),
                "KlaviyoList": KLAVIYO_LIST,
            },
            "responses": {
                "Unauthorized": _error_response(
                    "missing or wrong bearer token",
                    {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
                ),
                "TooManySignIns": _error_response(
                    "too many failed sign-ins from this client address: every request of it "
                    "waits until Retry-After has passed",
                    {"Retry-After": {"schema": {"type": "integer"}, "required": True}},
                ),
                "NotFound": _error_response("unknown connector"),
                "Invalid": _error_response("the input is refused; the message says why"),
                "TooLarge": _error_response(f"the body is over {MAX_BODY} bytes"),
                "KlaviyoUnavailable": _error_response(
                    "Klaviyo did not answer (network, 5xx, its rate limit): try again later"
                ),
                "Error": _error_response("any other error"),
            },
        },
    }


ID_PARAMETER = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "connector id",
}


class ApiSchema(SchemaGenerator):
    def __init__(self) -> None:
        super().__init__(_base_schema())

    def get_schema(self, routes: list[BaseRoute]) -> dict[str, Any]:
        # The base is shared between calls: work on a copy.
        self.base_schema = _base_schema()
        schema = super().get_schema(routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                _complete(path, operation)
        return copy.deepcopy(schema)


def _complete(path: str, operation: dict[str, Any]) -> None:
    responses = {str(code): answer for code, answer in operation.get("responses", {}).items()}
    shared = {"401": "Unauthorized", "429": "TooManySignIns", "default": "Error"}
    if "{id}" in path:
        operation.setdefault("parameters", []).insert(0, ID_PARAMETER)
        shared["404"] = "NotFound"
    if "requestBody" in operation:
        shared.update({"413": "TooLarge", "422": "Invalid"})
    for code, name in shared.items():
        responses.setdefault(code, {"$ref": f"#/components/responses/{name}"})
    operation["responses"] = responses
