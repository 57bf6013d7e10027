"""Read deadlines and a body cap for the embedded HTTP server (slowloris and big bodies).

uvicorn has no request-header deadline: a client that opens a connection and
sends nothing, or trickles one header byte every few seconds, holds a slot
for ever. `DeadlineH11Protocol` arms a timer when a request starts (the
connection is made, or the first byte of a keep-alive request arrives) and
closes the transport unless the request line and headers are complete within
`HEADER_TIMEOUT`; the body then has `BODY_TIMEOUT` to arrive. Idle keep-alive
connections stay uvicorn's business (`timeout_keep_alive`).

`limit_body` caps every request body at 64 KiB for the whole HTTP app (portal
forms included), reusing the tracker's middleware so the answer is the same
one-line JSON 413 everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

import h11
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from tracker.limits import MAX_BODY, BodyLimit

log = logging.getLogger(__name__)
HEADER_TIMEOUT = 10.0  # request line + headers, from the first byte (or the connection)
BODY_TIMEOUT = 30.0  # the rest of the request body, once the headers are in
Phase = Literal["headers", "body"]


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request."""

    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None
    _phase: Phase | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm("headers")

    def data_received(self, data: bytes) -> None:
        if data and self._phase is None and self.conn.their_state is h11.IDLE:
            self._arm("headers")  # a keep-alive connection starts its next request
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Re-arm or drop the timer to match what h11 is waiting for now."""
        state = self.conn.their_state
        if self.transport.is_closing():
            self._disarm()
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif state is h11.IDLE:
            if self._phase is None and self.conn.trailing_data[0]:
                self._arm("headers")  # a pipelined request is half in
            elif self._phase == "body":
                self._disarm()
        else:  # DONE, MUST_CLOSE, ERROR, CLOSED, SWITCHED_PROTOCOL: nothing left to read
            self._disarm()

    def _arm(self, phase: Phase) -> None:
        self._disarm()
        timeout = self.header_timeout if phase == "headers" else self.body_timeout
        self._phase = phase
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
        if self.conn.our_state is not h11.ERROR:
            with contextlib.suppress(h11.LocalProtocolError):  # mid-request: nothing to tell h11
                self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def limit_body(app: ASGIApp, max_bytes: int = MAX_BODY) -> ASGIApp:
    """`app` behind a request body cap (413 beyond `max_bytes`, chunked or not)."""
    return BodyLimit(app, max_bytes=max_bytes)
