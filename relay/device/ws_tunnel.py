"""Device tunnels over a WebSocket on the relay's HTTP(S) port (`/api/v1/tunnel`).

A device behind a web firewall reaches the relay only on 443. The WebSocket
carries exactly the bytes a device port would see, so each accepted
WebSocket is handed to the device port's dispatch (`relay.device.port`): the
same first-bytes check, pre-auth limits, asyncssh device server, keys,
pinning and rules. `AsgiByteTransport` is the asyncio transport that
dispatch and asyncssh drive; binary messages in are `data_received`, writes
out are binary messages (coalesced up to MAX_SEND bytes).

Bounds: uvicorn caps a message at the HTTP server's `ws_max_size` and reads
no further message until this app has taken the last one; a text message
ends the connection; the HTTP server's header deadline covers a peer that
never upgrades; after the upgrade the dispatch's preamble timeout and
asyncssh's login grace apply as on a device port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import asyncssh
from starlette.types import Message, Receive, Scope, Send

from relay.context import RelayContext
from relay.device.port import DevicePort, ssh_listen_options
from relay.device.server import device_limiter, make_device_server

log = logging.getLogger(__name__)

PATH = "/api/v1/tunnel"
MAX_SEND = 256 * 1024  # bytes joined into one outgoing message
HIGH_WATER = 1024 * 1024  # pause the protocol's writing beyond this many queued bytes
ABORT_CODE = 1008  # close code of abort(): the server drops the socket without a handshake


class AsgiByteTransport(asyncio.Transport):
    """A byte-stream transport over one accepted ASGI WebSocket."""

    def __init__(self, scope: Scope, send: Send, label: str) -> None:
        super().__init__()
        client = scope.get("client") or ("", 0)
        server = scope.get("server") or ("", 0)
        self._extra: dict[str, Any] = {
            "peername": (str(client[0]), int(client[1] or 0)),
            "sockname": (str(server[0]), int(server[1] or 0)),
            "rly_transport": label,
        }
        self._send = send
        self._protocol: asyncio.BaseProtocol | None = None
        self._queue: list[bytes] = []
        self._queued = 0
        self._wake = asyncio.Event()
        self.readable = asyncio.Event()
        self.readable.set()
        self.closed = asyncio.Event()  # close() or abort(): the receive loop stops
        self._closing = False
        self._close_code = 1000
        self._write_paused = False
        self._writer = asyncio.ensure_future(self._write_loop())

    # -- what the protocol calls --------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._queue.append(bytes(data))
        self._queued += len(data)
        self._wake.set()
        if self._queued > HIGH_WATER and not self._write_paused:
            self._write_paused = True
            protocol = self._protocol
            if isinstance(protocol, asyncio.Protocol):
                protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._queued

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, then close the WebSocket."""
        if not self._closing:
            self._closing = True
            self._wake.set()

    def abort(self) -> None:
        """Drop what is queued and close the WebSocket now."""
        self._queue.clear()
        self._queued = 0
        self._close_code = ABORT_CODE
        self.close()
        self.closed.set()

    def pause_reading(self) -> None:
        self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()

    def is_reading(self) -> bool:
        return self.readable.is_set()

    # -- the send side ------------------------------------------------------------

    async def _write_loop(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # the peer went away
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    chunk = self._take()
                    await self._send({"type": "websocket.send", "bytes": chunk})
                    self._drained()
                if self._closing:
                    await self._send({"type": "websocket.close", "code": self._close_code})
                    break
        self.closed.set()

    def _take(self) -> bytes:
        parts, size = [], 0
        while self._queue and size < MAX_SEND:
            part = self._queue.pop(0)
            parts.append(part)
            size += len(part)
        self._queued -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _drained(self) -> None:
        if self._write_paused and self._queued <= HIGH_WATER // 4:
            self._write_paused = False
            protocol = self._protocol
            if isinstance(protocol, asyncio.Protocol):
                protocol.resume_writing()

    async def finish(self) -> None:
        """The stream ended: stop the writer and tell the protocol."""
        self._closing = True
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, RuntimeError):
            await self._writer
        protocol = self._protocol
        if protocol is not None:
            protocol.connection_lost(None)


class WebSocketTunnels:
    """The ASGI app at /api/v1/tunnel: each WebSocket becomes one device-port stream."""

    def __init__(self, protocol_factory: Callable[[], asyncio.Protocol], *, tls: bool) -> None:
        self._factory = protocol_factory
        self._label = "wss" if tls else "ws"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await _upgrade_required(send)
            return
        if scope["type"] != "websocket":
            return
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        transport = AsgiByteTransport(scope, send, self._label)
        protocol = self._factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        try:
            await self._pump(transport, receive)
        finally:
            await transport.finish()

    async def _pump(self, transport: AsgiByteTransport, receive: Receive) -> None:
        """Read messages until the peer or our side ends the stream (one task, not one each)."""

        async def read() -> None:
            while True:
                if not transport.readable.is_set():
                    await transport.readable.wait()
                if not self._deliver(transport, await receive()):
                    return

        reader = asyncio.ensure_future(read())
        closed = asyncio.ensure_future(transport.closed.wait())
        try:
            await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, closed):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, RuntimeError):
                await reader

    @staticmethod
    def _deliver(transport: AsgiByteTransport, message: Message) -> bool:
        """Hand one message to the protocol; False when the stream is over."""
        if message["type"] != "websocket.receive":
            return False  # websocket.disconnect
        data = message.get("bytes")
        if data is None:  # a text message: not a device
            transport.abort()
            return False
        protocol = transport.get_protocol()
        if data and isinstance(protocol, asyncio.Protocol):
            protocol.data_received(data)
        return True


async def _upgrade_required(send: Send) -> None:
    body = json.dumps({"error": "this endpoint carries device tunnels over WebSocket"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 426,
            "headers": [
                (b"content-type", b"application/json"),
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def make_tunnel_app(ctx: RelayContext, *, tls: bool) -> WebSocketTunnels:
    """The /api/v1/tunnel app: a device port of its own (own pre-auth limits, same rules)."""
    limiter = device_limiter(ctx)
    options = await asyncssh.SSHServerConnectionOptions.construct(
        **ssh_listen_options(ctx, make_device_server(ctx, limiter))
    )
    return WebSocketTunnels(DevicePort(ctx, limiter, options).protocol, tls=tls)
