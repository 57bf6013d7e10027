"""A data connection that presented its ticket: redeem it, answer `OK`, hand it to its session.

No SSH byte is read before the ticket holds: the transport stays paused
while the ticket is checked. A refused ticket (forged, replayed, expired,
for another node or device, or for no waiting session) closes the
connection without a reply and is audited as `device.data_refused` with the
reason; a forged one (the only kind a guesser can send) first waits the
source's growing pre-auth failure delay, holding its pre-auth place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import audit
from core.data_wire import OK_LINE
from relay.context import RelayContext
from relay.data.tickets import Redeemed, Refused, redeem, well_formed
from relay.preauth import PreauthLimiter

log = logging.getLogger(__name__)


class DataStream:
    """An accepted data connection; `asyncssh.connect(tunnel=stream)` runs SSH over it."""

    def __init__(self, transport: asyncio.Transport, first: bytes, peer: tuple[str, int]) -> None:
        self.transport = transport
        self.peer = peer
        self._first = first

    async def create_connection(
        self, factory: Callable[[], Any], _host: str, _port: int
    ) -> tuple[asyncio.Transport, Any]:
        """asyncssh's tunnel hook: the SSH client connection becomes this stream's protocol."""
        protocol = factory()
        transport = self.transport
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        first, self._first = self._first, b""
        if first:
            protocol.data_received(first)
        transport.resume_reading()
        return transport, protocol

    def close(self) -> None:
        self.transport.abort()

    def __str__(self) -> str:
        return f"data connection from {self.peer[0]}:{self.peer[1]}"


async def accept_data_connection(
    ctx: RelayContext,
    limiter: PreauthLimiter,
    transport: asyncio.Transport,
    ticket: str,
    first: bytes,
) -> None:
    """Redeem `ticket` and give the stream to the waiting session, or refuse it."""
    raw_peer = transport.get_extra_info("peername") or ("", 0)
    peer = (str(raw_peer[0]), int(raw_peer[1]))
    local = transport.get_extra_info("sockname") or ("", 0)
    result: Redeemed | Refused
    if not well_formed(ticket):
        result = Refused("forged")
    else:
        try:
            result = await ctx.db(
                lambda s: redeem(
                    s, ticket=ticket, node=ctx.node_name, peer=peer, port=int(local[1])
                )
            )
        except SQLAlchemyError as exc:
            log.warning("data connection: database error %s", type(exc).__name__)
            transport.abort()
            return
    if isinstance(result, Redeemed):
        waiter = ctx.data.claim(result.session_id, result.device_id)
        if not isinstance(waiter, str):
            transport.write(OK_LINE)
            waiter.arrived.set_result(DataStream(transport, first, peer))
            log.info(
                "data connection device=%s session=%s from %s:%d",
                result.device_id, result.session_id, peer[0], peer[1],
            )  # fmt: skip
            return
        result = Refused(waiter, result.device_id, result.account_id)
    await _refuse(ctx, limiter, transport, result, peer[0])


async def _refuse(
    ctx: RelayContext,
    limiter: PreauthLimiter,
    transport: asyncio.Transport,
    refused: Refused,
    peer_ip: str,
) -> None:
    log.info("data connection refused device=%s reason=%s from %s",
             refused.device_id or "-", refused.reason, peer_ip)  # fmt: skip

    def write(session: Session) -> None:
        audit.record(
            session,
            action="device.data_refused",
            actor=f"device:{refused.device_id}" if refused.device_id else "",
            account_id=refused.account_id,
            target=refused.device_id,
            detail=refused.reason,
            source_ip=peer_ip,
        )

    try:
        await ctx.db(write)
    except SQLAlchemyError as exc:
        log.warning("data connection audit failed: %s", type(exc).__name__)
    if refused.reason == "forged":  # guessing: the source's failure delay, holding its place
        await asyncio.sleep(limiter.failure(peer_ip))
    transport.abort()
