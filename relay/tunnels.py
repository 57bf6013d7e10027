"""Live device tunnels held by this relay process (interface; filled in by the device work)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncssh


@dataclass
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

    async def create_connection(
        self,
        session_factory: Callable[[], asyncssh.SSHTCPSession[Any]],
        remote_host: str,
        remote_port: int,
    ) -> tuple[asyncssh.SSHTCPChannel[Any], asyncssh.SSHTCPSession[Any]]:
        """Open a channel back to the device, as its remote forward (ignores host/port)."""
        return await self.conn.create_connection(
            session_factory, self.listen_host, self.listen_port, "127.0.0.1", 0
        )

    def close(self, reason: str) -> None:
        self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)


class TunnelRegistry:
    """device id -> live tunnel on this process."""

    def __init__(self) -> None:
        self._tunnels: dict[str, DeviceTunnel] = {}

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
