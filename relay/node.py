"""This relay's row in relay_nodes, and clean-up of rows a crash left open."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.models import RelayNode, SshSession, Tunnel, utcnow
from relay.context import RelayContext

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 10.0


async def close_stale_rows(ctx: RelayContext) -> None:
    """Close the tunnel and session rows a previous run of this node left open.

    Runs before the listeners open, so it can never close a tunnel that a device
    re-established on this run.
    """

    def run(session: Session) -> None:
        now = utcnow()
        session.execute(
            update(Tunnel)
            .where(Tunnel.relay_node == ctx.node_name, Tunnel.closed_at.is_(None))
            .values(closed_at=now, close_reason="relay restarted")
        )
        session.execute(
            update(SshSession)
            .where(SshSession.relay_node == ctx.node_name, SshSession.ended_at.is_(None))
            .values(ended_at=now, end_reason="relay restarted")
        )

    await ctx.db(run)


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
        node.started_at = node.last_seen_at = utcnow()

    await ctx.db(run)


async def run_node_heartbeat(ctx: RelayContext) -> None:
    def beat(session: Session) -> None:
        session.execute(
            update(RelayNode).where(RelayNode.name == ctx.node_name).values(last_seen_at=utcnow())
        )

    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        try:
            await ctx.db(beat)
        except SQLAlchemyError as exc:
            log.warning("node heartbeat failed: %s", type(exc).__name__)
