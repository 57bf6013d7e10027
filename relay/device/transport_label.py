"""How a device's tunnel travels, as the tunnel row records it: ssh, ssh+connect, wss, ...

The relay sees the base itself (a device port is `ssh`; the WebSocket endpoint
sets `wss`, or `ws` without TLS, in its transport's extra info). A CONNECT
proxy is invisible from here, so only that half comes from the device: its
SSH version comment says `rly-transport=<name>`.
"""

from __future__ import annotations

MARK = "rly-transport="
TRANSPORTS = ("ssh", "ssh+connect", "ws", "ws+connect", "wss", "wss+connect")


def tunnel_transport(observed: object, client_version: str) -> str:
    """`observed` (default ssh) plus "+connect" when the device announced a proxy."""
    base = observed if observed in ("ssh", "ws", "wss") else "ssh"
    _, _, claim = client_version.partition(MARK)
    return f"{base}+connect" if claim.split(" ", 1)[0].endswith("+connect") else str(base)
