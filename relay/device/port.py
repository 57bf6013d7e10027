"""The device port's first bytes decide what a connection is, before asyncssh sees it.

`SSH-` is a device's tunnel (handed to asyncssh's server connection, which is
an asyncio protocol), `RLY-DATA/1 <ticket>\\r\\n` is a session's data
connection (relay.data.accept), anything else, or silence, is dropped within
PREAMBLE_TIMEOUT and PREAMBLE_MAX bytes. Every connection holds a place in the
port's pre-auth limits from its first moment, so a connection over the cap
is refused before any SSH object is built for it.

Other transports (a WebSocket carrying the same bytes) feed the same
dispatch: call `DevicePort.protocol()` for an asyncio protocol and drive it
with a transport that supports write, close, abort, pause_reading,
resume_reading, set_protocol and get_extra_info("peername"/"sockname").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncssh

from core.data_wire import PREAMBLE_MAX, PREAMBLE_PREFIX, PREAMBLE_TIMEOUT
from relay.context import RelayContext
from relay.data.accept import accept_data_connection
from relay.device.liveness import tcp_keepalive
from relay.preauth import PreauthLimiter

log = logging.getLogger(__name__)
SSH_PREFIX = b"SSH-"
DATA_PREFIX = PREAMBLE_PREFIX


class DevicePort:
    """One device port's dispatch: shared SSH options, limiter and context."""

    def __init__(
        self,
        ctx: RelayContext,
        limiter: PreauthLimiter,
        ssh_options: asyncssh.SSHServerConnectionOptions,
    ) -> None:
        self.ctx = ctx
        self.limiter = limiter
        self.ssh_options = ssh_options

    def protocol(self) -> asyncio.Protocol:
        """A fresh protocol for one accepted byte stream."""
        return _Preamble(self)

    def start_ssh(self, transport: asyncio.Transport, first: bytes) -> None:
        """Give the stream to asyncssh's device server, with the bytes read so far."""
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a WebSocket-carried stream has none; its socket is the HTTP one
            tcp_keepalive(sock, self.ctx.settings.relay)
        conn = asyncssh.SSHServerConnection(asyncio.get_running_loop(), self.ssh_options)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.data_received(first)


class _Preamble(asyncio.Protocol):
    """Reads at most PREAMBLE_MAX bytes within PREAMBLE_TIMEOUT, then dispatches or drops."""

    def __init__(self, port: DevicePort) -> None:
        self._port = port
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._peer = ("", 0)
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self._peer = (str(peer[0]), int(peer[1]))
        if not self._port.limiter.admit(self._peer[0]):  # over the cap: no SSH object at all
            self._done = True
            transport.abort()
            return
        self._counted = True
        self._timer = asyncio.get_running_loop().call_later(PREAMBLE_TIMEOUT, self._drop)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        buf = self._buf = self._buf + data
        if buf.startswith(SSH_PREFIX):
            self._finish()
            self._release()  # DeviceServer.connection_made counts it again, at once
            assert self._transport is not None
            self._port.start_ssh(self._transport, buf)
        elif buf.startswith(DATA_PREFIX):
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) >= PREAMBLE_MAX:
                    self._drop()
                return
            if end + 2 > PREAMBLE_MAX:
                self._drop()
                return
            self._finish()
            ticket = buf[len(DATA_PREFIX) : end].decode("ascii", "replace")
            self._start_data(ticket, buf[end + 2 :])
        elif not (SSH_PREFIX.startswith(buf[:4]) or DATA_PREFIX.startswith(buf[:11])):
            self._drop()

    def _start_data(self, ticket: str, rest: bytes) -> None:
        transport = self._transport
        assert transport is not None
        transport.pause_reading()  # nothing more is read until the ticket holds
        port = self._port
        self._counted = False  # the task below holds the place until the ticket is decided

        async def run() -> None:
            try:
                await accept_data_connection(port.ctx, port.limiter, transport, ticket, rest)
            finally:
                port.limiter.release(self._peer[0])

        port.ctx.tunnels.spawn(run(), "data-accept")

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drop(self) -> None:
        """Silence, a wrong first line or too many bytes: close without a word."""
        if self._transport is None:
            return
        self._finish()
        log.debug(
            "device port: dropped a connection without a valid preamble from %s", self._peer[0]
        )
        self._transport.abort()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._port.limiter.release(self._peer[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        self._release()

    def eof_received(self) -> bool | None:
        self._drop()
        return None


def ssh_listen_options(ctx: RelayContext, server_factory: Any) -> dict[str, Any]:
    """The asyncssh options of a device port (what `asyncssh.listen` was given before)."""
    from relay.ssh_options import MAX_PACKET, WINDOW, algorithm_options

    s = ctx.settings.relay
    return {
        "server_factory": server_factory,
        "server_host_keys": [(ctx.keys.host_key, ctx.keys.host_cert)],
        "login_timeout": s.login_grace,
        "keepalive_interval": s.keepalive_interval,
        "keepalive_count_max": s.keepalive_count,
        "window": WINDOW,
        "max_pktsize": MAX_PACKET,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "allow_scp": False,
        **algorithm_options(),
    }


async def listen_device_port(
    ctx: RelayContext, port: int, limiter: PreauthLimiter, server_factory: Any
) -> asyncio.Server:
    """Bind one device port with the first-bytes dispatch in front of asyncssh."""
    options = await asyncssh.SSHServerConnectionOptions.construct(
        **ssh_listen_options(ctx, server_factory)
    )
    dispatch = DevicePort(ctx, limiter, options)
    return await asyncio.get_running_loop().create_server(
        dispatch.protocol, ctx.settings.relay.listen, port, reuse_address=True, backlog=1024
    )
