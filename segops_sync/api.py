"""``segops-sync api``: the HTTP API of docs/contract.md#http-api (bearer token, JSON, 422 on
bad input), its OpenAPI document, and the Activations page.

Every answer that is not a success is JSON ``{"error": ...}``: refused input (422), unknown
connectors and routes (404), methods (405), tokens (401, with ``WWW-Authenticate: Bearer``),
bodies over the limit (413), too many failed sign-ins (429, with ``Retry-After``), and anything
unexpected (500). Every JSON answer carries ``X-Content-Type-Options: nosniff`` and
``Cache-Control: no-store``.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis
import redis.asyncio
from sqlalchemy.exc import DataError
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segops_sync import web
from segops_sync.api_input import (
    CREATE_FIELDS,
    KLAVIYO_KEY_FIELDS,
    PATCH_FIELDS,
    RESYNC_FIELDS,
    BodyTooLarge,
    parse_body,
    path_id,
    read_body,
    storable,
)
from segops_sync.config import Settings, get_settings
from segops_sync.connectors import (
    COUNTED_LISTS,
    KlaviyoUnavailable,
    create_connector,
    delete_connector,
    key_lists,
    update_connector,
)
from segops_sync.db.queries import get_connector, list_connectors, list_runs
from segops_sync.db.session import session_scope
from segops_sync.errors import InputError, UnknownConnector
from segops_sync.observability import logging as obs_log
from segops_sync.openapi import ApiSchema
from segops_sync.shapes import CONNECTOR_TYPES, connector_json, klaviyo_list_json, run_json
from segops_sync.states import ConnectorStatus, Trigger

log = logging.getLogger(__name__)

# Who a mass removal approved over the API is recorded as: the API has one token, shared by
# every caller, so its approvals carry this name (docs/contract.md "Mass-removal approvals").
API_APPROVER = "api-token"


class ErrorResponse(JSONResponse):
    """``{"error": ...}``; ASCII-escaped, so text echoed from any input always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


# An answer holding connectors or an error is never sniffed as something else by a browser,
# nor kept by a browser or proxy cache (it may show a redacted key or a list's state).
JSON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # JSON_HEADERS here too: a 500 is answered outside JsonHeaders (Starlette's outermost layer)
    return ErrorResponse(
        {"error": message}, status_code=status, headers={**JSON_HEADERS, **(headers or {})}
    )


