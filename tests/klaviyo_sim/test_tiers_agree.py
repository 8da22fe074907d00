"""The client and the simulator each keep Klaviyo's published table (tiers and scopes per
endpoint), written separately from Klaviyo's sources. They must agree: a wrong number in either
fails here, where a shared table would have let the client's mistake pass every test."""

from __future__ import annotations

from segops_sync.klaviyo import ENDPOINT_LIMITS, ENDPOINT_SCOPES, Endpoint
from segops_sync.klaviyo_sim import published


def test_for_every_endpoint_the_client_knows_the_simulator_has_the_same_tier() -> None:
    assert set(ENDPOINT_LIMITS) == set(Endpoint)
    disagree = {}
    for endpoint in Endpoint:
        client = ENDPOINT_LIMITS[endpoint]
        sim = published.ENDPOINT_LIMITS.get(endpoint)
        if sim is None or (sim.burst, sim.steady) != (client.burst, client.steady):
            numbers = (sim.burst, sim.steady) if sim else None
            disagree[endpoint.value] = ((client.burst, client.steady), numbers)
    assert not disagree, f"(client, simulator) burst/steady differ: {disagree}"


def test_for_every_endpoint_the_client_knows_the_simulator_wants_the_same_scopes() -> None:
    assert set(ENDPOINT_SCOPES) == set(Endpoint)
    disagree = {
        endpoint.value: (sorted(ENDPOINT_SCOPES[endpoint]), sorted(sim_scopes or ()))
        for endpoint in Endpoint
        if (sim_scopes := published.ENDPOINT_SCOPES.get(endpoint)) != ENDPOINT_SCOPES[endpoint]
    }
    assert not disagree, f"(client, simulator) scopes differ: {disagree}"
