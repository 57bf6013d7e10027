"""Device list and device page queries, scoped to what the viewer may see.

A device's state is one word: `online` (accepted, an open tunnel), `offline`
(accepted, checked in before, no tunnel), `never` (accepted, never checked in
and no tunnel), `pending` or `revoked`. Search and filter run in SQL so a
fleet of thousands pages cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, exists, func, not_, or_, select
from sqlalchemy.orm import Session

from approval_portal.auth import Viewer
from core.models import Account, AuditEvent, Device, SshSession, Tunnel, utcnow

PAGE_SIZE = 25
STATES = ("online", "offline", "never", "pending", "revoked")
STATE_LABELS = {
    "online": "online",
    "offline": "offline",
    "never": "never checked in",
    "pending": "pending",
    "revoked": "revoked",
}


@dataclass(frozen=True)
class DeviceRow:
    device: Device
    account: str
    state: str
    tunnel: Tunnel | None


def scope(viewer: Viewer, column: Any) -> list[ColumnElement[bool]]:
    """Superadmins see every account; everyone else only their own."""
    return [] if viewer.is_superadmin else [column == viewer.account_id]


def _has_tunnel(relay: str = "") -> ColumnElement[bool]:
    """An open tunnel (held by node `relay`, when given)."""
    on_node = [Tunnel.relay_node == relay] if relay else []
    return exists(
        select(Tunnel.id).where(Tunnel.device_id == Device.id, Tunnel.closed_at.is_(None), *on_node)
    )


def _state_filter(state: str) -> list[ColumnElement[bool]]:
    accepted = Device.status == "accepted"
    if state == "online":
        return [accepted, _has_tunnel()]
    if state == "offline":
        return [accepted, not_(_has_tunnel()), Device.last_checkin_at.is_not(None)]
    if state == "never":
        return [accepted, not_(_has_tunnel()), Device.last_checkin_at.is_(None)]
    if state in ("pending", "revoked"):
        return [Device.status == state]
    return []


def _search(text: str) -> list[ColumnElement[bool]]:
    text = text.strip()[:128]
    if not text:
        return []
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    like = f"%{escaped}%"
    return [
        or_(
            Device.id.ilike(like, escape="\\"),
            Device.hostname.ilike(like, escape="\\"),
            Device.serial.ilike(like, escape="\\"),
        )
    ]


def state_of(device: Device, tunnel: Tunnel | None) -> str:
    if device.status != "accepted":
        return device.status
    if tunnel is not None:
        return "online"
    return "offline" if device.last_checkin_at is not None else "never"


def open_tunnels(session: Session, ids: list[str]) -> dict[str, Tunnel]:
    rows = session.scalars(
        select(Tunnel)
        .where(Tunnel.closed_at.is_(None), Tunnel.device_id.in_(ids))
        .order_by(Tunnel.connected_at)
    )
    return {t.device_id: t for t in rows}  # the newest open one wins


def device_page(
    session: Session, viewer: Viewer, *, search: str, state: str, page: int, relay: str = ""
) -> tuple[list[DeviceRow], int]:
    """One page of matching devices (pending first, then by hostname) and the match count.

    `relay` keeps the devices whose open tunnel that node holds (the Relays page links it).
    """
    where = [*scope(viewer, Device.account_id), *_search(search), *_state_filter(state)]
    if relay:
        where.append(_has_tunnel(relay[:64]))
    total = session.scalar(select(func.count()).select_from(Device).where(*where))
    rows = session.execute(
        select(Device, Account.name)
        .join(Account, Account.id == Device.account_id)
        .where(*where)
        .order_by((Device.status == "pending").desc(), Device.hostname, Device.id)
        .offset((page - 1) * PAGE_SIZE)
        .limit(PAGE_SIZE)
    ).all()
    tunnels = open_tunnels(session, [d.id for d, _ in rows])
    result = [
        DeviceRow(d, name, state_of(d, tunnels.get(d.id)), tunnels.get(d.id)) for d, name in rows
    ]
    return result, int(total or 0)


def visible_device(session: Session, viewer: Viewer, device_id: str) -> Device | None:
    device = session.get(Device, device_id[:32])
    if device is None or (not viewer.is_superadmin and device.account_id != viewer.account_id):
        return None
    return device


def device_sessions(session: Session, device_id: str, limit: int = 20) -> list[SshSession]:
    return list(
        session.scalars(
            select(SshSession)
            .where(SshSession.device_id == device_id)
            .order_by(SshSession.ended_at.is_(None).desc(), SshSession.started_at.desc())
            .limit(limit)
        )
    )


def device_audit(session: Session, device_id: str, limit: int = 20) -> list[AuditEvent]:
    return list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.target == device_id)
            .order_by(AuditEvent.id.desc())
            .limit(limit)
        )
    )


def not_checking_in(session: Session, viewer: Viewer, stale_after: float) -> list[DeviceRow]:
    """Accepted devices without a tunnel whose last check-in is older than `stale_after` s."""
    cutoff = utcnow() - timedelta(seconds=stale_after)
    rows = session.execute(
        select(Device, Account.name)
        .join(Account, Account.id == Device.account_id)
        .where(
            *scope(viewer, Device.account_id),
            Device.status == "accepted",
            not_(_has_tunnel()),
            or_(Device.last_checkin_at.is_(None), Device.last_checkin_at < cutoff),
        )
        .order_by(Device.last_checkin_at.desc())
        .limit(10)
    ).all()
    return [DeviceRow(d, name, state_of(d, None), None) for d, name in rows]
