"""The flag rows (config.FLAGS) and the values they give the Config: what follows from a row, per flag."""

from __future__ import annotations

import pytest

from istio_init.config import from_sources


@pytest.mark.parametrize("given,inbound,outbound", [
    ({"inbound_ports": "*", "service_cidr": "*"}, "*", "*"),
    ({"inbound_ports": "80,8080", "service_cidr": "10.0.0.0/8,fd00::/8"}, "80,8080", "10.0.0.0/8,fd00::/8"),
    ({}, "", ""),
])
def test_wildcard_or_list_is_one_value(given: dict[str, str | bool | None], inbound: str, outbound: str) -> None:
    """-b and -i are each '*' or a list in one value: str() spells it back; it is true when it selects anything."""
    config = from_sources(given, environ={})
    assert (str(config.inbound_ports), str(config.outbound_cidrs)) == (inbound, outbound)
    assert bool(config.inbound_ports) == config.inbound_enabled == bool(inbound)
    assert config.inbound_ports.all == (inbound == "*") and config.outbound_cidrs.all == (outbound == "*")
