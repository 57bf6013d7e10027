"""What every relay component is given: settings, database, keys, hub, node name."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.hub import Hub
from core.keys import KeyStore
from relay.data.tickets import DataWaiters
from relay.device.tunnels import TunnelRegistry
from relay.peering.pool import PeerPool
from relay.session.live_sessions import LiveSessions

T = TypeVar("T")


@dataclass
class RelayContext:
    settings: Settings
    sessions: sessionmaker[Session]
    keys: KeyStore
    hub: Hub
    node_name: str
    public_host: str
    device_ports: list[int] = field(default_factory=list)  # bound ports, in dial order
    technician_port: int = 0
    draining: bool = False  # relay.drain: refuse new device tunnels
    tunnels: TunnelRegistry = field(default_factory=TunnelRegistry)
    live: LiveSessions = field(default_factory=LiveSessions)  # this process's device sessions
    data: DataWaiters = field(default_factory=DataWaiters)  # sessions awaiting data connections
    peer_address: str = ""  # relay.peering: host:port other nodes dial; "" when off
    peers: PeerPool | None = None  # relay.peering: connections to other nodes

    async def db(self, fn: Callable[[Session], T]) -> T:
        """Run fn(session) in one transaction, off the event loop."""

        def run() -> T:
            with self.sessions() as session, session.begin():
                return fn(session)

        return await asyncio.to_thread(run)
