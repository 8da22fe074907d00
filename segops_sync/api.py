"""``segops-sync api``: the HTTP API of docs/contract.md#http-api (bearer token, JSON, 422 on bad input)."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from segops_sync.config import Settings, get_settings
from segops_sync.connectors import create_connector, delete_connector, update_connector
from segops_sync.db.queries import get_connector, list_connectors, list_runs
from segops_sync.db.session import session_scope
from segops_sync.errors import InputError, UnknownConnector
from segops_sync.shapes import connector_json, run_json
from segops_sync.states import ConnectorStatus, Trigger

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BearerAuth(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self._expected = f"Bearer {token}".encode()

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            return _error(401, "missing or wrong bearer token")
        return await call_next(request)


def _body(raw: bytes, allowed: set[str]) -> dict[str, Any]:
    if len(raw) > MAX_BODY:
        raise InputError("body is too large")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise InputError("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InputError("body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise InputError(f"unknown field(s): {', '.join(sorted(unknown))}")
    for key, value in body.items():
        if key == "traits":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InputError("traits must be a list of strings")
        elif not isinstance(value, str):
            raise InputError(f"{key} must be a string")
    return body


def _guard(handler: Callable[[Request, Settings], Response]) -> Callable[[Request], Response]:
    def run(request: Request) -> Response:
        try:
            return handler(request, get_settings())
        except UnknownConnector as exc:
            return _error(404, str(exc))
        except InputError as exc:
            return _error(422, str(exc))

    return run


def _read(request: Request) -> bytes:
    # Sync handlers run in a worker thread; read the body through the portal-free path.
    import anyio.from_thread

    return anyio.from_thread.run(request.body)


def create(request: Request, settings: Settings) -> Response:
    body = _body(_read(request), {"type", "segment_id", "list_id", "api_key", "traits"})
    for field in ("segment_id", "list_id", "api_key"):
        if field not in body:
            raise InputError(f"{field} is required")
    with session_scope() as s:
        connector, warning = create_connector(
            s,
            settings,
            segment_id=body["segment_id"],
            list_id=body["list_id"],
            api_key=body["api_key"],
            connector_type=body.get("type", "klaviyo"),
            traits=body.get("traits"),
        )
        doc = connector_json(connector)
    # unreachable Klaviyo, or a double opt-in list (consent pre-flight): said, not refused
    headers = (
        {"Warning": "199 - " + json.dumps(warning.splitlines()[0], ensure_ascii=True)}
        if warning
        else None
    )
    return JSONResponse(doc, status_code=201, headers=headers)


def index(request: Request, settings: Settings) -> Response:
    with session_scope() as s:
        return JSONResponse({"connectors": [connector_json(c) for c in list_connectors(s)]})


def show(request: Request, settings: Settings) -> Response:
    with session_scope() as s:
        return JSONResponse(connector_json(get_connector(s, request.path_params["id"])))


def patch(request: Request, settings: Settings) -> Response:
    body = _body(_read(request), {"status", "list_id", "api_key", "traits"})
    with session_scope() as s:
        connector, _ = update_connector(
            s,
            settings,
            request.path_params["id"],
            list_id=body.get("list_id"),
            api_key=body.get("api_key"),
            status=body.get("status"),
            traits=body.get("traits"),
        )
        return JSONResponse(connector_json(connector))


def resync(request: Request, settings: Settings) -> Response:
    from segops_sync.tasks import trigger_sync

    with session_scope() as s:
        if get_connector(s, request.path_params["id"]).status == ConnectorStatus.INACTIVE:
            raise InputError("connector is inactive: activate it first")
    outcome = trigger_sync(request.path_params["id"], trigger=Trigger.RESYNC)
    return JSONResponse({"run_id": outcome.run_id, "outcome": outcome.reason}, status_code=202)


def runs(request: Request, settings: Settings) -> Response:
    with session_scope() as s:
        return JSONResponse(
            {"runs": [run_json(r) for r in list_runs(s, request.path_params["id"])]}
        )


def rejected(request: Request, settings: Settings) -> Response:
    from segops_sync.sync.rejected import UnknownRun, rejected_members

    connector_id, run_id = request.path_params["id"], request.path_params["run"]
    with session_scope() as s:
        get_connector(s, connector_id)
        try:
            found = rejected_members(s, connector_id, run_id=run_id)
        except UnknownRun as exc:
            return _error(404, str(exc))
        return JSONResponse({"rejected_members": [m.as_json() for m in found]})


def remove(request: Request, settings: Settings) -> Response:
    with session_scope() as s:
        delete_connector(s, request.path_params["id"])
    return Response(status_code=204)


def create_app(token: str) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/connectors", _guard(create), methods=["POST"]),
            Route("/v1/connectors", _guard(index), methods=["GET"]),
            Route("/v1/connectors/{id}", _guard(show), methods=["GET"]),
            Route("/v1/connectors/{id}", _guard(patch), methods=["PATCH"]),
            Route("/v1/connectors/{id}", _guard(remove), methods=["DELETE"]),
            Route("/v1/connectors/{id}/resync", _guard(resync), methods=["POST"]),
            Route("/v1/connectors/{id}/runs", _guard(runs), methods=["GET"]),
            Route("/v1/connectors/{id}/runs/{run}/rejected", _guard(rejected), methods=["GET"]),
        ]
    )
    app.add_middleware(BearerAuth, token=token)
    return app


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(
        create_app(get_settings().require_api_token()),
        host="127.0.0.1",
        port=port,
        log_level="info",
    )
