"""Relay node operations shared by `rly relay list|drain|resume` and the portal's Relays page.

Listing counts each node's open tunnel and session rows (not the load its
last heartbeat reported, which may be seconds old) and names its state with
core.fleet.node_state. Drain and resume are a row change, an audit row and
the event `node:<name>`: the node hears it at once (core.events on
PostgreSQL, the hub in one process) or at its next look, and does the work
itself (relay.drain). `account_id` only files the audit row where the
acting portal admin's audit page shows it: a node serves every account.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import audit
from core.events import publish
from core.fleet import node_state
from core.models import RelayNode, SshSession, Tunnel, utcnow
from core.validate import NAME_RE, InvalidInput, matches

DEFAULT_DEADLINE = "10m"  # `rly relay drain --deadline` and the portal's form
MAX_DEADLINE = timedelta(days=7)


@dataclass(frozen=True)
class NodeRow:
    node: RelayNode
    state: str  # live, draining, drained or gone (core.fleet.node_state)
    tunnels: int
    sessions: int
    heartbeat_age: float  # seconds since the node's last heartbeat


def open_counts(session: Session, node_col: Any, end_col: Any) -> dict[str, int]:
    """{node name: rows still open}, e.g. (Tunnel.relay_node, Tunnel.closed_at)."""
    rows = session.execute(
        select(node_col, func.count()).where(end_col.is_(None)).group_by(node_col)
    )
    return {str(name): int(count) for name, count in rows}


def node_rows(session: Session, now: datetime | None = None) -> list[NodeRow]:
    """Every registered node by name, with its state, open tunnels and live sessions."""
    now = now or utcnow()
    tunnels = open_counts(session, Tunnel.relay_node, Tunnel.closed_at)
    live = open_counts(session, SshSession.relay_node, SshSession.ended_at)
    rows = []
    for node in session.scalars(select(RelayNode).order_by(RelayNode.name)):
        up, busy = tunnels.get(node.name, 0), live.get(node.name, 0)
        age = (now - node.last_seen_at).total_seconds()
        rows.append(NodeRow(node, node_state(node, now, up, busy), up, busy, age))
    return rows


def get_node(session: Session, name: str) -> RelayNode:
    """The registered node called `name`; a bad or unknown name is one line of InvalidInput."""
    node = session.get(RelayNode, name) if 0 < len(name) <= 64 else None
    if node is None:  # a malformed name is refused without being echoed
        matches(name, NAME_RE, field="relay node name", hint="letters, digits, '.', '_' or '-'")
        raise InvalidInput(f"relay node {name!r} is not registered (see rly relay list)")
    return node


def drain_node(
    session: Session,
    *,
    name: str,
    deadline: float,
    actor: str,
    source_ip: str = "",
    account_id: int | None = None,
) -> RelayNode:
    """Mark the node draining; its live sessions are ended `deadline` seconds from now."""
    if not 0 <= deadline <= MAX_DEADLINE.total_seconds():
        raise InvalidInput(f"the drain deadline must be between 0s and {MAX_DEADLINE.days} days")
    node = get_node(session, name)
    if node.gone_at is not None:
        raise InvalidInput(f"relay node {node.name} is gone: nothing to drain")
    if node.state == "draining":
        raise InvalidInput(f"relay node {node.name} is already draining")
    node.state = "draining"
    node.drain_deadline = utcnow() + timedelta(seconds=deadline)
    audit.record(
        session,
        action="relay.drain",
        actor=actor,
        account_id=account_id,
        target=node.name,
        detail=f"deadline={deadline:g}s",
        source_ip=source_ip,
    )
    publish(session, f"node:{node.name}")
    return node


def resume_node(
    session: Session,
    *,
    name: str,
    actor: str,
    source_ip: str = "",
    account_id: int | None = None,
) -> RelayNode:
    """End a drain: the node takes tunnels again."""
    node = get_node(session, name)
    if node.state != "draining":
        raise InvalidInput(f"relay node {node.name} is not draining")
    node.state, node.drain_deadline = "live", None
    audit.record(
        session,
        action="relay.resume",
        actor=actor,
        account_id=account_id,
        target=node.name,
        source_ip=source_ip,
    )
    publish(session, f"node:{node.name}")
    return node
