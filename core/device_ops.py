"""Portal-side device actions that any relay carries out: tunnel mode, repair, close tunnel.

Each is a row change plus an audit row. The relay holding the tunnel and the
tracker answering the device's long poll both watch `device:<id>` (the
portal's hub in-process, core.feed across processes via `tunnel_request_at`):
a `reconnect` request newer than the tunnel's login drops it and the device
dials again (the menu's `repair`); `close` drops it (a persistent device
comes back, an on-demand one stays idle), the menu's `close DEVICE`.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from core import audit
from core.devices import request_tunnel
from core.events import publish
from core.models import Device, utcnow
from core.validate import InvalidInput

TUNNEL_MODES = ("persistent", "on-demand")


def _record(
    session: Session, device: Device, action: str, actor: str, detail: str, ip: str
) -> None:
    audit.record(
        session,
        action=action,
        actor=actor,
        account_id=device.account_id,
        target=device.id,
        detail=detail,
        source_ip=ip,
    )


def set_tunnel_mode(
    session: Session, *, device: Device, mode: str, actor: str, source_ip: str = ""
) -> None:
    if mode not in TUNNEL_MODES:
        raise InvalidInput(f"tunnel mode must be one of {', '.join(TUNNEL_MODES)}")
    if device.tunnel_mode == mode:
        raise InvalidInput(f"device {device.id} is already {mode}")
    old, device.tunnel_mode = device.tunnel_mode, mode
    device.tunnel_request_at = utcnow()  # wakes the device's long poll in every process
    publish(session, f"device:{device.id}")
    _record(session, device, "device.tunnel_mode", actor, f"mode={mode} was={old}", source_ip)


def request_repair(session: Session, *, device: Device, actor: str, source_ip: str = "") -> None:
    if device.status != "accepted":
        raise InvalidInput(f"device {device.id} is {device.status}: nothing to repair")
    request_tunnel(session, device, "reconnect")
    _record(session, device, "device.repair", actor, "asked the device to reconnect", source_ip)


def request_close_tunnel(
    session: Session, *, device: Device, actor: str, source_ip: str = ""
) -> None:
    request_tunnel(session, device, "close")
    _record(
        session, device, "tunnel.close_requested", actor, "asked to close the tunnel", source_ip
    )
