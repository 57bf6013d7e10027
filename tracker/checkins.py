"""Check-in queries: the hot path, so statements are built once and run on the connection.

Every function runs in the caller's transaction. A refusal raises ApiError
before anything is written; recording a request is a conditional UPDATE, so
two processes cannot both accept the same timestamp.

`record_known` is the one-statement fast path for a device whose key the
verifier already holds: the signature is checked against that key first, and
one `UPDATE ... RETURNING` both records the check-in and reads what the answer
needs, guarded so it matches only if the stored key is still that key, the
stamp is fresh and the device is not revoked. No row means "take the full
path" (SELECT, verify, precise error), and nothing was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import BindParameter, Connection, Table, bindparam, or_, select, update
from sqlalchemy.orm import Session

from core.models import Device, utcnow
from tracker.auth import SignedRequest, Verifier
from tracker.errors import ApiError
from tracker.placement import HOLDS_TUNNEL
from tracker.schemas import Action, CheckinRequest

ACTIONS: frozenset[str] = frozenset({"open", "close", "reconnect"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

devices = cast(Table, Device.__table__)
_c = devices.c
_FRESH = or_(_c.last_request_ms.is_(None), _c.last_request_ms < bindparam("p_stamp"))
_READ = select(
    _c.status, _c.tunnel_mode, _c.tunnel_request, _c.tunnel_request_at, _c.public_key,
    _c.last_request_ms,
).where(_c.id == bindparam("p_id"))  # fmt: skip
# what every check-in records, shared by the full path and the cached-key fast path
_CHECKIN_VALUES: dict[str, BindParameter[Any]] = {
    "last_request_ms": bindparam("p_stamp"),
    "last_checkin_at": bindparam("p_at"),
    "last_checkin_ip": bindparam("p_ip"),
    "client_version": bindparam("p_client_version"),
    "os_name": bindparam("p_os_name"),
    "os_version": bindparam("p_os_version"),
    "uptime": bindparam("p_uptime"),
}
_RECORD_CHECKIN = update(devices).where(_c.id == bindparam("p_id"), _FRESH).values(_CHECKIN_VALUES)
_STATE = (_c.status, _c.tunnel_mode, _c.tunnel_request, _c.tunnel_request_at)
_RECORD_KNOWN = (
    update(devices)
    .where(
        _c.id == bindparam("p_id"),
        _FRESH,
        _c.public_key == bindparam("p_key"),
        _c.status != "revoked",
    )
    .values(_CHECKIN_VALUES)
    .returning(*_STATE)
)
_RECORD_REQUEST = (
    update(devices)
    .where(_c.id == bindparam("p_id"), _FRESH)
    .values(last_request_ms=bindparam("p_stamp"))
)
_CLEAR = update(devices).where(
    _c.id == bindparam("p_id"), _c.tunnel_request == bindparam("p_request")
)
_CLEAR_AT = _CLEAR.where(_c.tunnel_request_at == bindparam("p_at")).values(tunnel_request=None)
_CLEAR_NULL = _CLEAR.where(_c.tunnel_request_at.is_(None)).values(tunnel_request=None)


@dataclass(frozen=True)
class DeviceState:
    """What a check-in answer depends on."""

    status: str
    tunnel_mode: str
    request: str | None
    request_at: datetime | None


def authenticate(
    session: Session, *, verifier: Verifier, device_id: str, request: SignedRequest
) -> tuple[DeviceState, int]:
    """Check the signature with the stored key; refuse revoked devices (403)."""
    row = session.connection().execute(_READ, {"p_id": device_id}).one_or_none()
    key_text, last_ms = (None, None) if row is None else (row[4], row[5])
    stamp = verifier.verify(
        device_id=device_id, key_text=key_text, last_ms=last_ms, request=request
    )
    assert row is not None
    if row.status == "revoked":
        raise ApiError(403, "device revoked")
    return DeviceState(*row[:4]), stamp


def record_checkin(
    session: Session, *, device_id: str, stamp: int, report: CheckinRequest, ip: str
) -> None:
    """Store the check-in; 401 if a request with this or a later stamp got in first."""
    done = session.connection().execute(
        _RECORD_CHECKIN, _checkin_params(device_id, stamp, report, ip)
    )
    if done.rowcount != 1:
        raise ApiError(401, "replayed request")


def _checkin_params(
    device_id: str, stamp: int, report: CheckinRequest, ip: str
) -> dict[str, object]:
    return {
        "p_id": device_id,
        "p_stamp": stamp,
        "p_at": utcnow(),
        "p_ip": ip[:64],
        "p_client_version": report.client_version,
        "p_os_name": report.os_name,
        "p_os_version": report.os_version,
        "p_uptime": report.uptime,
    }


def record_known(
    conn: Connection, *, device_id: str, key_text: str, stamp: int, report: CheckinRequest, ip: str
) -> DeviceState | None:
    """Record a check-in verified against `key_text`; None (nothing written) if that no longer fits.

    One round trip: the row is matched only while `key_text` is the stored
    key, `stamp` is newer than the last one and the device is not revoked.
    """
    params = _checkin_params(device_id, stamp, report, ip)
    params["p_key"] = key_text
    row = conn.execute(_RECORD_KNOWN, params).one_or_none()
    return None if row is None else DeviceState(*row)


def record_request(session: Session, *, device_id: str, stamp: int) -> None:
    done = session.connection().execute(_RECORD_REQUEST, {"p_id": device_id, "p_stamp": stamp})
    if done.rowcount != 1:
        raise ApiError(401, "replayed request")


def read_state(session: Session, *, device_id: str) -> DeviceState | None:
    row = session.connection().execute(_READ, {"p_id": device_id}).one_or_none()
    return None if row is None else DeviceState(*row[:4])


class Due(NamedTuple):
    """The action to send and its id (0 with "none")."""

    action: Action
    action_id: int


NOTHING_DUE = Due("none", 0)


def action_id(request_at: datetime | None) -> int:
    """A request's id: when it was made, in microseconds (a new request, a new id)."""
    if request_at is None:
        return 1
    return (request_at - _EPOCH) // timedelta(microseconds=1)


def take_action(session: Session, *, device_id: str, state: DeviceState, ack: int | None) -> Due:
    """The action due now (see take_action_on)."""
    return take_action_on(session.connection(), device_id=device_id, state=state, ack=ack)


def take_action_on(conn: Connection, *, device_id: str, state: DeviceState, ack: int | None) -> Due:
    """The action due now; it is cleared once the device has it, unless it changed meanwhile.

    A device that acks (`ack` not None) has it when it echoes the action's id on
    a later check-in: until then every check-in carries it again, so an answer
    lost with a cancelled long poll is not lost. A device without acks has it
    once it is answered (the old contract).
    """
    if state.status != "accepted" or state.request not in ACTIONS:
        return NOTHING_DUE
    # an `open` for a device that holds a tunnel on some node already is cleared, never sent
    held = state.request == "open" and conn.execute(HOLDS_TUNNEL, {"p_id": device_id}).first()
    due = Due(cast(Action, state.request), action_id(state.request_at))
    if ack is not None and ack != due.action_id and not held:
        return due
    params = {"p_id": device_id, "p_request": state.request, "p_at": state.request_at}
    conn.execute(_CLEAR_NULL if state.request_at is None else _CLEAR_AT, params)
    return NOTHING_DUE if ack is not None or held else due
