"""Where a device session decides to use peering, and how a node starts its peering side."""

from __future__ import annotations

import ipaddress
import logging

import asyncssh
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import RelayNode, Tunnel
from relay.context import RelayContext
from relay.peering.pool import PeerCarrier, PeerPool
from relay.peering.server import listen_peering

log = logging.getLogger(__name__)


def peering_enabled(settings: Settings) -> bool:
    """Peering needs other nodes, so a shared database: never on the embedded SQLite."""
    return not settings.effective_database_url.startswith("sqlite")


def remote_tunnel_node(session: Session, device_id: str, me: str) -> str | None:
    """The live peer node (with a peering address) holding the device's open tunnel, if any."""
    return session.scalar(
        select(Tunnel.relay_node)
        .join(RelayNode, RelayNode.name == Tunnel.relay_node)
        .where(Tunnel.device_id == device_id, Tunnel.closed_at.is_(None))
        .where(Tunnel.relay_node != me, RelayNode.gone_at.is_(None), RelayNode.peer_address != "")
        .order_by(Tunnel.connected_at.desc())
        .limit(1)
    )


def peer_address_of(session: Session, node: str) -> str | None:
    return session.scalar(
        select(RelayNode.peer_address).where(RelayNode.name == node, RelayNode.gone_at.is_(None))
    )


async def peer_route(ctx: RelayContext, device_id: str) -> PeerCarrier | None:
    """Peering to the node holding the device's tunnel, when it is not on this node."""
    if ctx.peers is None or ctx.tunnels.get(device_id) is not None:
        return None
    node = await ctx.db(lambda s: remote_tunnel_node(s, device_id, ctx.node_name))
    return PeerCarrier(ctx.peers, node, device_id) if node else None


def advertised_host(ctx: RelayContext, bound: str) -> str:
    """The address peers dial: the bound one, or the public host for a wildcard listen."""
    if ipaddress.ip_address(bound).is_unspecified:
        return ctx.public_host
    return bound


async def start_peering(ctx: RelayContext) -> asyncssh.SSHAcceptor | None:
    """Listen on the peering port and set up the pool; None on the embedded database."""
    if not peering_enabled(ctx.settings):
        return None
    s = ctx.settings.relay
    identity = ctx.keys.node_identity(ctx.node_name)
    host = s.peering_listen or s.listen
    acceptor = await listen_peering(ctx, identity, host, s.peering_port)
    port = int(acceptor.sockets[0].getsockname()[1])
    shown = "127.0.0.1" if host == "localhost" else advertised_host(ctx, host)
    ctx.peer_address = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"

    async def lookup(node: str) -> str | None:
        return await ctx.db(lambda sess: peer_address_of(sess, node))

    ctx.peers = PeerPool(
        node_name=ctx.node_name,
        identity=identity,
        host_ca=ctx.keys.host_ca,
        lookup=lookup,
        keepalive_interval=s.keepalive_interval,
        keepalive_count=s.keepalive_count,
    )
    log.info("relay peering node=%s on %s", ctx.node_name, ctx.peer_address)
    return acceptor


def way_line(session: Session, holder: str, me: str, *, dial_back: bool = False) -> str:
    """`show`'s line saying how this relay reaches a device tunnelled at another node."""
    peering = bool(peer_address_of(session, holder))
    if dial_back:
        fallback = f"peering {holder} if it cannot" if peering else "no peering fallback"
        return f"Reached from relay {me}: by dial-back (asked through relay {holder}; {fallback})"
    if peering:
        return f"Reached from relay {me}: via peering {holder}"
    return f"Reached from relay {me}: not reachable (relay {holder} has no peering address)"
