"""Open a session's data connection to a relay: the one place that dials it.

`dial_data` takes a validated dial request and returns a connected socket
on which the relay has answered `OK`: from then on the socket carries SSH
(the relay is the client, this device's target the server). Transports that
cannot hand over a socket (WebSocket) may return one end of a socketpair
that they pump; everything after this function only needs a socket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from core.data_wire import OK_LINE, PREAMBLE_PREFIX, PREAMBLE_TIMEOUT, REQUEST_VERSION
from device_client.proxy import open_socket

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
MAX_ENDPOINTS = 8
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
NAME_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class DialError(OSError):
    """No endpoint of a dial request gave a data connection."""


@dataclass(frozen=True)
class DialRequest:
    """A relay's request for one data connection (core.data_wire), checked field by field."""

    ticket: str
    session: str
    relay: str
    endpoints: tuple[tuple[str, int], ...]
    endpoints_only: bool = False  # dial-back to another relay: the tunnel's own endpoint won't do


def parse_request(data: Any) -> DialRequest | None:
    """The request, or None if any field is malformed (it is then ignored, with a log line)."""
    if not isinstance(data, dict) or data.get("v") != REQUEST_VERSION:
        return None
    ticket, session, relay = data.get("ticket"), data.get("session"), data.get("relay")
    raw = data.get("endpoints")
    if not (isinstance(ticket, str) and TICKET_RE.fullmatch(ticket)):
        return None
    if not (isinstance(session, str) and NAME_RE.fullmatch(session)):
        return None
    if not (isinstance(relay, str) and NAME_RE.fullmatch(relay)):
        return None
    if not isinstance(raw, list) or len(raw) > MAX_ENDPOINTS:
        return None
    endpoints: list[tuple[str, int]] = []
    for item in raw:
        host = item.get("host") if isinstance(item, dict) else None
        port = item.get("port") if isinstance(item, dict) else None
        if not (isinstance(host, str) and 0 < len(host) <= 253 and host.isprintable()):
            return None
        if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
            return None
        endpoints.append((host, port))
    only = data.get("endpoints_only", False)
    if not isinstance(only, bool):
        return None
    return DialRequest(ticket, session, relay, tuple(endpoints), only)


async def _handshake(sock: socket.socket, ticket: str) -> None:
    """Send the preamble and read exactly the relay's OK (no byte of SSH beyond it)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, PREAMBLE_PREFIX + ticket.encode("ascii") + b"\r\n")
    answer = b""
    while len(answer) < len(OK_LINE):
        chunk = await loop.sock_recv(sock, len(OK_LINE) - len(answer))
        if not chunk:
            raise DialError("the relay refused the data connection")
        answer += chunk
    if answer != OK_LINE:
        raise DialError("the relay answered the data connection with something else than OK")


async def dial_data(
    request: DialRequest,
    also: tuple[tuple[str, int], ...] = (),
    connect: Callable[[str, int], Awaitable[socket.socket]] = open_socket,
    *,
    also_first: bool = False,
) -> socket.socket:
    """A connected socket after the relay's OK, trying the request's endpoints (then `also`).

    `connect` opens the TCP connection (device_client.proxy.dial_tcp goes through the
    HTTP CONNECT proxy the tunnel uses); `also_first` tries `also` first (a tunnel that
    came in over a WebSocket: its data connections take the same way out).
    """
    error: OSError = DialError("no endpoint")
    also = () if request.endpoints_only else also
    order = (*also, *request.endpoints) if also_first else (*request.endpoints, *also)
    for host, port in dict.fromkeys(order):
        try:
            sock = await asyncio.wait_for(connect(host, port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.debug("data connection to %s:%d failed: %s", host, port, exc)
            error = exc if isinstance(exc, OSError) else DialError(f"{host}:{port} timed out")
            continue
        try:
            await asyncio.wait_for(_handshake(sock, request.ticket), PREAMBLE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            # the relay refused the ticket: another endpoint of the same relay will too
            raise exc if isinstance(exc, OSError) else DialError("no OK from the relay") from None
        return sock
    raise DialError(f"no data connection: {error}")
