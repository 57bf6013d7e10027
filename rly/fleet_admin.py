"""`rly relay list|drain|resume` and `rly device mode`: the fleet's admin commands (issue 11).

Kept apart from rly.admin (which registers these parsers and looks handlers
up here) so the fleet commands do not crowd it. Listing, drain and resume are
core.node_ops, shared with the portal's Relays page: a drain is a row change
plus an event; the node hears `node:<name>` at once (core.events) or at its
next heartbeat, and does the work itself (relay.drain).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from core import device_ops, devices, node_ops
from core.config import Settings, parse_duration
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
    p.add_argument(
        "--deadline",
        default=node_ops.DEFAULT_DEADLINE,
        help=f"then end live sessions (default {node_ops.DEFAULT_DEADLINE})",
    )
    common(p)
    p = group.add_parser("resume", help="take tunnels again after a drain")
    p.add_argument("node")
    common(p)
    p = device_group.add_parser("mode", help="set a device's tunnel mode")
    p.add_argument("id")
    p.add_argument("mode", choices=device_ops.TUNNEL_MODES)
    common(p)


def _relay_list(session: Session, _a: argparse.Namespace, _s: Settings) -> None:
    print(
        f"{'NODE':<20} {'STATE':<9} {'HEARTBEAT':<10} {'TUNNELS':>7} {'SESSIONS':>8}  "
        f"{'DEVICE ADDRESS':<28} {'TECHNICIAN':<22} STARTED"
    )
    for row in node_ops.node_rows(session):
        node, host = row.node, strip_controls(row.node.public_host)
        print(
            f"{strip_controls(node.name)[:20]:<20} {row.state:<9} "
            f"{f'{row.heartbeat_age:.0f}s ago':<10} {row.tunnels:>7} {row.sessions:>8}  "
            f"{(host + ':' + node.device_ports)[:28]:<28} "
            f"{(host + ':' + str(node.technician_port))[:22]:<22} "
            f"{node.started_at:%Y-%m-%d %H:%M:%S}"
        )


def _relay_drain(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    try:
        deadline = parse_duration(args.deadline)
    except ValueError as exc:
        raise InvalidInput(f"--deadline: {exc}") from None
    node = node_ops.drain_node(session, name=args.node, deadline=deadline, actor=ACTOR)
    assert node.drain_deadline is not None
    print(f"relay {node.name} draining: no new tunnels, devices move, sessions end by "
          f"{node.drain_deadline:%H:%M:%S} UTC; watch it with: rly relay list")  # fmt: skip


def _relay_resume(session: Session, args: argparse.Namespace, _s: Settings) -> None:
    node = node_ops.resume_node(session, name=args.node, actor=ACTOR)
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
