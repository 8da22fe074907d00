"""The Klaviyo simulator over HTTP for the sync tests that call the pipeline as plain functions,
and a fresh account on it per test (tests/sync/helpers.py has the tools that go with them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from segops_sync.klaviyo_sim import Simulator, SimulatorServer
from tests.sync.helpers import World, open_world


@pytest.fixture(scope="module")
def server(segops_env: dict[str, str]) -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(job_delay=0.05)
    with SimulatorServer(sim) as srv:
        yield sim, srv.base_url


@pytest.fixture
def world(
    server: tuple[Simulator, str], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[World]:
    """A new account, key and list; the add path as the environment has it, or ``bulk`` or
    ``direct`` given by indirect parametrization (see ``open_world``).
    test_pipeline_functions.py overrides it with one that is ``bulk`` unless told otherwise."""
    yield from open_world(server, monkeypatch, getattr(request, "param", None))
