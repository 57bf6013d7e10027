"""uvicorn's sans-I/O WebSocket protocol with a bound on answers the peer never reads.

The tunnel app's abort (close code ABORT_CODE: garbage, a text message)
drops the socket at once instead of waiting 10 s for the closing handshake.
uvicorn answers every ping with a pong written straight to the socket. A peer
that floods pings and reads nothing would make the relay buffer pongs without
end; past MAX_UNREAD bytes of unsent output the connection is dropped instead.
Every other bound (message size, one queued message, handshake deadline) is
uvicorn's own or set in `rly.http_server`.
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from relay.device.ws_tunnel import ABORT_CODE

log = logging.getLogger(__name__)
MAX_UNREAD = 256 * 1024  # bytes waiting for a peer that sends pings but reads nothing


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """Drops a connection whose unread output passes MAX_UNREAD while it keeps pinging, and
    closes the socket at once when the app aborts (no 10 s wait for a hostile peer's reply)."""

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.close" and message.get("code") == ABORT_CODE:
            self.transport.close()

    def handle_ping(self) -> None:
        if self.transport.get_write_buffer_size() > MAX_UNREAD:
            client = f"{self.client[0]}" if self.client else "-"
            log.info("websocket: dropping %s, %d bytes unread while it floods pings", client,
                     self.transport.get_write_buffer_size())  # fmt: skip
            self.transport.abort()
            return
        super().handle_ping()