class JsonHeaders:
    """Adds JSON_HEADERS to every JSON answer, successes and errors alike."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").startswith("application/json"):
                    for name, value in JSON_HEADERS.items():
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


# Failed sign-ins one client address may make in a window before every request of that address
# answers 429 until the window ends (the token holder on another address is not slowed down).
SIGN_IN_FAILURES = 10
SIGN_IN_WINDOW = 60


class SignInThrottle:
    """Failed sign-ins per client address, counted in the limiter's Redis.

    Redis rather than this process's memory: the API runs as several replicas (deploy/k8s runs
    two), and a count per process would let a guesser try ten times per replica; the API already
    needs that Redis to start syncs. The first failure opens a window of SIGN_IN_WINDOW seconds
    (the key's TTL); a success does not reset it. When Redis cannot be reached, sign-ins are not
    throttled (a warning is logged): the token of at least 32 characters is the lock, the throttle
    only slows guessing, and refusing every client while Redis is away would be worse.
    """

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = "",
        *,
        limit: int = SIGN_IN_FAILURES,
        window: int = SIGN_IN_WINDOW,
    ) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.limit = limit
        self.window = window
        self._client: redis.asyncio.Redis | None = None

    def _redis(self) -> redis.asyncio.Redis:
        # made on first use, inside the server's event loop
        if self._client is None:
            self._client = redis.asyncio.Redis.from_url(
                self.redis_url, socket_timeout=2, socket_connect_timeout=2
            )
        return self._client

    def _key(self, client: str) -> str:
        return f"{self.key_prefix}segops:api:sign-in-failures:{client}"

    async def locked_for(self, client: str) -> int | None:
        """Seconds until ``client`` may sign in again; None when it may now."""
        try:
            async with self._redis().pipeline(transaction=False) as pipe:
                pipe.get(self._key(client))
                pipe.ttl(self._key(client))
                count, ttl = await pipe.execute()
        except redis.RedisError as exc:
            log.warning("sign-in throttle: Redis unavailable, not throttling: %s", exc)
            return None
        if count is None or int(count) < self.limit:
            return None
        return max(1, int(ttl)) if int(ttl) > 0 else self.window

    async def failed(self, client: str) -> None:
        key = self._key(client)
        try:
            async with self._redis().pipeline(transaction=True) as pipe:
                # the window starts with the first failure; INCR keeps the key's TTL
                pipe.set(key, 0, ex=self.window, nx=True)
                pipe.incr(key)
                await pipe.execute()
        except redis.RedisError as exc:
            log.warning("sign-in throttle: Redis unavailable, failure not counted: %s", exc)


class BearerAuth(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str, throttle: SignInThrottle) -> None:
        super().__init__(app)
        self._expected = f"Bearer {token}".encode()
        self._throttle = throttle

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # The exception to "every route requires the token": the page and its two assets. A
        # browser cannot send a bearer header when it navigates to a page or loads its script,
        # and they hold no data: the page's script calls the guarded routes with the token.
        if request.url.path in web.PUBLIC_PATHS and request.method in ("GET", "HEAD"):
            return await call_next(request)
        # the peer address as uvicorn reports it (behind a proxy: X-Forwarded-For, when the
        # proxy's address is in uvicorn's FORWARDED_ALLOW_IPS)
        client = request.client.host if request.client else "unknown"
        # during a lockout even the right token waits: the guesser may have just found it
        retry_after = await self._throttle.locked_for(client)
        if retry_after is not None:
            return _error(
                429,
                f"too many failed sign-ins from this address: try again in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            await self._throttle.failed(client)
            return _error(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        return await call_next(request)


def _guard(handler: Callable[[Request, Settings], Response]) -> Callable[[Request], Response]:
    @functools.wraps(handler)  # keeps the docstring: it is the operation's OpenAPI text
    def run(request: Request) -> Response:
        try:
            return handler(request, get_settings())
        except UnknownConnector as exc:
            return _error(404, str(exc))
        except InputError as exc:
            return _error(422, str(exc))
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        except DataError:
            # A backstop: api_input refuses what PostgreSQL cannot hold before it gets there.
            log.warning("the database refused a value of %s %s", request.method, request.url.path)
            return _error(422, "a value cannot be stored by the database")

    return run


def _read(request: Request) -> bytes:
    # Sync handlers run in a worker thread; read the body on the event loop.
    import anyio.from_thread

    return anyio.from_thread.run(read_body, request)


def create(request: Request, settings: Settings) -> Response:
    """Create a connector.
    ---
    operationId: createConnector
    summary: Create a connector (inactive), after the same checks as the CLI
    description: >-
      The list id and key are validated, then checked with Klaviyo (one GET /api/lists/{id});
      when Klaviyo cannot be reached the connector is saved unchecked, with a Warning header.
    requestBody:
      required: true
      content:
        application/json:
          schema: {$ref: '#/components/schemas/NewConnector'}
    responses:
      201:
        description: the new connector
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Connector'}
        links:
          getConnector: {operationId: getConnector, parameters: {id: $response.body#/id}}
          updateConnector: {operationId: updateConnector, parameters: {id: $response.body#/id}}
          resyncConnector: {operationId: resyncConnector, parameters: {id: $response.body#/id}}
          listRuns: {operationId: listRuns, parameters: {id: $response.body#/id}}
          deleteConnector: {operationId: deleteConnector, parameters: {id: $response.body#/id}}
    """
    body = parse_body(_read(request), CREATE_FIELDS)
    with session_scope() as s:
        connector, warning = create_connector(
            s,
            settings,
            segment_id=body["segment_id"],
            list_id=body["list_id"],
            api_key=body["api_key"],
            connector_type=body.get("type", CONNECTOR_TYPES[0]),
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
    """List connectors.
    ---
    operationId: listConnectors
    summary: Every connector, oldest first
    responses:
      200:
        description: the connectors
        content:
          application/json:
            schema:
              type: object
              properties:
                connectors:
                  type: array
                  items: {$ref: '#/components/schemas/Connector'}
              required: [connectors]
    """
    with session_scope() as s:
        return JSONResponse({"connectors": [connector_json(c) for c in list_connectors(s)]})


def show(request: Request, settings: Settings) -> Response:
    """Show a connector.
    ---
    operationId: getConnector
    summary: One connector
    responses:
      200:
        description: the connector
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Connector'}
    """
    with session_scope() as s:
        return JSONResponse(connector_json(get_connector(s, path_id(request))))


def patch(request: Request, settings: Settings) -> Response:
    """Change a connector.
    ---
    operationId: updateConnector
    summary: Activate, deactivate, or change the list id or key (checked like creation)
    description: No body, or an empty object, changes nothing and answers the connector.
    requestBody:
      required: false
      content:
        application/json:
          schema: {$ref: '#/components/schemas/ConnectorChange'}
    responses:
      200:
        description: the connector as changed
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Connector'}
    """
    connector_id = path_id(request)
    body = parse_body(_read(request), PATCH_FIELDS)
    with session_scope() as s:
        connector, _ = update_connector(
            s,
            settings,
            connector_id,
            list_id=body.get("list_id"),
            api_key=body.get("api_key"),
            status=body.get("status"),
            traits=body.get("traits"),
        )
        doc = connector_json(connector)
        resync_due = connector.resync_requested and connector.status == ConnectorStatus.ACTIVE
    if resync_due:  # the fix is in: sync now rather than at the next recompute
        from segops_sync.tasks import trigger_sync

        trigger_sync(request.path_params["id"], trigger=Trigger.RESYNC)
    return JSONResponse(doc)


def resync(request: Request, settings: Settings) -> Response:
    """Start a sync now.
    ---
    operationId: resyncConnector
    summary: Start a sync of an active connector (or queue one after the running sync)
    responses:
      202:
        description: the sync is started, coalesced into the running one, or already requested
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Resync'}
      422:
        $ref: '#/components/responses/Invalid'
    requestBody:
      required: false
      content:
        application/json:
          schema: {$ref: '#/components/schemas/ResyncRequest'}
    """
    from segops_sync.sync.approvals import approve_mass_removal
    from segops_sync.sync.pause import refuse_if_paused
    from segops_sync.tasks import trigger_sync

    connector_id = path_id(request)
    body = parse_body(_read(request), RESYNC_FIELDS)
    with session_scope() as s:
        connector = get_connector(s, connector_id)
        if connector.status == ConnectorStatus.INACTIVE:
            raise InputError("connector is inactive: activate it first")
        refuse_if_paused(connector)
        if body.get("allow_mass_removal"):
            # a row the run reads from PostgreSQL, committed before the sync is asked for
            approve_mass_removal(s, connector_id, by=API_APPROVER)
    outcome = trigger_sync(connector_id, trigger=Trigger.RESYNC)
    return JSONResponse({"run_id": outcome.run_id, "outcome": outcome.reason}, status_code=202)


def pause(request: Request, settings: Settings) -> Response:
    """Pause a connector.
    ---
    operationId: pauseConnector
    summary: Stop syncing an active connector (or one in error); its running sync stops
    description: >-
      The connector becomes paused. A running sync stops at its next batch boundary and ends
      cancelled; what Klaviyo confirmed before stays in the ledger. Recomputes and the beat's
      read-back leave a paused connector alone until it is resumed. Pausing a paused connector
      changes nothing; an inactive one is refused (422).
    responses:
      200:
        description: the connector, paused
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Connector'}
      422:
        $ref: '#/components/responses/Invalid'
    """
    from segops_sync.sync.pause import pause_connector

    with session_scope() as s:
        return JSONResponse(connector_json(pause_connector(s, path_id(request)).connector))


def resume(request: Request, settings: Settings) -> Response:
    """Resume a paused connector.
    ---
    operationId: resumeConnector
    summary: Sync a paused connector again, starting one sync (trigger resume) to catch up
    description: >-
      The connector becomes active and a sync with trigger resume starts (after the cancelled
      one, if that is still stopping). A connector that is not paused is refused (422).
    responses:
      200:
        description: the connector, active again
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Connector'}
      422:
        $ref: '#/components/responses/Invalid'
    """
    from segops_sync.sync.pause import resume_connector
    from segops_sync.tasks import trigger_sync

    connector_id = path_id(request)
    with session_scope() as s:
        doc = connector_json(resume_connector(s, connector_id))
    trigger_sync(connector_id, trigger=Trigger.RESUME)
    return JSONResponse(doc)


def runs(request: Request, settings: Settings) -> Response:
    """List a connector's sync runs.
    ---
    operationId: listRuns
    summary: The connector's sync runs, newest first (at most 100)
    responses:
      200:
        description: the runs
        content:
          application/json:
            schema:
              type: object
              properties:
                runs:
                  type: array
                  items: {$ref: '#/components/schemas/Run'}
              required: [runs]
    """
    with session_scope() as s:
        return JSONResponse({"runs": [run_json(r) for r in list_runs(s, path_id(request))]})


def rejected(request: Request, settings: Settings) -> Response:
    """List a run's rejected members.
    ---
    operationId: listRejectedMembers
    summary: Each member Klaviyo rejected in this run, with its reason (at most 10,000)
    parameters:
      - {name: run, in: path, required: true, schema: {type: string}, description: run id}
    responses:
      200:
        description: the rejected members
        content:
          application/json:
            schema:
              type: object
              properties:
                rejected_members:
                  type: array
                  items: {$ref: '#/components/schemas/RejectedMember'}
              required: [rejected_members]
    """
    from segops_sync.sync.rejected import UnknownRun, rejected_members

    connector_id = path_id(request)
    run_id = str(request.path_params["run"])
    with session_scope() as s:
        get_connector(s, connector_id)
        try:
            if not storable(run_id):  # no run has an id the database cannot hold
                raise UnknownRun(connector_id, run_id)
            found = rejected_members(s, connector_id, run_id=run_id)
        except UnknownRun as exc:
            return _error(404, str(exc))
        return JSONResponse({"rejected_members": [m.as_json() for m in found]})


class AnyText(Convertor[str]):
    """The rest of the path, whatever it holds ("/", control characters): the handler judges a
    user id (422), where Starlette's ``path`` would answer a newline with 404 "no such route"."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any_text", AnyText())


def member(request: Request, settings: Settings) -> Response:
    """Trace one member across every connector.
    ---
    operationId: traceMember
    summary: One member across every connector (as `segops-sync members trace USER_ID --json`)
    description: >-
      For each connector whose segment, ledger, rejections or kept runs name the member: whether
      it is in the segment and on the list (the ledger, with its profile id), a rejection that
      stands, and what each run of the last SEGOPS_RETENTION_DAYS did to it, newest first. An
      unknown member answers 200 with no connectors.
    parameters:
      - name: user_id
        in: path
        required: true
        schema: {type: string, minLength: 1, maxLength: 1000, pattern: '^[^\\x00-\\x1f\\x7f]+$'}
        description: the member's user_id, percent-encoded
    responses:
      200:
        description: the member's trace
        content:
          application/json:
            schema: {$ref: '#/components/schemas/MemberTrace'}
      422:
        $ref: '#/components/responses/Invalid'
    """
    from segops_sync.shapes import member_trace_json
    from segops_sync.sync.member_trace import trace_member

    user_id = str(request.path_params["user_id"])
    with session_scope() as s:
        trace = trace_member(s, user_id, retention_days=settings.retention_days)
        return JSONResponse(member_trace_json(trace))


def remove(request: Request, settings: Settings) -> Response:
    """Delete a connector.
    ---
    operationId: deleteConnector
    summary: Delete a connector; the Klaviyo list is left as it is
    responses:
      204:
        description: deleted
    """
    with session_scope() as s:
        delete_connector(s, path_id(request))
    return Response(status_code=204)


def klaviyo_lists(request: Request, settings: Settings) -> Response:
    """The lists of a Klaviyo key.
    ---
    operationId: listKlaviyoLists
    summary: The lists of a Klaviyo private key, to pick a connector's list from
    description: >-
      The key goes in the body (never in a URL) and is neither stored nor logged. The lists
      come sorted by name (GET /api/lists, every page). profile_count is counted for the first
      10 lists only, each with one GET /api/lists/{id} in Klaviyo's 1/s tier, and is null for
      the others and for any Klaviyo would not count within a few seconds. With "counts": false
      nothing is counted and the answer comes at once (the page asks so first, then again with
      the counts). A malformed key, or one Klaviyo rejects, is a 422 that says which.
    requestBody:
      required: true
      content:
        application/json:
          schema: {$ref: '#/components/schemas/KlaviyoKey'}
    responses:
      200:
        description: the key's lists
        content:
          application/json:
            schema:
              type: object
              properties:
                lists:
                  type: array
                  items: {$ref: '#/components/schemas/KlaviyoList'}
              required: [lists]
      502: {$ref: '#/components/responses/KlaviyoUnavailable'}
    """
    body = parse_body(_read(request), KLAVIYO_KEY_FIELDS)
    try:
        counted = COUNTED_LISTS if body.get("counts", True) else 0
        lists = key_lists(body["api_key"], settings.klaviyo_base_url, counted=counted)
    except KlaviyoUnavailable as exc:
        return _error(502, str(exc))
    return JSONResponse({"lists": [klaviyo_list_json(found) for found in lists]})


def openapi(request: Request, settings: Settings) -> Response:
    """This document.
    ---
    operationId: getOpenAPI
    summary: The API's OpenAPI 3 document
    responses:
      200:
        description: the OpenAPI document
        content:
          application/json:
            schema: {type: object}
    """
    return JSONResponse(request.app.state.openapi)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # One route per method and path: Allow names every method the path has.
        allowed = sorted(
            {
                method
                for route in request.app.routes
                if isinstance(route, Route) and route.path_regex.match(request.url.path)
                for method in route.methods or ()
            }
        )
        headers["Allow"] = ", ".join(allowed)
        message = f"method {request.method} is not allowed here; use {', '.join(allowed)}"
    elif exc.status_code == 404:
        message = f"no such route: {request.url.path!r}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message, headers=headers)


async def _crash(request: Request, exc: Exception) -> Response:
    # The traceback is logged by Starlette's error middleware; the client gets no internals.
    return _error(500, "internal error; the server log has the details")


def create_app(token: str, *, throttle: SignInThrottle | None = None) -> Starlette:
    """The API guarded by ``token``; failed sign-ins are counted by ``throttle`` (default: in
    the limiter's Redis, SIGN_IN_FAILURES a minute)."""
    if throttle is None:
        settings = get_settings()
        throttle = SignInThrottle(settings.limiter_url, settings.redis_key_prefix)
    app = Starlette(
        routes=[
            Route("/v1/connectors", _guard(create), methods=["POST"]),
            Route("/v1/connectors", _guard(index), methods=["GET"]),
            Route("/v1/connectors/{id}", _guard(show), methods=["GET"]),
            Route("/v1/connectors/{id}", _guard(patch), methods=["PATCH"]),
            Route("/v1/connectors/{id}", _guard(remove), methods=["DELETE"]),
            Route("/v1/connectors/{id}/resync", _guard(resync), methods=["POST"]),
            Route("/v1/connectors/{id}/pause", _guard(pause), methods=["POST"]),
            Route("/v1/connectors/{id}/resume", _guard(resume), methods=["POST"]),
            Route("/v1/connectors/{id}/runs", _guard(runs), methods=["GET"]),
            Route("/v1/connectors/{id}/runs/{run}/rejected", _guard(rejected), methods=["GET"]),
            Route("/v1/members/{user_id:any_text}", _guard(member), methods=["GET"]),
            Route("/v1/klaviyo/lists", _guard(klaviyo_lists), methods=["POST"]),
            Route("/openapi.json", _guard(openapi), methods=["GET"]),
            *web.routes(),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _crash},
    )
    app.state.openapi = ApiSchema().get_schema(app.routes)
    app.add_middleware(BearerAuth, token=token, throttle=throttle)
    app.add_middleware(JsonHeaders)  # added last: outermost, so it sees the 401s and 429s too
    return app


def serve(port: int, host: str = "127.0.0.1") -> None:
    import uvicorn

    config = uvicorn.Config(
        create_app(get_settings().require_api_token()), host=host, port=port, log_level="info"
    )
    obs_log.install_api()  # after the Config, which configures uvicorn's loggers
    uvicorn.Server(config).run()


@contextlib.contextmanager
def serve_in_thread(token: str, redis_url: str, prefix: str) -> Iterator[str]:
    """The app served by uvicorn on a free port of 127.0.0.1 in a thread of this process, for
    tests and benchmarks; yields its base URL. Their clients all come from 127.0.0.1, some with
    wrong tokens on purpose, so the sign-in throttle (counting in ``redis_url`` as in
    production) has a limit none of them reaches; the real limit is tested on a process."""
    import uvicorn

    from segops_sync.embedded import free_port

    throttle = SignInThrottle(redis_url, prefix, limit=1_000_000)
    port = free_port()
    config = uvicorn.Config(
        create_app(token, throttle=throttle), host="127.0.0.1", port=port, log_level="warning"
    )
    obs_log.install_api()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
