"""The tracker's queries: enrollment, relay endpoints and a device's own view.

Each function runs inside the caller's transaction and raises ApiError before
writing anything, so a refused request changes nothing. The check-in queries,
the hot path, live in tracker.checkins.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import asyncssh
from sqlalchemy import CursorResult, Result, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import audit
from core.devices import token_hash
from core.models import Device, EnrollToken, RelayNode, Tunnel, parse_ports, utcnow
from core.validate import new_id
from tracker.errors import ApiError
from tracker.schemas import DeviceView, EnrollRequest, TunnelView

RELAY_FRESH = timedelta(seconds=60)


def _rowcount(result: Result[Any]) -> int:
    return cast("CursorResult[Any]", result).rowcount


def enroll(session: Session, *, body: EnrollRequest, tunnel_mode: str, source_ip: str) -> Device:
    """Consume one use of the token and create the device (pending unless auto-accept)."""
    token = session.scalar(
        select(EnrollToken).where(EnrollToken.token_hash == token_hash(body.token))
    )
    now = utcnow()
    if token is None:
        raise ApiError(403, "unknown enrollment token")
    if token.revoked_at is not None:
        raise ApiError(403, "enrollment token has been revoked")
    if token.expires_at <= now:
        raise ApiError(403, "enrollment token has expired")
    if token.uses_left < 1:
        raise ApiError(403, "enrollment token has been used up")
    fingerprint = str(asyncssh.import_public_key(body.public_key).get_fingerprint())
    if session.scalar(select(Device.id).where(Device.key_fingerprint == fingerprint)):
        raise ApiError(409, "this device key is already enrolled")
    used = session.execute(
        update(EnrollToken)
        .where(EnrollToken.id == token.id, EnrollToken.uses_left > 0, EnrollToken.expires_at > now)
        .values(uses_left=EnrollToken.uses_left - 1)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(used) != 1:
        raise ApiError(403, "enrollment token has been used up")
    device = _new_device(session, body=body, fingerprint=fingerprint, tunnel_mode=tunnel_mode)
    device.account_id = token.account_id
    if token.auto_accept:
        device.status, device.accepted_at = "accepted", now
    session.add(device)
    try:
        session.flush()
    except IntegrityError:
        raise ApiError(409, "this device key is already enrolled") from None
    audit.record(
        session,
        action="device.enroll",
        actor=f"enroll-token:{token.id}",
        account_id=token.account_id,
        target=device.id,
        detail=f"status={device.status} key={fingerprint} hostname={body.hostname}",
        source_ip=source_ip,
    )
    return device


def _new_device(
    session: Session, *, body: EnrollRequest, fingerprint: str, tunnel_mode: str
) -> Device:
    device_id = new_id()
    while session.get(Device, device_id) is not None:
        device_id = new_id()
    return Device(
        id=device_id,
        hostname=body.hostname,
        serial=body.serial,
        os_name=body.os_name,
        os_version=body.os_version,
        client_version=body.client_version,
        public_key=body.public_key,
        key_fingerprint=fingerprint,
        target_host_key=body.target_host_key,
        status="pending",
        tunnel_mode=tunnel_mode,
    )


def relay_endpoints(session: Session) -> tuple[list[str], list[int]]:
    """Hosts and device ports of relay nodes seen in the last minute, in dial order."""
    rows = session.execute(
        select(RelayNode.public_host, RelayNode.device_ports)
        .where(RelayNode.last_seen_at >= utcnow() - RELAY_FRESH)
        .order_by(RelayNode.name)
    )
    hosts: list[str] = []
    ports: list[int] = []
    for host, port_list in rows:
        if host and host not in hosts:
            hosts.append(host)
        ports += [port for port in dict.fromkeys(parse_ports(port_list)) if port not in ports]
    return hosts, ports


def device_view(session: Session, *, device_id: str) -> DeviceView:
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, "unknown device")
    tunnel = session.scalar(
        select(Tunnel)
        .where(Tunnel.device_id == device_id, Tunnel.closed_at.is_(None))
        .order_by(Tunnel.connected_at.desc())
        .limit(1)
    )
    return DeviceView(
        device_id=device.id,
        hostname=device.hostname,
        status=device.status,
        tunnel_mode=device.tunnel_mode,
        login_user=device.login_user,
        key_fingerprint=device.key_fingerprint,
        last_checkin_at=device.last_checkin_at,
        tunnel=None
        if tunnel is None
        else TunnelView(
            relay_node=tunnel.relay_node,
            listen_port=tunnel.listen_port,
            connected_at=tunnel.connected_at,
        ),
    )
