"""Read deadlines, a header size cap and a body cap for the embedded HTTP server.

uvicorn has no request-header deadline: a client that opens a connection and
sends nothing, or trickles one header byte every few seconds, holds a slot
for ever. `DeadlineHttpToolsProtocol` arms a timer when a request starts (the
connection is made, or the first byte of a keep-alive request arrives) and
closes the transport unless the request line and headers are complete within
`HEADER_TIMEOUT`; the body then has `BODY_TIMEOUT` to arrive. Idle keep-alive
connections stay uvicorn's business (`timeout_keep_alive`).

The parser is httptools (llhttp, in C): the tracker answers about 25% more
check-ins per CPU-second than with h11. llhttp keeps no limit on header size,
so the protocol feeds it at most `MAX_HEADER_BYTES` before the headers are
complete and refuses the request (400, as uvicorn answers any bad request)
beyond that.

`limit_body` caps every request body at 64 KiB for the whole HTTP app (portal
forms included), reusing the tracker's middleware so the answer is the same
one-line JSON 413 everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tracker.limits import MAX_BODY, BodyLimit

log = logging.getLogger(__name__)
HEADER_TIMEOUT = 10.0  # request line + headers, from the first byte (or the connection)
BODY_TIMEOUT = 30.0  # the rest of the request body, once the headers are in
MAX_HEADER_BYTES = 16 * 1024  # request line + headers
Phase = Literal["headers", "body"]


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on reading each request and a header cap."""

    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    max_header_bytes = MAX_HEADER_BYTES
    _deadline: asyncio.TimerHandle | None = None
    _phase: Phase | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._phase is None and self._idle():
            self._arm("headers")  # a keep-alive connection starts its next request
        while data and self._phase == "headers":
            room = self.max_header_bytes - self._header_bytes
            if room <= 0:
                self._refuse_headers()
                return
            chunk, data = data[:room], data[room:]
            self._header_bytes += len(chunk)
            super().data_received(chunk)
            if self.transport.is_closing():
                self._disarm()
                return
        if data:
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase is None:
            self._arm("headers")  # pipelined behind a response still being sent

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm("body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def _idle(self) -> bool:
        """No request is being read: new bytes start the next one."""
        return self.cycle is None or self.cycle.response_complete

    def _refuse_headers(self) -> None:
        self._disarm()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        log.info("http: refusing %s, request headers over %d bytes", client, self.max_header_bytes)
        self.send_400_response("Request headers too large.")

    def _arm(self, phase: Phase) -> None:
        self._disarm()
        timeout = self.header_timeout if phase == "headers" else self.body_timeout
        self._phase = phase
        if phase == "headers":
            self._header_bytes = 0
        self._deadline = self.loop.call_later(timeout, self._expired, phase, timeout)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: Phase, timeout: float) -> None:
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        log.info("http: closing %s, request %s not received within %gs", client, phase, timeout)
        self.transport.close()


def limit_body(app: ASGIApp, max_bytes: int = MAX_BODY) -> ASGIApp:
    """`app` behind a request body cap (413 beyond `max_bytes`, chunked or not)."""
    return BodyLimit(app, max_bytes=max_bytes)
