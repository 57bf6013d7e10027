"""`rly relay list|drain|resume` and `rly device mode`: the fleet's admin commands (issue 11).

Kept apart from rly.admin (which registers these parsers and looks handlers
up here) so the fleet commands do not crowd it. A drain is a row change plus
an event: the node hears `node:<name>` at once (core.events) or at its next
heartbeat, and does the work itself (relay.drain).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import audit, device_ops, devices
from core.config import Settings, parse_duration
from core.events import publish
from core.fleet import node_state
from core.models import RelayNode, SshSession, Tunnel, utcnow
from core.validate import InvalidInput, strip_controls

ACTOR = "cli"
Common = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[Session, argparse.Namespace, Settings], int | None]


def add_parsers(sub: Any, device_group: Any, common: Common) -> None:
    """`relay …` as a new group; `device mode` on the device group rly.admin made."""
    relay = sub.add_parser("relay", help="relay nodes of a multi-node fleet")
    group = relay.add_subparsers(dest="action", required=True)
    common(group.add_parser("list", help="nodes, heartbeat age, state, tunnels, sessions"))
    p = group.add_parser("drain", help="move a node's devices away and let its sessions end")
    p.add_argument("node")
    p.add_argument("--deadline", default="10m", help="then end live sessions (default 10m)")
    common(p)
    p = group.add_parser("resume", help="take tunnels again after a drain")
    p.add_argument("node")
    common(p)
    p = device_group.add_parser("mode", help="set a device's tunnel mode")
    p.add_argument("id")
    p.add_argument("mode", choices=device_ops.TUNNEL_MODES)
    common(p)


def _relay_list(session: Session, _a: argparse.Namespace, _s: Settings) -> None:
    now = utcnow()
    tunnels = _open_counts(session, Tunnel.relay_node, Tunnel.closed_at)
    live = _open_counts(session, SshSession.relay_node, SshSession.ended_at)
    print(
        f"{'NODE':<20} {'STATE':<9} {'HEARTBEAT':<10} {'TUNNELS':>7} {'SESSIONS':>8}  "
        f"{'DEVICE ADDRESS':<28} {'TECHNICIAN':<22} STARTED"
    )
    for node in session.scalars(select(RelayNode).order_by(RelayNode.name)):
        state = node_state(node, now, tunnels.get(node.name, 0), live.get(node.name, 0))
        age = f"{(now - node.last_seen_at).total_seconds():.0f}s ago"
        host = strip_controls(node.public_host)
        print(
            f"{strip_controls(node.name)[:20]:<20} {state:<9} {age:<10} "
            f"{tunnels.get(node.name, 0):>7} {live.get(node.name, 0):>8}  "
            f"{(host + ':' + node.device_ports)[:28]:<28} "
            f"{(host + ':' + str(node.technician_port))[:22]:<22} "
            f"{node.started_at:%Y-%m-%d %H:%M:%S}"
        )


def _open_counts(session: Session, node_col: Any, end_col: Any) -> dict[str, int]:
    rows = session.execute(
        select(node_col, func.count()).where(end_col.is_(None)).group_by(node_col)
    )
    return {str(name): int(count) for name, count in rows}


def _node(session: Session, name: str) -> RelayNode:
    node = session.get(RelayNode, name)
    if node is None:
        raise InvalidInput(f"relay node {name!r} is not registered (see rly relay list)")
    return node


def _relay_drain(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    try:
        deadline = parse_duration(args.deadline)
    except ValueError as exc:
        raise InvalidInput(f"--deadline: {exc}") from None
    node = _node(session, args.node)
    if node.gone_at is not None:
        raise InvalidInput(f"relay node {node.name} is gone: nothing to drain")
    if node.state == "draining":
        raise InvalidInput(f"relay node {node.name} is already draining")
    node.state = "draining"
    node.drain_deadline = utcnow() + timedelta(seconds=deadline)
    audit.record(
        session,
        action="relay.drain",
        actor=ACTOR,
        target=node.name,
        detail=f"deadline={args.deadline}",
    )
    publish(session, f"node:{node.name}")
    print(f"relay {node.name} draining: no new tunnels, devices move, sessions end by "
          f"{node.drain_deadline:%H:%M:%S} UTC; watch it with: rly relay list")  # fmt: skip


def _relay_resume(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    node = _node(session, args.node)
    if node.state != "draining":
        raise InvalidInput(f"relay node {node.name} is not draining")
    node.state, node.drain_deadline = "live", None
    audit.record(session, action="relay.resume", actor=ACTOR, target=node.name)
    publish(session, f"node:{node.name}")
    print(f"relay {node.name} takes tunnels again")


def _device_mode(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    device = devices.get_device(session, args.id)
    device_ops.set_tunnel_mode(session, device=device, mode=args.mode, actor=ACTOR)
    print(f"device {device.id} tunnel mode {args.mode}")


HANDLERS: dict[tuple[str, str | None], Handler] = {
    ("relay", "list"): _relay_list,
    ("relay", "drain"): _relay_drain,
    ("relay", "resume"): _relay_resume,
    ("device", "mode"): _device_mode,
}
