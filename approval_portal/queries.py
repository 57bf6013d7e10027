"""Read-only queries behind the list pages, scoped to what the viewer may see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from approval_portal.auth import Viewer
from core.models import Account, AllowlistEntry, AuditEvent, Device, SshSession, Tunnel

PAGE_LIMIT = 500


@dataclass(frozen=True)
class DeviceRow:
    device: Device
    account: str
    state: str  # online | offline | pending | revoked


def _scope(viewer: Viewer, column: Any) -> list[Any]:
    """Superadmins see every account; everyone else only their own."""
    return [] if viewer.is_superadmin else [column == viewer.account_id]


def device_rows(session: Session, viewer: Viewer) -> list[DeviceRow]:
    rows = session.execute(
        select(Device, Account.name)
        .join(Account, Account.id == Device.account_id)
        .where(*_scope(viewer, Device.account_id))
        .order_by(Device.status, Device.hostname)
        .limit(PAGE_LIMIT)
    ).all()
    ids = [device.id for device, _ in rows]
    online = set(
        session.scalars(
            select(Tunnel.device_id).where(Tunnel.closed_at.is_(None), Tunnel.device_id.in_(ids))
        )
    )
    return [DeviceRow(device, name, _state(device, device.id in online)) for device, name in rows]


def _state(device: Device, has_tunnel: bool) -> str:
    if device.status != "accepted":
        return device.status
    return "online" if has_tunnel else "offline"


def visible_device(session: Session, viewer: Viewer, device_id: str) -> Device | None:
    device = session.get(Device, device_id[:32])
    if device is None or (not viewer.is_superadmin and device.account_id != viewer.account_id):
        return None
    return device


def ssh_sessions(session: Session, viewer: Viewer) -> list[SshSession]:
    return list(
        session.scalars(
            select(SshSession)
            .where(*_scope(viewer, SshSession.account_id))
            .order_by(SshSession.started_at.desc())
            .limit(PAGE_LIMIT)
        )
    )


def audit_events(session: Session, viewer: Viewer) -> list[AuditEvent]:
    return list(
        session.scalars(
            select(AuditEvent)
            .where(*_scope(viewer, AuditEvent.account_id))
            .order_by(AuditEvent.id.desc())
            .limit(PAGE_LIMIT)
        )
    )


def allowlist(session: Session, account_id: int) -> list[AllowlistEntry]:
    return list(
        session.scalars(
            select(AllowlistEntry)
            .where(AllowlistEntry.account_id == account_id)
            .order_by(AllowlistEntry.cidr)
        )
    )
