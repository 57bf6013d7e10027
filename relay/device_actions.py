"""The menu's `list`, `show`, `repair` and `close`: queries and actions, returning lines to print.

Every action is scoped to the approving user's account and audited; device
text is printed with control characters removed (lookups already strip them).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, session_close
from core.models import SshSession, Tunnel
from core.validate import strip_controls
from relay import device_lookup, session_rows
from relay.approval_gate import Identity
from relay.context import RelayContext
from relay.device_lookup import PAGE_SIZE, DeviceInfo, LookupFailure


def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "never"


def ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = int(max((datetime.now(UTC) - value).total_seconds(), 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def format_failure(failure: LookupFailure) -> list[str]:
    lines = [failure.error, failure.reason]
    lines += [f"  {d.id}  {d.hostname}  {d.serial}  {d.state}" for d in failure.candidates]
    return lines


async def list_lines(ctx: RelayContext, who: Identity, pattern: str, page: int) -> list[str]:
    rows, total = await ctx.db(
        lambda s: device_lookup.list_devices(
            s, account_id=who.account_id, pattern=pattern, page=page
        )
    )
    if total == 0:
        return ["No devices match." if pattern else "This account has no devices yet."]
    pages = (total + PAGE_SIZE - 1) // PAGE_SIZE
    header = (
        f"{'ID':<11} {'HOSTNAME':<24} {'SERIAL':<16} {'STATE':<8} {'LAST CHECK-IN':<21} OS / CLIENT"
    )
    lines = [header]
    for d in rows:
        os_text = f"{d.os_name} {d.os_version}".strip() or "-"
        lines.append(
            f"{d.id:<11} {d.hostname[:24]:<24} {d.serial[:16]:<16} {d.state:<8} "
            f"{when(d.last_checkin_at):<21} {os_text} / {d.client_version or '-'}"
        )
    shown = f"Page {min(page, pages)} of {pages} ({total} devices)."
    if page < pages:
        shown += f" Next: list {pattern + ' ' if pattern else ''}--page {page + 1}"
    if not rows:
        shown = f"There is no page {page}; {pages} page(s) of {total} devices."
    return [*lines, shown]


def show_lines(session: Session, device: DeviceInfo) -> list[str]:
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
            f"Tunnel: relay {tunnel.relay_node} port {tunnel.transport_port}, "
            f"since {when(tunnel.connected_at)}, "
            f"last keepalive {ago(tunnel.last_keepalive_at)} ago, "
            f"client {strip_controls(tunnel.client_version) or '-'}, "
            f"from {tunnel.peer_ip}:{tunnel.peer_port}"
        )
    rows = session.scalars(
        select(SshSession)
        .where(SshSession.device_id == device.id, SshSession.ended_at.is_(None))
        .order_by(SshSession.started_at)
    ).all()
    if not rows:
        lines.append("Sessions: none")
    for row in rows:
        lines.append(
            f"Session {row.id}: user {row.username}, from {row.client_ip}, "
            f"started {when(row.started_at)}, bytes up {row.bytes_up} down {row.bytes_down}, "
            f"idle {ago(row.last_activity_at)}"
        )
    return lines


async def close_session(ctx: RelayContext, who: Identity, session_id: str, ip: str) -> str | None:
    """Ask a session (on any relay) to end; None when no such open session in the account."""

    def run(session: Session) -> str | None:
        row = session_close.request_close(
            session,
            session_id=session_id,
            account_id=who.account_id,
            actor=who.username,
            source_ip=ip,
        )
        return row.id if row is not None else None

    closed = await ctx.db(run)
    if closed is not None:
        ctx.hub.notify(f"session:{closed}")
    return closed


async def close_tunnel(ctx: RelayContext, who: Identity, device: DeviceInfo, ip: str) -> str:
    local = ctx.tunnels.get(device.id)
    if local is not None:
        local.close(f"closed by {who.username}")
        outcome = f"Closed the tunnel of device {device.id}."
    elif device.online:
        await ctx.db(lambda s: session_rows.request_tunnel(s, device.id, "close"))
        ctx.hub.notify(f"device:{device.id}")
        outcome = f"Asked device {device.id} to close its tunnel (held by another relay)."
    else:
        outcome = f"Device {device.id} has no tunnel to close."
    await record(ctx, who, "tunnel.close_requested", device.id, outcome, ip)
    return outcome


async def repair(
    ctx: RelayContext, who: Identity, device: DeviceInfo, ip: str, say: Callable[[str], None]
) -> bool:
    """Drop a stale tunnel, ask the device to reconnect, wait for the new one; print each step."""
    old = ctx.tunnels.get(device.id)
    if old is not None:
        say(f"Step 1: dropping the current tunnel (since {when(old.connected_at)}).")
        old.close("repair")
    else:
        say("Step 1: no tunnel on this relay to drop.")
    say("Step 2: asking the device, through the tracker, to reconnect.")
    await ctx.db(lambda s: session_rows.request_tunnel(s, device.id, "reconnect"))
    ctx.hub.notify(f"device:{device.id}")
    timeout = ctx.settings.relay.connect_timeout
    say(f"Step 3: waiting up to {timeout:g} s for a new tunnel...")

    async def check() -> bool | None:
        tunnel = ctx.tunnels.get(device.id)
        return True if tunnel is not None and tunnel is not old else None

    ok = bool(await ctx.hub.wait_until(f"tunnel:{device.id}", check, timeout))
    result = "Repaired: a new tunnel is up." if ok else "Repair failed: no new tunnel came up."
    await record(ctx, who, "device.repair", device.id, result, ip)  # audited before it is told
    say(result)
    return ok


async def record(
    ctx: RelayContext, who: Identity, action: str, target: str, detail: str, ip: str
) -> None:
    def run(session: Session) -> None:
        audit.record(
            session,
            action=action,
            actor=who.username,
            account_id=who.account_id,
            target=target,
            detail=detail,
            source_ip=ip,
        )

    await ctx.db(run)
