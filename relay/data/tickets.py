"""Single-use tickets for data connections, and the sessions waiting for them.

A ticket is 32 random bytes (urlsafe base64 without padding, 43 characters),
stored only as its SHA-256 and bound to one device, one session and this
relay node, valid a few seconds. Redeeming marks it used in the same
transaction that checks it, so a ticket opens at most one data connection,
on whichever relay process of a node holds the waiting session.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.data_wire import REQUEST_VERSION
from core.models import DataConnection, Device, utcnow

TICKET_BYTES = 32
TICKET_CHARS = 43
TICKET_TTL = 10.0  # seconds: the device dials within the relay's data_connect_timeout anyway


def new_ticket() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(TICKET_BYTES)).rstrip(b"=").decode()


def ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("ascii", "replace")).hexdigest()


def well_formed(ticket: str) -> bool:
    """43 urlsafe base64 characters: anything else is refused without a database read."""
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    return len(ticket) == TICKET_CHARS and set(ticket) <= alphabet


def dial_request(
    *,
    ticket: str,
    session_id: str,
    node: str,
    endpoints: list[tuple[str, int]],
    endpoints_only: bool = False,
) -> dict[str, Any]:
    """The object a device is asked to dial with: the same over the tunnel and in a check-in.

    `endpoints_only` (a dial-back to another node) tells the device not to try the
    endpoint its tunnel uses: that node would refuse a ticket bound to this one.
    """
    request: dict[str, Any] = {
        "v": REQUEST_VERSION,
        "ticket": ticket,
        "session": session_id,
        "relay": node,
        "endpoints": [{"host": host, "port": port} for host, port in endpoints],
    }
    if endpoints_only:
        request["endpoints_only"] = True
    return request


def store_ticket(
    session: Session, *, ticket: str, device_id: str, session_id: str, node: str
) -> None:
    now = utcnow()
    session.add(
        DataConnection(
            ticket_hash=ticket_hash(ticket),
            device_id=device_id,
            session_id=session_id,
            relay_node=node,
            created_at=now,
            expires_at=now + timedelta(seconds=TICKET_TTL),
        )
    )


@dataclass
class Redeemed:
    """A ticket that was valid; marked used."""

    device_id: str
    session_id: str
    account_id: int | None


@dataclass
class Refused:
    """Why a ticket was refused (forged, replayed, expired, other node, ...), for the audit."""

    reason: str
    device_id: str = ""
    account_id: int | None = None


def redeem(
    session: Session, *, ticket: str, node: str, peer: tuple[str, int], port: int
) -> Redeemed | Refused:
    """Check the ticket and mark it used, in one transaction (the caller's)."""
    row = session.scalar(
        select(DataConnection).where(DataConnection.ticket_hash == ticket_hash(ticket))
    )
    if row is None:
        return Refused("forged")
    device = session.get(Device, row.device_id)
    account_id = device.account_id if device is not None else None
    if row.used_at is not None:
        return Refused("replayed", row.device_id, account_id)
    now = utcnow()
    if row.expires_at <= now:
        return Refused("expired", row.device_id, account_id)
    if row.relay_node != node:
        return Refused(f"other node {row.relay_node}", row.device_id, account_id)
    if device is None or device.status != "accepted":
        return Refused("device not accepted", row.device_id, account_id)
    marked = session.execute(
        update(DataConnection)
        .where(DataConnection.id == row.id, DataConnection.used_at.is_(None))
        .values(used_at=now, peer_ip=peer[0][:64], peer_port=peer[1], transport_port=port)
    )
    if getattr(marked, "rowcount", 1) != 1:  # another process redeemed it first
        return Refused("replayed", row.device_id, account_id)
    return Redeemed(row.device_id, row.session_id, account_id)


@dataclass(eq=False)
class Waiter:
    """One session waiting for its data connection."""

    device_id: str
    arrived: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DataWaiters:
    """session id -> the session waiting on this process for its data connection."""

    def __init__(self) -> None:
        self._waiting: dict[str, Waiter] = {}

    def expect(self, session_id: str, device_id: str) -> Waiter:
        waiter = Waiter(device_id)
        self._waiting[session_id] = waiter
        return waiter

    def forget(self, session_id: str) -> None:
        """Stop waiting (a connection that already arrived was claimed and stays)."""
        waiter = self._waiting.pop(session_id, None)
        if waiter is not None and not waiter.arrived.done():
            waiter.arrived.cancel()

    def claim(self, session_id: str, device_id: str) -> Waiter | str:
        """The waiter for a redeemed ticket, or why there is none."""
        waiter = self._waiting.get(session_id)
        if waiter is None or waiter.arrived.done():
            return "no session waiting"
        if waiter.device_id != device_id:
            return "other device"
        del self._waiting[session_id]
        return waiter

    def __len__(self) -> int:
        return len(self._waiting)
