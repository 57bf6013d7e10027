"""Which relays a device should use, in order: rendezvous (HRW) hashing over live nodes.

Each device ranks every node that takes tunnels (live, not draining, not
silent) by a hash of (node, device) and dials them in that order. Adding or
losing a node moves only the devices whose first choice it is or becomes;
everyone else keeps their relay. The node list is read at most every
REFRESH seconds per tracker process, off the check-in fast path, so a
check-in pays a few hashes, not a query.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.fleet import takes_tunnels
from core.models import RelayNode, Tunnel, utcnow
from tracker.schemas import RelayChoice

log = logging.getLogger(__name__)
REFRESH = 2.0
_t = cast(Table, Tunnel.__table__).c
# an `open` request for a device that holds a tunnel on any node is dropped, not sent
HOLDS_TUNNEL = (
    select(_t.id).where(_t.device_id == bindparam("p_id"), _t.closed_at.is_(None)).limit(1)
)


@dataclass(frozen=True)
class NodeEndpoint:
    name: str
    host: str
    ports: tuple[int, ...]


def score(node: str, device_id: str) -> int:
    digest = hashlib.blake2b(f"{node}\n{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(device_id: str, nodes: list[NodeEndpoint]) -> list[NodeEndpoint]:
    """The nodes in this device's order: highest (node, device) hash first."""
    return sorted(nodes, key=lambda n: (score(n.name, device_id), n.name), reverse=True)


def read_nodes(session: Session) -> list[NodeEndpoint]:
    """Every node that may take a tunnel now, with its host and device ports."""
    now = utcnow()
    found = []
    for node in session.scalars(select(RelayNode).order_by(RelayNode.name)):
        ports = tuple(node.port_list)
        if takes_tunnels(node, now) and node.public_host and ports:
            found.append(NodeEndpoint(node.name, node.public_host, ports))
    return found


def enroll_endpoints(session: Session, device_id: str) -> tuple[list[str], list[int]] | None:
    """Relay hosts in this device's order and their ports, for the enroll answer; None: no node."""
    ranked = rank(device_id, read_nodes(session))
    if not ranked:
        return None
    hosts = list(dict.fromkeys(n.host for n in ranked))
    return hosts, list(dict.fromkeys(p for n in ranked for p in n.ports))


@dataclass
class Placement:
    sessions: sessionmaker[Session]
    _nodes: list[NodeEndpoint] = field(default_factory=list)
    _choices: dict[str, RelayChoice] = field(default_factory=dict)  # built once per read
    _read_at: float = -REFRESH
    _refreshing: asyncio.Task[None] | None = None

    async def relays_for(self, device_id: str) -> list[RelayChoice] | None:
        """The device's relays in order; None (keep your list) when no node is registered."""
        if time.monotonic() - self._read_at >= REFRESH:
            await self._refresh()
        if not self._nodes:
            return None
        return [self._choices[n.name] for n in rank(device_id, self._nodes)]

    async def _refresh(self) -> None:
        """One read for all check-ins arriving meanwhile; a failed read keeps the old list."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read())
        await asyncio.shield(self._refreshing)

    async def _read(self) -> None:
        def run() -> list[NodeEndpoint]:
            with self.sessions() as session:
                return read_nodes(session)

        try:
            self._nodes = await asyncio.to_thread(run)
            self._choices = {
                n.name: RelayChoice(host=n.host, ports=list(n.ports)) for n in self._nodes
            }
        except SQLAlchemyError as exc:  # the check-in itself decides whether the database is up
            log.warning("placement: cannot read relay nodes: %s", type(exc).__name__)
        finally:
            self._read_at = time.monotonic()
