"""Who may hold a tunnel: the device's stored key, its status and the account allowlist.

One read gives a `DeviceView` (a detached snapshot), so the SSH hooks decide
without touching the database again and the live watcher can re-decide from
a fresh read with the same rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import asyncssh
from sqlalchemy.orm import Session

from core import validate
from core.devices import address_allowed, allowlist_for
from core.models import Device

log = logging.getLogger(__name__)

# Requests the tracker passes to a device that also mean "drop the tunnel you hold".
DROP_REQUESTS = {"reconnect": "tunnel reconnect requested", "close": "tunnel close requested"}


@dataclass(frozen=True, slots=True)
class DeviceView:
    id: str
    account_id: int
    status: str
    public_key: str
    cidrs: tuple[str, ...]
    tunnel_request: str | None
    tunnel_request_at: datetime | None


def valid_device_id(username: str) -> bool:
    try:
        validate.device_id(username)
    except validate.InvalidInput:
        return False
    return True


def load_device(session: Session, device_id: str) -> DeviceView | None:
    """The device and its account's allowlist, or None if there is no such device."""
    device = session.get(Device, device_id)
    if device is None:
        return None
    return DeviceView(
        id=device.id,
        account_id=device.account_id,
        status=device.status,
        public_key=device.public_key,
        cidrs=tuple(allowlist_for(session, device.account_id)),
        tunnel_request=device.tunnel_request,
        tunnel_request_at=device.tunnel_request_at,
    )


def key_matches(view: DeviceView, offered: asyncssh.SSHKey) -> bool:
    """True if the offered key is the stored one (whole key blob, not a fingerprint)."""
    try:
        stored = asyncssh.import_public_key(view.public_key)
    except (asyncssh.KeyImportError, ValueError):
        log.warning("device %s has an unreadable stored public key", view.id)
        return False
    return bool(stored.public_data == offered.public_data)


def refusal(view: DeviceView, peer_ip: str) -> str | None:
    """Why this device may not hold a tunnel from peer_ip now, or None if it may."""
    if view.status == "pending":
        return "pending"
    if view.status != "accepted":
        return view.status  # "revoked", or any status we do not know
    if not address_allowed(list(view.cidrs), peer_ip):
        return "address not allowed"
    return None


def drop_reason(view: DeviceView | None, peer_ip: str, since: datetime) -> str | None:
    """Why a live tunnel must go now (the watcher's rule), or None to keep it.

    A reconnect/close request counts only if made after `since` (the tunnel's
    login): a request the device has not picked up yet must not kill the very
    tunnel it opened in answer, or a plain OpenSSH device would loop.
    """
    if view is None:
        return "device deleted"
    reason = refusal(view, peer_ip)
    if reason == "revoked":
        return "device revoked"
    if reason is not None:
        return f"device {reason}"
    drop = DROP_REQUESTS.get(view.tunnel_request or "")
    if drop and view.tunnel_request_at is not None and view.tunnel_request_at > since:
        return drop
    return None
