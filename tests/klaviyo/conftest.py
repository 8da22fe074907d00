"""Fixtures: a simulator on 127.0.0.1 with one account, key and list, and clients that record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from segops_sync.klaviyo import KlaviyoClient
from segops_sync.klaviyo_sim import Simulator, SimulatorServer


@dataclass(frozen=True)
class Sent:
    """One request as it left the client (after httpx built it)."""

    method: str
    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RecordingTransport(httpx.BaseTransport):
    """Wraps the real transport: records exactly what goes on the wire, then sends it."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[Sent] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.sent.append(
            Sent(
                method=request.method,
                path=request.url.path,
                params=list(request.url.params.multi_items()),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Env:
    sim: Simulator
    server: SimulatorServer
    account_id: str
    key: str
    list_id: str
    clients: list[KlaviyoClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def client(self, key: str | None = None, **kwargs: Any) -> KlaviyoClient:
        client = KlaviyoClient(key or self.key, self.base_url, **kwargs)
        self.clients.append(client)
        return client

    def recording_client(self, **kwargs: Any) -> tuple[KlaviyoClient, RecordingTransport]:
        transport = RecordingTransport()
        return self.client(transport=transport, **kwargs), transport


def make_env(sim: Simulator) -> Iterator[Env]:
    account_id = sim.create_account()
    key = sim.create_key(account_id)
    list_id = sim.create_list(account_id, "Test list")
    with SimulatorServer(sim) as server:
        env = Env(sim, server, account_id, key, list_id)
        try:
            yield env
        finally:
            for client in env.clients:
                client.close()


@pytest.fixture
def sim() -> Simulator:
    # time_scale keeps any incidental rate-limit wait short; limits stay enforced
    return Simulator(time_scale=20, seed=7)


@pytest.fixture
def env(sim: Simulator) -> Iterator[Env]:
    yield from make_env(sim)


class FakeClock:
    """A clock tests move by hand: rate-limit windows without sleeping or flakiness."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
