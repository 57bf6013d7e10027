"""The menu's `repair` and `close`: actions, returning lines to print (`list` and `show`
are relay.technician.device_listing).

Every action is scoped to the approving user's account and audited; device
text is printed with control characters removed (lookups already strip them).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from core import audit, session_close
from core.models import utcnow
from relay.context import RelayContext
from relay.node import tunnel_node_since
from relay.session import rows
from relay.technician.approval_gate import Identity
from relay.technician.device_lookup import DeviceInfo, LookupFailure


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
        await ctx.db(lambda s: rows.request_tunnel(s, device.id, "close"))
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
    asked = utcnow()
    await ctx.db(lambda s: rows.request_tunnel(s, device.id, "reconnect"))
    ctx.hub.notify(f"device:{device.id}")
    timeout = ctx.settings.relay.connect_timeout
    say(f"Step 3: waiting up to {timeout:g} s for a new tunnel...")

    async def check() -> bool | None:
        tunnel = ctx.tunnels.get(device.id)
        if tunnel is not None and tunnel is not old:
            return True
        # placement may bring it back on another relay of the fleet (relay.node)
        return True if await ctx.db(lambda s: tunnel_node_since(s, device.id, asked)) else None

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
