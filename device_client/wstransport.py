"""SSH over a WebSocket: a client connection that asyncssh runs on like a TCP socket.

`asyncssh.connect(host, port, tunnel=WebSocketTunnel(...))` calls
`create_connection(factory, host, port)`; we dial the relay's HTTPS port
(directly or through an HTTP CONNECT proxy), upgrade to a WebSocket on
`/api/v1/tunnel`, and hand asyncssh a transport whose writes become binary
messages and whose received messages are the relay's SSH bytes. The
WebSocket protocol itself is the `websockets` library's sans-I/O client.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from device_client import __version__
from device_client.endpoints import Endpoint
from device_client.proxy import Proxy, connect_through, open_socket

MAX_MESSAGE = 1024 * 1024  # the relay sends SSH packets; nothing legitimate is larger
MAX_SEND = 64 * 1024  # bytes per message we send (the relay accepts up to 1 MiB)


class WebSocketError(OSError):
    """The WebSocket upgrade or the stream failed (one line)."""


class _WsProtocol(asyncio.Protocol):
    """The asyncio protocol on the socket: WebSocket framing, SSH bytes above it."""

    def __init__(self, endpoint: Endpoint) -> None:
        uri = parse_uri(f"{endpoint.scheme}://{endpoint.host}:{endpoint.port}{endpoint.path}")
        self.ws = ClientProtocol(uri, max_size=MAX_MESSAGE)
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.upper: asyncio.Protocol | None = None
        self._early: list[bytes] = []  # SSH bytes that arrived with the 101 answer
        self._text = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.ws.connect()
        request.headers["User-Agent"] = f"rly-client/{__version__}"
        self.ws.send_request(request)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                self._handshake_done(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self.flush()
        if self.ws.close_expected() and self.transport is not None:
            self.transport.close()

    def _handshake_done(self, response: Response) -> None:
        if self.opened.done():
            return
        if self.ws.handshake_exc is None:
            self.opened.set_result(None)
            return
        status = response.status_code
        why = f"HTTP {status} {response.reason_phrase}" if status != 101 else "bad handshake"
        self.opened.set_exception(WebSocketError(f"relay refused the WebSocket upgrade: {why}"))

    def _frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.TEXT or (frame.opcode is Opcode.CONT and self._text):
            self._text = True  # the relay only sends binary messages: this is not rly
            self.ws.fail(1003, "text messages are not accepted")
            return
        if frame.opcode in (Opcode.BINARY, Opcode.CONT) and frame.data:
            self._text = False
            if self.upper is None:
                self._early.append(bytes(frame.data))
            else:
                self.upper.data_received(bytes(frame.data))

    def attach(self, upper: asyncio.Protocol) -> None:
        """Start delivering SSH bytes to `upper` (the asyncssh connection)."""
        self.upper = upper
        early, self._early = self._early, []
        for data in early:
            upper.data_received(data)

    def flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            why = str(exc) if exc else "connection closed during the WebSocket upgrade"
            self.opened.set_exception(WebSocketError(why))
        if self.upper is not None:
            self.upper.connection_lost(exc)


class WebSocketTransport(asyncio.Transport):
    """What asyncssh writes to: each write is one binary WebSocket message."""

    def __init__(self, protocol: _WsProtocol, transport: asyncio.Transport) -> None:
        super().__init__()
        self._ws = protocol
        self._transport = transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport.is_closing():
            return
        view = memoryview(data)
        for start in range(0, len(view), MAX_SEND):
            self._ws.ws.send_binary(bytes(view[start : start + MAX_SEND]))
        self._ws.flush()

    def close(self) -> None:
        if not self._transport.is_closing():
            self._ws.ws.send_close(1000)
            self._ws.flush()
            self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()


class WebSocketTunnel:
    """`tunnel=` for asyncssh.connect: one WebSocket connection to one relay endpoint."""

    def __init__(
        self, endpoint: Endpoint, *, context: ssl.SSLContext | None, proxy: Proxy | None
    ) -> None:
        self.endpoint = endpoint
        self._context = context
        self._proxy = proxy

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], _host: str, _port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """Dial, upgrade, and start the SSH session `session_factory` makes on top."""
        ep = self.endpoint
        loop = asyncio.get_running_loop()
        if self._proxy is not None:
            sock = await connect_through(self._proxy, ep.host, ep.port)
        else:
            sock = await open_socket(ep.host, ep.port)
        tls = self._context if ep.scheme == "wss" else None
        try:
            transport, protocol = await loop.create_connection(
                lambda: _WsProtocol(ep),
                sock=sock,
                ssl=tls,
                server_hostname=ep.host if tls else None,
            )
        except BaseException:
            sock.close()
            raise
        try:
            await protocol.opened
        except BaseException:
            transport.abort()
            raise
        session = session_factory()
        ws_transport = WebSocketTransport(protocol, transport)
        session.connection_made(ws_transport)
        protocol.attach(session)
        return ws_transport, session

    def __str__(self) -> str:
        via = f" via proxy {self._proxy}" if self._proxy else ""
        return f"{self.endpoint}{via}"


class _PairEnd(asyncio.Protocol):
    """Our end of the socketpair: bytes written by the data path go out as WebSocket messages."""

    def __init__(self) -> None:
        self.ws: WebSocketTransport | None = None  # set once the WebSocket is open
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.write(data)

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            self.ws.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ws is not None:
            self.ws.close()


class _ToPair(asyncio.Protocol):
    """Above the WebSocket: the relay's bytes go into the socketpair."""

    def __init__(self, pair: _PairEnd) -> None:
        self.pair = pair
        self.early: list[bytes] = []  # until the socketpair end is wired up

    def data_received(self, data: bytes) -> None:
        if self.pair.transport is None:
            self.early.append(data)
        else:
            self.pair.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pair.transport is not None:
            self.pair.transport.close()


async def websocket_socket(
    endpoint: Endpoint, *, context: ssl.SSLContext | None, proxy: Proxy | None
) -> socket.socket:
    """A plain socket whose bytes travel over a WebSocket to `endpoint` (for data connections).

    The caller gets one end of a socketpair; the other end is pumped to and from the
    WebSocket here, so code that needs a socket (the data path) runs over it unchanged.
    """
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    uppers: list[_ToPair] = []
    pair = _PairEnd()

    def make_upper() -> asyncio.Protocol:
        uppers.append(_ToPair(pair))
        return uppers[0]

    tunnel = WebSocketTunnel(endpoint, context=context, proxy=proxy)
    try:
        ws_transport, _upper = await tunnel.create_connection(make_upper, endpoint.host, 0)
        assert isinstance(ws_transport, WebSocketTransport)
        pair.ws = ws_transport
        await loop.connect_accepted_socket(lambda: pair, ours)
        assert pair.transport is not None
        for data in uppers[0].early:
            pair.transport.write(data)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    return theirs
