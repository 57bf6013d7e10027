"""Database writes of a device session: its row, audit events, host key pin, tunnel request.

Each function is one short transaction; the device session calls them at its
start, every ~30 s while active (never per byte) and at its end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.orm import Session

from core import audit, metrics
from core.devices import request_tunnel as core_request_tunnel
from core.models import Device, SshSession, utcnow
from core.session_close import CLOSED_BY_REQUEST, close_reason
from core.validate import new_id
from relay.context import RelayContext
from relay.technician.approval_gate import Identity

if TYPE_CHECKING:
    from relay.session.bridge import Traffic
    from relay.session.device_session import Outcome


def request_tunnel(session: Session, device_id: str, request: str) -> None:
    device = session.get(Device, device_id)
    if device is not None:
        core_request_tunnel(session, device, request)


def device_revoked(session: Session, device_id: str) -> bool:
    """The device is no longer accepted (revoked, disabled, deleted): its sessions must end."""
    device = session.get(Device, device_id)
    return device is None or device.status != "accepted"


def pin_host_key(session: Session, device_id: str, key_line: str) -> None:
    """Trust on first use: only when no key is pinned yet (enrollment may have sent one)."""
    session.execute(
        update(Device)
        .where(Device.id == device_id, Device.target_host_key.is_(None))
        .values(target_host_key=key_line)
    )


async def start(
    ctx: RelayContext,
    identity: Identity,
    device_id: str,
    client_ip: str,
    traffic: Traffic | None = None,
    *,
    session_id: str | None = None,
    path: str = "tunnel",
) -> str:
    """Write the session row; with `traffic`, `show` reads its live byte counts until `end`.

    `path` is how the session reaches the device: `data` or `tunnel` (row and audit).
    """
    session_id = session_id or new_id()

    def run(session: Session) -> None:
        session.add(
            SshSession(
                id=session_id,
                approval_id=identity.approval_id,
                user_id=identity.user_id,
                username=identity.username,
                account_id=identity.account_id,
                device_id=device_id,
                relay_node=ctx.node_name,
                client_ip=client_ip,
                path=path,
            )
        )
        audit.record(
            session,
            action="session.start",
            actor=identity.username,
            account_id=identity.account_id,
            target=device_id,
            detail=f"session={session_id} path={path}",
            source_ip=client_ip,
        )

    await ctx.db(run)
    metrics.inc("rly_sessions_total")
    if traffic is not None:
        ctx.live.add(session_id, traffic)
    return session_id


async def end(
    ctx: RelayContext,
    session_id: str,
    identity: Identity,
    traffic: Traffic,
    outcome: Outcome,
    recording_path: str | None,
) -> None:
    ctx.live.remove(session_id)  # first: a failed write below must not leave it listed

    def run(session: Session) -> None:
        row = session.get(SshSession, session_id)
        if row is None:
            return
        row.ended_at = utcnow()
        row.last_activity_at = row.ended_at
        row.end_reason = outcome.reason[:128]
        row.bytes_up = traffic.up
        row.bytes_down = traffic.down
        row.recording_path = recording_path
        audit.record(
            session,
            action="session.end",
            actor=identity.username,
            account_id=identity.account_id,
            target=row.device_id,
            detail=(
                f"session={session_id} bytes_up={traffic.up} bytes_down={traffic.down} "
                f"reason={outcome.reason}"
            ),
            source_ip=row.client_ip,
        )

    await ctx.db(run)


async def set_path(ctx: RelayContext, session_id: str, path: str) -> None:
    """The session fell back from its data connection to the tunnel."""
    await ctx.db(
        lambda s: s.execute(update(SshSession).where(SshSession.id == session_id).values(path=path))
    )


async def poll(ctx: RelayContext, session_id: str, traffic: Traffic | None) -> str | None:
    """Why to close (e.g. "closed by alice (portal)"), or None to go on.

    With `traffic`, also records activity and byte counts.
    """

    def run(session: Session) -> str | None:
        row = session.get(SshSession, session_id)
        if row is None:
            return CLOSED_BY_REQUEST
        if traffic is not None:
            row.last_activity_at = utcnow()
            row.bytes_up, row.bytes_down = traffic.up, traffic.down
        return close_reason(row) if row.close_requested else None

    return await ctx.db(run)


async def host_key_mismatch(ctx: RelayContext, identity: Identity, device_id: str) -> None:
    def run(session: Session) -> None:
        audit.record(
            session,
            action="device.host_key_mismatch",
            actor=identity.username,
            account_id=identity.account_id,
            target=device_id,
            detail="target host key differs from the pinned key; connection refused",
        )

    await ctx.db(run)
