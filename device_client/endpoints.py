"""Relay endpoints: `ssh://host:port` and `wss://host[:port]/api/v1/tunnel`.

Every endpoint carries the same SSH protocol to the relay's device server;
only the way the bytes travel differs (raw TCP, or a WebSocket on the HTTPS
port). The config holds them as URLs in the order to try them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = {"ssh": 22, "wss": 443, "ws": 80}
TUNNEL_PATH = "/api/v1/tunnel"


class EndpointError(ValueError):
    """An endpoint URL that cannot be used (one line naming it)."""


@dataclass(frozen=True)
class Endpoint:
    """One way to reach a relay: scheme, host, port and (WebSocket only) path."""

    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = SCHEMES[self.scheme] if self.websocket else -1
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse one endpoint URL; raise EndpointError naming what is wrong."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise EndpointError(f"relay endpoint {text!r} has a bad port") from None
    if parts.scheme not in SCHEMES:
        raise EndpointError(f"relay endpoint {text!r} must start with ssh://, wss:// or ws://")
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise EndpointError(f"relay endpoint {text!r} must be scheme://host[:port][/path]")
    if parts.scheme == "ssh":
        if port is None or parts.path not in ("", "/"):
            raise EndpointError(f"relay endpoint {text!r} must be ssh://host:port")
        return Endpoint("ssh", parts.hostname, port)
    return Endpoint(
        parts.scheme, parts.hostname, port or SCHEMES[parts.scheme], parts.path or TUNNEL_PATH
    )


def default_endpoints(
    hosts: Iterable[str], ports: Iterable[int], tracker_url: str
) -> tuple[Endpoint, ...]:
    """Each relay host on each SSH port, then its WebSocket endpoint on the tracker's port.

    `rly serve` answers WebSocket tunnels on its HTTP(S) port, the one the
    tracker URL names, so that is where a device behind a web firewall goes.
    """
    hosts = tuple(hosts)
    found = [Endpoint("ssh", host, port) for host in hosts for port in ports]
    tracker = urlsplit(tracker_url)
    scheme = {"https": "wss", "http": "ws"}.get(tracker.scheme)
    if scheme is not None:
        port = tracker.port or SCHEMES[scheme]
        found += [Endpoint(scheme, host, port, TUNNEL_PATH) for host in hosts]
    return tuple(found)


def remembered_first(endpoints: Iterable[Endpoint], last_good: str | None) -> list[Endpoint]:
    """The endpoint that worked last time first, the others in their configured order."""
    ordered = list(endpoints)
    for index, endpoint in enumerate(ordered):
        if str(endpoint) == last_good:
            return [endpoint, *ordered[:index], *ordered[index + 1 :]]
    return ordered
