"""This relay's row in relay_nodes: register, heartbeat with load, and reap nodes that went silent.

Every `relay.heartbeat_interval` the node stamps `last_seen_at` with its load
(open tunnels, live sessions). A node silent for GONE_AFTER of its own
intervals is gone: whichever live node notices first closes its open tunnel
and session rows with the reason `node gone`, in single conditional UPDATEs
(`... WHERE closed_at IS NULL AND relay_node = X`), so noticing twice changes
nothing. A node that was only slow and finds itself declared gone drops its
tunnels, whose rows are already closed; its devices come back and get new rows.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import audit
from core.fleet import GONE_AFTER, gone_after
from core.models import RelayNode, SshSession, Tunnel, utcnow
from relay.context import RelayContext

log = logging.getLogger(__name__)
NODE_GONE = "node gone"


async def close_stale_rows(ctx: RelayContext) -> None:
    """Close the tunnel and session rows a previous run of this node left open.

    Runs before the listeners open, so it can never close a tunnel that a device
    re-established on this run.
    """

    def run(session: Session) -> None:
        close_node_rows(session, ctx.node_name, "relay restarted")

    await ctx.db(run)


def close_node_rows(session: Session, node: str, reason: str) -> int:
    """Close every open tunnel and session row of `node`; return how many tunnels closed."""
    now = utcnow()
    closed = session.execute(
        update(Tunnel)
        .where(Tunnel.relay_node == node, Tunnel.closed_at.is_(None))
        .values(closed_at=now, close_reason=reason)
    )
    session.execute(
        update(SshSession)
        .where(SshSession.relay_node == node, SshSession.ended_at.is_(None))
        .values(ended_at=now, end_reason=reason)
    )
    return int(getattr(closed, "rowcount", 0) or 0)


async def register_node(ctx: RelayContext) -> None:
    """Upsert this node with the ports actually bound (the tracker hands them to devices)."""

    def run(session: Session) -> None:
        node = session.get(RelayNode, ctx.node_name)
        if node is None:
            node = RelayNode(name=ctx.node_name)
            session.add(node)
        node.public_host = ctx.public_host
        node.device_ports = ",".join(str(p) for p in ctx.device_ports)
        node.technician_port = ctx.technician_port
        node.peer_address = ctx.peer_address  # relay.peering; "" when off
        node.started_at = node.last_seen_at = utcnow()
        node.heartbeat_interval = ctx.settings.relay.heartbeat_interval
        node.tunnels = node.sessions = 0
        node.state, node.drain_deadline, node.gone_at = "live", None, None

    await ctx.db(run)


def _beat(session: Session, ctx: RelayContext) -> bool:
    """Stamp this node with its load; True if another node had declared it gone meanwhile."""
    me = ctx.node_name
    sessions = session.scalar(
        select(func.count())
        .select_from(SshSession)
        .where(SshSession.relay_node == me, SshSession.ended_at.is_(None))
    )
    gone_at = session.scalar(select(RelayNode.gone_at).where(RelayNode.name == me))
    session.execute(
        update(RelayNode)
        .where(RelayNode.name == me)
        .values(
            last_seen_at=utcnow(), tunnels=len(ctx.tunnels), sessions=sessions or 0, gone_at=None
        )
    )
    return gone_at is not None


def reap_gone_nodes(session: Session, *, noticed_by: str, now: datetime | None = None) -> list[str]:
    """Declare every silent node gone and close its rows; return the names this call declared.

    The declaration is a conditional UPDATE (`gone_at IS NULL`), so of several
    nodes noticing at once one declares and audits; the row closing is
    idempotent whoever runs it.
    """
    now = now or utcnow()
    declared = []
    for node in session.scalars(select(RelayNode).where(RelayNode.gone_at.is_(None))):
        silent_for = now - node.last_seen_at
        if node.name == noticed_by or silent_for <= gone_after(node.heartbeat_interval):
            continue
        won = session.execute(
            update(RelayNode)
            .where(RelayNode.name == node.name, RelayNode.gone_at.is_(None))
            .where(RelayNode.last_seen_at < now - gone_after(node.heartbeat_interval))
            .values(gone_at=now)
        )
        if not getattr(won, "rowcount", 0):
            continue
        tunnels = close_node_rows(session, node.name, NODE_GONE)
        audit.record(
            session,
            action="relay.gone",
            actor=noticed_by,
            target=node.name,
            detail=f"silent {silent_for.total_seconds():.0f}s; {tunnels} tunnel row(s) closed",
        )
        declared.append(node.name)
    return declared


async def run_node_heartbeat(ctx: RelayContext) -> None:
    """Forever: heartbeat with load, then reap nodes that stopped beating."""
    while True:
        await asyncio.sleep(ctx.settings.relay.heartbeat_interval)
        try:
            declared_me = await ctx.db(lambda s: _beat(s, ctx))
            gone = await ctx.db(lambda s: reap_gone_nodes(s, noticed_by=ctx.node_name))
        except SQLAlchemyError as exc:
            log.warning("node heartbeat failed: %s", type(exc).__name__)
            continue
        if declared_me:
            log.warning("this node was declared gone while silent; dropping its tunnels")
            ctx.tunnels.close_all(NODE_GONE)
        for name in gone:
            log.warning("relay node %s is gone (silent for %d heartbeats)", name, GONE_AFTER)


def tunnel_node_since(session: Session, device_id: str, since: datetime) -> str | None:
    """The node holding an open tunnel of this device that came up after `since`, if any."""
    return session.scalar(
        select(Tunnel.relay_node)
        .where(Tunnel.device_id == device_id, Tunnel.closed_at.is_(None))
        .where(Tunnel.connected_at > since)
        .limit(1)
    )
