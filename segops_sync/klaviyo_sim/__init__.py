"""A faithful fake Klaviyo over real HTTP (127.0.0.1), also usable in-process.

    sim = Simulator(time_scale=10)
    account = sim.create_account(); key = sim.create_key(account); list_id = sim.create_list(account)
    with SimulatorServer(sim) as server:
        KlaviyoClient(key, server.base_url).get_list(list_id)

Starlette and uvicorn are imported here; the client package (segops_sync.klaviyo) does not need
them and knows nothing of the simulator.
"""

from segops_sync.klaviyo_sim.accounts import DEFAULT_SCOPES
from segops_sync.klaviyo_sim.app import create_app, parse_endpoint
from segops_sync.klaviyo_sim.remote import RemoteSimulator
from segops_sync.klaviyo_sim.server import SimulatorServer, seed_demo, serve
from segops_sync.klaviyo_sim.simulator import Simulator
from segops_sync.klaviyo_sim.state import (
    Faults,
    SimHttpRequest,
    SimHttpResponse,
    SimProfile,
    SimRequest,
)
from segops_sync.klaviyo_sim.validation import official_model, validate_body

__all__ = [
    "DEFAULT_SCOPES",
    "Faults",
    "RemoteSimulator",
    "SimHttpRequest",
    "SimHttpResponse",
    "SimProfile",
    "SimRequest",
    "Simulator",
    "SimulatorServer",
    "create_app",
    "official_model",
    "parse_endpoint",
    "seed_demo",
    "serve",
    "validate_body",
]
