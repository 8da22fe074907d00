"""The simulator over HTTP: Klaviyo's API under /api, an admin/inspection API under /_sim."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from segops_sync.klaviyo.endpoints import Endpoint
from segops_sync.klaviyo_sim.simulator import Simulator
from segops_sync.klaviyo_sim.state import SimHttpRequest, SimProfile, SimRequest

_RAW_SEND = "segops.raw_send"
_API_METHODS = ["GET", "POST", "DELETE", "PATCH", "PUT"]


class _SimulatorApp(Starlette):
    """Keeps the server's own ``send`` in the scope: dropping a connection needs its transport,
    and Starlette's middleware wraps ``send`` before it reaches a route."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RAW_SEND] = send
        await super().__call__(scope, receive, send)


class _KlaviyoApi:
    """A raw ASGI endpoint, so that it may end a request without any answer."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived_at = self.sim.now()  # before the body: Klaviyo counts a request as it arrives
        request = Request(scope, receive)
        body = await request.body()
        latency = self.sim.faults.latency
        if latency:
            await asyncio.sleep(latency)
            arrived_at += latency  # injected network latency: the request arrives that much later
        sim_request = SimHttpRequest(
            method=request.method,
            path=request.url.path,
            query=tuple(request.query_params.multi_items()),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            base_url=str(request.base_url).rstrip("/"),
            arrived_at=arrived_at,
        )
        result = await run_in_threadpool(self.sim.handle, sim_request)
        if result.drop and await _drop_connection(scope):
            return
        response = Response(result.body, status_code=result.status, headers=result.headers)
        await response(scope, receive, send)


async def _drop_connection(scope: Scope) -> bool:
    """Closes the socket without an answer, so the client sees a transport error."""
    raw_send = scope.get(_RAW_SEND)
    transport = getattr(getattr(raw_send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return False  # not uvicorn's h11/httptools cycle: answer normally instead
    transport.abort()
    for _ in range(5):  # let the server register the disconnection before we return
        await asyncio.sleep(0)
    return True


def create_app(sim: Simulator) -> Starlette:
    admin = _Admin(sim)
    routes = [
        Route("/_sim/health", admin.health, methods=["GET"]),
        Route("/_sim/accounts", admin.create_account, methods=["POST"]),
        Route("/_sim/accounts/{account_id}/keys", admin.create_key, methods=["POST"]),
        Route("/_sim/accounts/{account_id}/lists", admin.create_list, methods=["POST"]),
        Route("/_sim/accounts/{account_id}/profiles", admin.profiles, methods=["GET"]),
        Route("/_sim/accounts/{account_id}/profiles", admin.add_profile, methods=["POST"]),
        Route("/_sim/keys/revoke", admin.revoke_key, methods=["POST"]),
        Route("/_sim/lists/{list_id}/members", admin.members, methods=["GET"]),
        Route("/_sim/profiles/{profile_id}", admin.profile, methods=["GET"]),
        Route("/_sim/requests", admin.requests, methods=["GET"]),
        Route("/_sim/stats", admin.stats, methods=["GET"]),
        Route("/_sim/max-rate", admin.max_rate, methods=["GET"]),
        Route("/_sim/faults", admin.get_faults, methods=["GET"]),
        Route("/_sim/faults", admin.set_faults, methods=["POST"]),
        Route("/_sim/force-429", admin.force_429, methods=["POST"]),
        Route("/_sim/jobs/{job_id}", admin.job, methods=["GET"]),
        Route("/_sim/jobs/{job_id}/{action}", admin.job_action, methods=["POST"]),
        Route("/{path:path}", _KlaviyoApi(sim), methods=_API_METHODS),
    ]
    return _SimulatorApp(routes=routes)


# -- admin API -----------------------------------------------------------------------------------


def _guarded(
    fn: Callable[[Any, Request], Awaitable[Response]],
) -> Callable[[Any, Request], Awaitable[Response]]:
    async def wrapper(self: Any, request: Request) -> Response:
        try:
            return await fn(self, request)
        except KeyError as exc:
            return JSONResponse({"error": str(exc.args[0] if exc.args else exc)}, status_code=404)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return wrapper


class _Admin:
    """JSON mirror of the Simulator's setup, inspection and fault methods (for other processes).

    Unauthenticated: the simulator only ever listens on 127.0.0.1.
    """

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def _json(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("body must be a JSON object")
        return doc

    @_guarded
    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "time_scale": self.sim.time_scale})

    @_guarded
    async def create_account(self, request: Request) -> Response:
        body = await self._json(request)
        account_id = self.sim.create_account(account_id=body.get("account_id"))
        return JSONResponse({"account_id": account_id}, status_code=201)

    @_guarded
    async def create_key(self, request: Request) -> Response:
        body = await self._json(request)
        account_id = request.path_params["account_id"]
        scopes = body.get("scopes")
        key = (
            self.sim.create_key(account_id, scopes=scopes)
            if scopes is not None
            else self.sim.create_key(account_id)
        )
        return JSONResponse({"key": key}, status_code=201)

    @_guarded
    async def revoke_key(self, request: Request) -> Response:
        body = await self._json(request)  # the key travels in the body, never in a logged URL
        self.sim.revoke_key(str(body["key"]))
        return Response(status_code=204)

    @_guarded
    async def create_list(self, request: Request) -> Response:
        body = await self._json(request)
        list_id = self.sim.create_list(
            request.path_params["account_id"],
            body.get("name", "List"),
            list_id=body.get("list_id"),
            opt_in_process=body.get("opt_in_process", "double_opt_in"),
        )
        return JSONResponse({"list_id": list_id}, status_code=201)

    @_guarded
    async def add_profile(self, request: Request) -> Response:
        body = await self._json(request)
        profile_id = self.sim.add_profile(
            request.path_params["account_id"],
            email=body.get("email"),
            external_id=body.get("external_id"),
            visible=bool(body.get("visible", True)),
        )
        return JSONResponse({"profile_id": profile_id}, status_code=201)

    @_guarded
    async def profiles(self, request: Request) -> Response:
        found = self.sim.profiles(request.path_params["account_id"])
        return JSONResponse({"profiles": [_profile_json(p) for p in found]})

    @_guarded
    async def members(self, request: Request) -> Response:
        members = self.sim.list_members(request.path_params["list_id"])
        return JSONResponse(
            {
                "member_ids": [p.id for p in members],
                "members": [_profile_json(p) for p in members],
            }
        )

    @_guarded
    async def profile(self, request: Request) -> Response:
        found = self.sim.profile(request.path_params["profile_id"])
        if found is None:
            raise KeyError("unknown profile")
        return JSONResponse(_profile_json(found))

    @_guarded
    async def requests(self, request: Request) -> Response:
        endpoint = request.query_params.get("endpoint")
        status = request.query_params.get("status")
        found = self.sim.requests(
            endpoint=parse_endpoint(endpoint) if endpoint else None,
            status=int(status) if status else None,
        )
        return JSONResponse({"requests": [_request_json(r) for r in found]})

    @_guarded
    async def stats(self, request: Request) -> Response:
        stats = self.sim.stats()
        stats.update(
            {
                "time_scale": self.sim.time_scale,
                "burst_window": self.sim.burst_window,
                "steady_window": self.sim.steady_window,
            }
        )
        return JSONResponse(stats)

    @_guarded
    async def max_rate(self, request: Request) -> Response:
        q = request.query_params
        value = self.sim.max_rate(
            q["account_id"], parse_endpoint(q["endpoint"]), float(q["window"])
        )
        return JSONResponse({"max_rate": value})

    @_guarded
    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(self.sim.faults))

    @_guarded
    async def set_faults(self, request: Request) -> Response:
        body = await self._json(request)
        self.sim.set_faults(
            error_rate=float(body.get("error_rate", 0.0)),
            drop_rate=float(body.get("drop_rate", 0.0)),
            latency=float(body.get("latency", 0.0)),
            challenge_rate=float(body.get("challenge_rate", 0.0)),
        )
        return Response(status_code=204)

    @_guarded
    async def force_429(self, request: Request) -> Response:
        body = await self._json(request)
        self.sim.force_429(int(body["count"]), float(body["retry_after"]))
        return Response(status_code=204)

    @_guarded
    async def job(self, request: Request) -> Response:
        status = self.sim.job_status(request.path_params["job_id"])
        if status is None:
            raise KeyError("unknown job")
        return JSONResponse({"status": status})

    @_guarded
    async def job_action(self, request: Request) -> Response:
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        actions = {
            "expire": self.sim.expire_job,
            "lose": self.sim.lose_job,
            "cancel": self.sim.cancel_job,
        }
        if action not in actions:
            raise KeyError(f"unknown action {action}")
        actions[action](job_id)
        return Response(status_code=204)


def parse_endpoint(value: str) -> Endpoint:
    """An Endpoint from its value ("GET /api/profiles") or its name ("GET_PROFILES")."""
    try:
        return Endpoint(value)
    except ValueError:
        try:
            return Endpoint[value]
        except KeyError:
            raise ValueError(f"unknown endpoint {value!r}") from None


def _profile_json(profile: SimProfile) -> dict[str, Any]:
    return {
        k: (v.isoformat() if isinstance(v, datetime) else v)
        for k, v in dataclasses.asdict(profile).items()
    }


def _request_json(record: SimRequest) -> dict[str, Any]:
    doc = dataclasses.asdict(record)
    doc["endpoint"] = record.endpoint.value if record.endpoint else None
    return doc
