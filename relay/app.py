"""Start the relay's SSH listeners and its background upkeep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncssh

from relay.context import RelayContext
from relay.device.port import listen_device_port
from relay.device.server import device_limiter, make_device_server
from relay.drain import run_drain_watch
from relay.node import close_stale_rows, register_node, run_node_heartbeat
from relay.peering.dial_back import serve_dial_backs
from relay.peering.route import start_peering
from relay.session.recording_retention import run_retention
from relay.ssh_options import MAX_PACKET, WINDOW, algorithm_options
from relay.technician.server import make_technician_server

log = logging.getLogger(__name__)


@dataclass
class Relay:
    ctx: RelayContext
    acceptors: list[asyncssh.SSHAcceptor | asyncio.Server]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def technician_port(self) -> int:
        return self.ctx.technician_port

    @property
    def device_ports(self) -> list[int]:
        return self.ctx.device_ports

    async def close(self) -> None:
        """Stop accepting, close every tunnel with a reason, and wait for their rows."""
        for task in self.tasks:
            task.cancel()
        for acceptor in self.acceptors:
            acceptor.close()
        if self.ctx.tunnels.sweeper is not None:
            self.ctx.tunnels.sweeper.cancel()
        self.ctx.tunnels.close_all("relay shutting down")
        if self.ctx.peers is not None:
            self.ctx.peers.close()
        await self.ctx.tunnels.drain(5)
        for acceptor in self.acceptors:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(acceptor.wait_closed(), 5)


async def _listen(
    ctx: RelayContext, port: int, factory: Callable[[], asyncssh.SSHServer], **extra: object
) -> asyncssh.SSHAcceptor:
    s = ctx.settings.relay
    return await asyncssh.listen(
        s.listen,
        port,
        server_factory=factory,
        server_host_keys=[(ctx.keys.host_key, ctx.keys.host_cert)],
        reuse_address=True,
        backlog=1024,
        login_timeout=s.login_grace,
        keepalive_interval=s.keepalive_interval,
        keepalive_count_max=s.keepalive_count,
        window=WINDOW,
        max_pktsize=MAX_PACKET,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        **algorithm_options(),
        **extra,
    )


def _bound_port(acceptor: asyncssh.SSHAcceptor | asyncio.Server) -> int:
    return int(acceptor.sockets[0].getsockname()[1])


async def start_relay(ctx: RelayContext) -> Relay:
    """Listen on the technician port and every device port; raise OSError if one is taken."""
    s = ctx.settings.relay
    await close_stale_rows(ctx)
    acceptors: list[asyncssh.SSHAcceptor | asyncio.Server] = []
    try:
        for port in s.device_ports:
            limiter = device_limiter(ctx)
            server = await listen_device_port(ctx, port, limiter, make_device_server(ctx, limiter))
            acceptors.append(server)
            ctx.device_ports.append(_bound_port(server))
        tech_server, tech_extra = make_technician_server(ctx)
        acceptor = await _listen(ctx, s.technician_port, tech_server, **tech_extra)
        acceptors.append(acceptor)
        ctx.technician_port = _bound_port(acceptor)
        peering = await start_peering(ctx)
        if peering is not None:
            acceptors.append(peering)
            serve_dial_backs(ctx)  # a shared database: answer other nodes' dial-back requests
    except OSError:
        for listener in acceptors:
            listener.close()
        raise
    await register_node(ctx)
    relay = Relay(ctx, acceptors)
    relay.tasks.append(asyncio.create_task(run_node_heartbeat(ctx)))
    relay.tasks.append(asyncio.create_task(run_drain_watch(ctx)))
    relay.tasks.append(asyncio.create_task(run_retention(ctx)))
    log.info(
        "relay node=%s technician_port=%d device_ports=%s",
        ctx.node_name,
        ctx.technician_port,
        ctx.device_ports,
    )
    return relay
