"""The relays the tracker told this device to use, in order (check-in answer field `relays`).

The tracker ranks the live relays for each device (rendezvous hashing) and
sends `relays: [{host, ports}]` with every check-in; a tracker without the
field sends nothing and the configured list stays. An operator-written
`relay_endpoints` list always wins: placement only replaces the default one
(each relay host on its SSH ports, then its WebSocket endpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from device_client.config import ClientConfig

MAX_RELAYS = 16
MAX_HOST = 253

Relays = tuple[tuple[str, tuple[int, ...]], ...]


def parse_relays(value: Any) -> Relays | None:
    """The `relays` field as ((host, ports), ...); None when absent or malformed (keep the list)."""
    if not isinstance(value, list) or not value or len(value) > MAX_RELAYS:
        return None
    found = []
    for item in value:
        host = item.get("host") if isinstance(item, dict) else None
        ports = item.get("ports") if isinstance(item, dict) else None
        if not isinstance(host, str) or not host or len(host) > MAX_HOST or not host.isprintable():
            return None
        if not isinstance(ports, list) or not ports or not all(_is_port(p) for p in ports):
            return None
        found.append((host, tuple(ports)))
    return tuple(found)


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def placed(config: ClientConfig, relays: Relays | None) -> ClientConfig:
    """The config with the tracker's relay order, or unchanged (no field, or endpoints set)."""
    if not relays or config.relay_endpoints:
        return config
    hosts = tuple(dict.fromkeys(host for host, _ in relays))
    ports = tuple(dict.fromkeys(port for _, node_ports in relays for port in node_ports))
    if (hosts, ports) == (config.relay_hosts, config.relay_ports):
        return config
    return dataclasses.replace(config, relay_hosts=hosts, relay_ports=ports)
