"""The menu's `list` and `show`: what they print, as lines.

`list` prints every id, hostname and serial whole (columns as wide as the
page needs), so any value shown can be typed to `connect`. `show` takes a
session's byte counts from this relay's live counters when the relay holds the
session (the row is written only every ~30 s) and from the database otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data_wire import data_capable
from core.models import DataConnection, SshSession, Tunnel
from core.validate import strip_controls
from relay.context import RelayContext
from relay.peering.dial_back import dial_back_possible
from relay.peering.route import way_line
from relay.session.live_sessions import LiveCounts
from relay.technician import device_lookup
from relay.technician.approval_gate import Identity
from relay.technician.device_actions import ago, when
from relay.technician.device_lookup import PAGE_SIZE, DeviceInfo

LIST_COLUMNS = ("ID", "HOSTNAME", "SERIAL", "STATE", "LAST CHECK-IN", "OS / CLIENT")


async def list_lines(ctx: RelayContext, who: Identity, pattern: str, page: int) -> list[str]:
    rows, total = await ctx.db(
        lambda s: device_lookup.list_devices(
            s, account_id=who.account_id, pattern=pattern, page=page
        )
    )
    if total == 0:
        return ["No devices match." if pattern else "This account has no devices yet."]
    pages = (total + PAGE_SIZE - 1) // PAGE_SIZE
    if not rows:
        return [f"There is no page {page}; {pages} page(s) of {total} devices."]
    table = [_row(d) for d in rows]
    shown = f"Page {page} of {pages} ({total} devices)."
    if page < pages:
        shown += f" Next: list {pattern + ' ' if pattern else ''}--page {page + 1}"
    return [*_columns([LIST_COLUMNS, *table]), shown]


def _row(d: DeviceInfo) -> tuple[str, ...]:
    os_text = f"{d.os_name} {d.os_version}".strip() or "-"
    client = d.client_version or "-"
    return (
        d.id,
        d.hostname,
        d.serial or "-",
        d.state,
        when(d.last_checkin_at),
        f"{os_text} / {client}",
    )


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell; nothing is cut."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        " ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


async def show_lines(ctx: RelayContext, device: DeviceInfo) -> list[str]:
    live = ctx.live.snapshot(asyncio.get_running_loop().time())
    dial_back = dial_back_possible(ctx, device.id)
    return await ctx.db(lambda s: _show(s, device, ctx.node_name, live, dial_back))


def _show(
    session: Session,
    device: DeviceInfo,
    node: str,
    live: Mapping[str, LiveCounts],
    dial_back: bool = False,
) -> list[str]:
    lines = [f"Device {device.id} ({device.hostname}, serial {device.serial}): {device.state}"]
    tunnel = session.scalar(
        select(Tunnel)
        .where(Tunnel.device_id == device.id, Tunnel.closed_at.is_(None))
        .order_by(Tunnel.connected_at.desc())
    )
    if tunnel is None:
        lines.append("Tunnel: none")
    else:
        lines.append(
            f"Tunnel: relay {tunnel.relay_node} port {tunnel.transport_port} "
            f"over {tunnel.transport}, "
            f"since {when(tunnel.connected_at)}, "
            f"last keepalive {ago(tunnel.last_keepalive_at)} ago, "
            f"client {strip_controls(tunnel.client_version) or '-'}, "
            f"from {tunnel.peer_ip}:{tunnel.peer_port}"
        )
        if tunnel.relay_node != node:
            can_dial = dial_back and data_capable(tunnel.client_version)
            lines.append(way_line(session, tunnel.relay_node, node, dial_back=can_dial))
    rows = session.scalars(
        select(SshSession)
        .where(SshSession.device_id == device.id, SshSession.ended_at.is_(None))
        .order_by(SshSession.started_at)
    ).all()
    if not rows:
        lines.append("Sessions: none")
    for row in rows:
        counts = live.get(row.id) if row.relay_node == node else None
        if counts is not None:
            up, down = counts.up, counts.down
            idle = "-" if counts.idle is None else _seconds(counts.idle)
        else:
            up, down, idle = row.bytes_up, row.bytes_down, ago(row.last_activity_at)
        lines.append(
            f"Session {row.id}: user {row.username}, from {row.client_ip}, "
            f"started {when(row.started_at)}, bytes up {up} down {down}, idle {idle}"
            f"{_path(session, row)}"
        )
    return lines


def _path(session: Session, row: SshSession) -> str:
    """How the session reaches the device: its data connection's peer, or the tunnel."""
    if row.path not in ("data", "dial-back"):
        return f", path {row.path}"
    data = session.scalar(
        select(DataConnection).where(
            DataConnection.session_id == row.id, DataConnection.used_at.is_not(None)
        )
    )
    peer = f"{data.peer_ip}:{data.peer_port}" if data is not None else "-"
    return f", path {row.path}, data connection from {peer}"


def _seconds(value: float) -> str:
    seconds = int(value)
    if seconds < 120:
        return f"{seconds}s"
    return f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"
