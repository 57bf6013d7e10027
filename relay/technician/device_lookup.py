"""Find the device a technician names, inside the approving user's account only.

A device of another account is indistinguishable from one that does not exist
("Could not find matching clients"), so the menu never reveals what other
tenants own. Each failure is classified into the seed's error words plus one
line saying why; a name that several of the account's devices share is said to
be ambiguous, with the candidates to pick from by id (SPEC 6.4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core.models import Device, Tunnel
from core.validate import strip_controls

NO_MATCH = "Could not find matching clients"
NOT_CHECKING_IN = "Client not found. It may not be checking in"
AMBIGUOUS = "Several clients match that name"
PAGE_SIZE = 20
MAX_CANDIDATES = 20


@dataclass(frozen=True)
class DeviceInfo:
    """What the menu needs of a device, detached from the database session."""

    id: str
    hostname: str
    serial: str
    status: str
    os_name: str
    os_version: str
    client_version: str
    login_user: str
    target_host_key: str | None
    last_checkin_at: datetime | None
    online: bool

    @property
    def state(self) -> str:
        if self.status != "accepted":
            return self.status
        return "online" if self.online else "offline"


@dataclass(frozen=True)
class LookupFailure:
    """The seed's error words and one line saying why."""

    error: str
    reason: str
    candidates: tuple[DeviceInfo, ...] = ()

    @property
    def one_line(self) -> str:
        """The error on one line, naming the candidates' ids (for a jump's refusal)."""
        if not self.candidates:
            return self.error
        return f"{self.error}: use a device id ({', '.join(d.id for d in self.candidates)})"


def version_tuple(text: str) -> tuple[int, ...]:
    """'3.53.17-rc1' -> (3, 53, 17, 1): compare versions numerically, not as strings."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:8])


def below_minimum(version: str, minimum: str) -> bool:
    if not minimum.strip():
        return False
    return version_tuple(version) < version_tuple(minimum)


def _info(device: Device, online: bool) -> DeviceInfo:
    return DeviceInfo(
        id=device.id,
        hostname=strip_controls(device.hostname),
        serial=strip_controls(device.serial),
        status=device.status,
        os_name=strip_controls(device.os_name),
        os_version=strip_controls(device.os_version),
        client_version=strip_controls(device.client_version),
        login_user=device.login_user,
        target_host_key=device.target_host_key,
        last_checkin_at=device.last_checkin_at,
        online=online,
    )


def _online_ids(session: Session, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    rows = session.scalars(
        select(Tunnel.device_id).where(Tunnel.device_id.in_(ids), Tunnel.closed_at.is_(None))
    )
    return set(rows)


def resolve(
    session: Session,
    *,
    account_id: int,
    name: str,
    min_client_version: str = "",
    check: bool = True,
) -> DeviceInfo | LookupFailure:
    """The one device of the account whose id, hostname (any case) or serial is `name`.

    With `check`, also refuse a device one cannot connect to (see `classify`).
    """
    name = name.strip()
    lowered = name.lower()
    rows = list(
        session.scalars(
            select(Device)
            .where(Device.account_id == account_id)
            .where(
                or_(
                    Device.id == lowered,
                    func.lower(Device.hostname) == lowered,
                    Device.serial == name,
                )
            )
            .order_by(Device.id)
            .limit(MAX_CANDIDATES + 1)
        )
    )
    if not rows:
        return LookupFailure(NO_MATCH, f"No device with id, hostname or serial '{name}'.")
    online = _online_ids(session, [d.id for d in rows])
    infos = [_info(d, d.id in online) for d in rows]
    exact_id = [d for d in infos if d.id == lowered]
    if len(infos) > 1 and not exact_id:
        count = f"{len(infos)}" if len(infos) <= MAX_CANDIDATES else f"more than {MAX_CANDIDATES}"
        return LookupFailure(
            AMBIGUOUS,
            f"'{name}' is the hostname or serial of {count} devices; connect by id:",
            tuple(infos[:MAX_CANDIDATES]),
        )
    device = exact_id[0] if exact_id else infos[0]
    return classify(device, min_client_version) if check else device


def classify(device: DeviceInfo, min_client_version: str) -> DeviceInfo | LookupFailure:
    """Refuse devices that are not accepted, too old, or never seen at all.

    A live tunnel is proof enough that a device is there: a plain OpenSSH device
    (`ssh -N -R`) never checks in with the tracker, yet is connectable. A device
    that checks in but has no tunnel is let through too: the session asks it for
    one ("Waiting for connection...").
    """
    if device.status != "accepted":
        return LookupFailure(NO_MATCH, f"Device {device.id} is {device.status}, not accepted.")
    if below_minimum(device.client_version, min_client_version):
        shown = device.client_version or "unknown"
        return LookupFailure(
            NO_MATCH,
            f"Device {device.id} runs client {shown}; the minimum is {min_client_version}.",
        )
    if device.last_checkin_at is None and not device.online:
        return LookupFailure(
            NOT_CHECKING_IN,
            f"The tracker has never seen device {device.id} check in, and it holds no tunnel.",
        )
    return device


def list_devices(
    session: Session, *, account_id: int, pattern: str = "", page: int = 1
) -> tuple[list[DeviceInfo], int]:
    """One page of the account's devices (substring match, any case) and the total count."""
    query = select(Device).where(Device.account_id == account_id)
    if pattern:
        needle = pattern.lower()
        query = query.where(
            or_(
                Device.id.contains(needle, autoescape=True),
                func.lower(Device.hostname).contains(needle, autoescape=True),
                func.lower(Device.serial).contains(needle, autoescape=True),
            )
        )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = list(
        session.scalars(
            query.order_by(func.lower(Device.hostname), Device.id)
            .offset((page - 1) * PAGE_SIZE)
            .limit(PAGE_SIZE)
        )
    )
    online = _online_ids(session, [d.id for d in rows])
    return [_info(d, d.id in online) for d in rows], int(total)
