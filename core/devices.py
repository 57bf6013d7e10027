"""Devices, enrollment tokens and allowlists: the data functions admins call."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit
from core.events import publish
from core.models import AllowlistEntry, Device, EnrollToken, Tunnel, utcnow
from core.validate import InvalidInput

ENROLL_TOKEN_PREFIX = "rlyet_"  # noqa: S105 (a public prefix, not a secret)
"""Tokens start with a fixed prefix: never with "-" (argparse would read one as an option,
as token_urlsafe can produce), and secret scanners can recognise a leaked one."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_enroll_token(
    session: Session, *, account_id: int, auto_accept: bool, uses: int, ttl: float, actor: str
) -> str:
    """Return the token once; only its hash is stored."""
    if uses < 1:
        raise InvalidInput("--uses must be at least 1")
    if ttl <= 0:
        raise InvalidInput("--ttl must be positive")
    token = ENROLL_TOKEN_PREFIX + secrets.token_urlsafe(24)
    session.add(
        EnrollToken(
            account_id=account_id,
            token_hash=token_hash(token),
            auto_accept=auto_accept,
            uses_left=uses,
            uses_total=uses,
            expires_at=utcnow() + timedelta(seconds=ttl),
            created_by=actor,
        )
    )
    audit.record(
        session,
        action="enroll_token.create",
        actor=actor,
        account_id=account_id,
        detail=f"auto_accept={auto_accept} uses={uses} ttl={int(ttl)}s",
    )
    return token


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise InvalidInput(f"device {device_id!r} does not exist")
    return device


def request_tunnel(session: Session, device: Device, request: str | None) -> None:
    """Record what the device (and its relay) must do next; the change feed carries it."""
    device.tunnel_request = request
    device.tunnel_request_at = utcnow()
    publish(session, f"device:{device.id}")


def accept_device(session: Session, *, device_id: str, actor: str, source_ip: str = "") -> Device:
    device = get_device(session, device_id)
    if device.status == "accepted":
        raise InvalidInput(f"device {device_id} is already accepted")
    device.status = "accepted"
    device.accepted_at = utcnow()
    request_tunnel(session, device, None)
    audit.record(
        session,
        action="device.accept",
        actor=actor,
        account_id=device.account_id,
        target=device_id,
        source_ip=source_ip,
    )
    return device


def revoke_device(session: Session, *, device_id: str, actor: str, source_ip: str = "") -> Device:
    device = get_device(session, device_id)
    if device.status == "revoked":
        raise InvalidInput(f"device {device_id} is already revoked")
    device.status = "revoked"
    request_tunnel(session, device, "close")
    audit.record(
        session,
        action="device.revoke",
        actor=actor,
        account_id=device.account_id,
        target=device_id,
        source_ip=source_ip,
    )
    return device


def parse_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise InvalidInput(f"not a CIDR network: {text!r}") from None


def allowlist_for(session: Session, account_id: int) -> list[str]:
    return list(
        session.scalars(select(AllowlistEntry.cidr).where(AllowlistEntry.account_id == account_id))
    )


def address_allowed(cidrs: list[str], address: str) -> bool:
    """An empty allowlist allows every address."""
    if not cidrs:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(cidr) for cidr in cidrs)


def add_allowlist(
    session: Session, *, account_id: int, cidr: str, actor: str, comment: str = ""
) -> AllowlistEntry:
    cidr = parse_cidr(cidr)
    if cidr in allowlist_for(session, account_id):
        raise InvalidInput(f"{cidr} is already on the allowlist")
    entry = AllowlistEntry(account_id=account_id, cidr=cidr, comment=comment)
    session.add(entry)
    audit.record(session, action="allowlist.add", actor=actor, account_id=account_id, target=cidr)
    _recheck_tunnels(session, account_id)
    return entry


def remove_allowlist(session: Session, *, account_id: int, cidr: str, actor: str) -> None:
    cidr = parse_cidr(cidr)
    entry = session.scalar(
        select(AllowlistEntry).where(
            AllowlistEntry.account_id == account_id, AllowlistEntry.cidr == cidr
        )
    )
    if entry is None:
        raise InvalidInput(f"{cidr} is not on the allowlist")
    session.delete(entry)
    audit.record(
        session, action="allowlist.remove", actor=actor, account_id=account_id, target=cidr
    )
    _recheck_tunnels(session, account_id)


def _recheck_tunnels(session: Session, account_id: int) -> None:
    """Wake the relays holding this account's tunnels so they re-apply the allowlist."""
    ids = session.scalars(
        select(Tunnel.device_id)
        .join(Device, Device.id == Tunnel.device_id)
        .where(Device.account_id == account_id, Tunnel.closed_at.is_(None))
    )
    for device_id in set(ids):
        device = session.get(Device, device_id)
        if device is not None:
            device.tunnel_request_at = utcnow()
            publish(session, f"device:{device_id}")
