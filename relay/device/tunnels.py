"""Live device tunnels held by this relay process, and their rows in `tunnels`.

A `DeviceTunnel` is one device's SSH connection with its single remote
forward. The technician side opens channels back to the device through it
(`asyncssh.connect(tunnel=device_tunnel, ...)`) and may close it. The registry
maps device id -> live tunnel and owns the few background tasks that write
tunnel rows, so that shutdown can wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncssh
from sqlalchemy import update
from sqlalchemy.orm import Session

from core import audit
from core.data_wire import CONTROL_HOST
from core.models import Tunnel, utcnow

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DeviceTunnel:
    """One device's reverse tunnel; usable as asyncssh.connect(tunnel=...)."""

    device_id: str
    conn: asyncssh.SSHServerConnection
    listen_host: str
    listen_port: int
    peer_ip: str
    peer_port: int
    connected_at: datetime
    client_version: str = ""
    row_id: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    account_id: int | None = None
    transport_port: int = 0
    transport: str = "ssh"  # relay.device.transport_label: ssh, ssh+connect, wss, wss+connect
    max_channels: int = 16
    close_reason: str | None = None
    data_capable: bool = False  # rly-client announced data connections (core.data_wire)
    _channels: set[asyncssh.SSHTCPChannel[Any]] = field(default_factory=set)

    data_sessions: int = 0  # sessions on data connections asked for on this tunnel

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    @property
    def at_capacity(self) -> bool:
        """Channels plus data-connection sessions reached `max_channels`."""
        return len(self._channels) + self.data_sessions >= self.max_channels

    async def create_connection(
        self,
        session_factory: Callable[[], asyncssh.SSHTCPSession[Any]],
        remote_host: str,
        remote_port: int,
    ) -> tuple[asyncssh.SSHTCPChannel[Any], asyncssh.SSHTCPSession[Any]]:
        """Open a channel back to the device, as its remote forward (ignores host/port).

        At most `max_channels` channels (and data-connection sessions) are open
        at once on one tunnel, so a burst of technician sessions cannot pile up
        on one device.
        """
        if self.closed.is_set():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "tunnel is closed")
        if self.at_capacity:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, "too many channels on this tunnel"
            )
        chan, session = await self.conn.create_connection(
            session_factory, self.listen_host, self.listen_port, "127.0.0.1", 0
        )
        self._channels.add(chan)
        waiter = asyncio.ensure_future(chan.wait_closed())
        waiter.add_done_callback(lambda _t: self._channels.discard(chan))
        return chan, session

    async def send_dial(
        self, request: dict[str, Any], ready: Awaitable[object] | None = None
    ) -> None:
        """Ask the device to dial a data connection: one JSON line on a control channel.

        The channel is opened back through the device's forward like a session's,
        with CONTROL_HOST as its originator so that rly-client tells it apart; it
        is closed as soon as the line is written. `ready` (the ticket's row being
        stored) is awaited between the open and the write, so the two overlap.
        """
        if self.closed.is_set() or not self.data_capable:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "no control channel")
        _reader, writer = await self.conn.open_connection(
            self.listen_host, self.listen_port, CONTROL_HOST, 0, encoding=None
        )
        try:
            if ready is not None:
                await ready
            writer.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
            writer.write_eof()
        finally:
            writer.close()

    def close(self, reason: str) -> None:
        """Disconnect the device; the row is closed with `reason` once the connection ends."""
        if self.close_reason is None:
            self.close_reason = reason
        self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)


class TunnelRegistry:
    """device id -> live tunnel on this process, plus the row writes in flight."""

    def __init__(self) -> None:
        self._tunnels: dict[str, DeviceTunnel] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sweeper: asyncio.Task[None] | None = None  # relay.device.liveness starts it

    def get(self, device_id: str) -> DeviceTunnel | None:
        return self._tunnels.get(device_id)

    def add(self, tunnel: DeviceTunnel) -> DeviceTunnel | None:
        """Register; return the tunnel it replaces (the caller closes it)."""
        old = self._tunnels.get(tunnel.device_id)
        self._tunnels[tunnel.device_id] = tunnel
        return old

    def remove(self, tunnel: DeviceTunnel) -> None:
        if self._tunnels.get(tunnel.device_id) is tunnel:
            del self._tunnels[tunnel.device_id]

    def __len__(self) -> int:
        return len(self._tunnels)

    def __iter__(self) -> Iterator[DeviceTunnel]:
        return iter(list(self._tunnels.values()))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a short background job (a row write) and keep it referenced until done."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close_all(self, reason: str) -> None:
        """Disconnect every device (relay shutdown)."""
        for tunnel in self:
            tunnel.close(reason)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for pending row writes (after close_all, before the engine is disposed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*self._tasks, return_exceptions=True),
                    deadline - loop.time(),
                )


def insert_tunnel_row(session: Session, tunnel: DeviceTunnel, node: str) -> int:
    """Record a tunnel that came up; returns the row id."""
    row = Tunnel(
        device_id=tunnel.device_id,
        relay_node=node,
        listen_host=tunnel.listen_host[:253],
        listen_port=tunnel.listen_port,
        peer_ip=tunnel.peer_ip,
        peer_port=tunnel.peer_port,
        transport_port=tunnel.transport_port,
        client_version=tunnel.client_version[:128],
        transport=tunnel.transport,
        connected_at=tunnel.connected_at,
        last_keepalive_at=tunnel.connected_at,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        action="tunnel.up",
        actor=f"device:{tunnel.device_id}",
        account_id=tunnel.account_id,
        target=tunnel.device_id,
        detail=(
            f"node={node} port={tunnel.transport_port} transport={tunnel.transport} "
            f"client={tunnel.client_version[:64]}"
        ),
        source_ip=tunnel.peer_ip,
    )
    return row.id


def close_tunnel_row(session: Session, tunnel: DeviceTunnel, reason: str) -> None:
    """Mark the tunnel's row closed and audit why."""
    if tunnel.row_id is not None:
        session.execute(
            update(Tunnel)
            .where(Tunnel.id == tunnel.row_id, Tunnel.closed_at.is_(None))
            .values(closed_at=utcnow(), close_reason=reason[:128])
        )
    audit.record(
        session,
        action="tunnel.down",
        actor=f"device:{tunnel.device_id}",
        account_id=tunnel.account_id,
        target=tunnel.device_id,
        detail=reason,
        source_ip=tunnel.peer_ip,
    )
