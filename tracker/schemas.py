"""Request and reply bodies of the tracker API, with strict bounds on every field.

Text fields must be printable (no control characters) and bounded; keys must
parse as OpenSSH public key lines. A bad field becomes a one-line 400 error.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal

import asyncssh
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from core import validate

MAX_WAIT = 60.0  # the largest tracker.checkin_wait the config accepts
MAX_KEY_LINE = 8192
MAX_ACTION_ID = 2**53  # microseconds since the epoch; exact in a JSON number


def _printable(field: str, max_length: int, *, allow_empty: bool = False) -> AfterValidator:
    def check(value: str) -> str:
        return validate.printable(
            value, field=field, max_length=max_length, allow_empty=allow_empty
        )

    return AfterValidator(check)


def _public_key(field: str, *, ed25519_only: bool) -> Callable[[str], str]:
    def check(value: str) -> str:
        line = validate.printable(value, field=field, max_length=MAX_KEY_LINE)
        try:
            key = asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError):
            raise ValueError(f"{field} is not an OpenSSH public key line") from None
        if ed25519_only and key.get_algorithm() != "ssh-ed25519":
            raise ValueError(f"{field} must be an ssh-ed25519 key")
        return line

    return check


def _device_id(value: str) -> str:
    return validate.device_id(value)


Token = Annotated[str, StringConstraints(max_length=256), _printable("token", 256)]
Hostname = Annotated[str, StringConstraints(max_length=253), _printable("hostname", 253)]
Serial = Annotated[
    str, StringConstraints(max_length=128), _printable("serial", 128, allow_empty=True)
]
ClientVersion = Annotated[str, StringConstraints(max_length=64), _printable("client_version", 64)]
OsName = Annotated[
    str, StringConstraints(max_length=64), _printable("os_name", 64, allow_empty=True)
]
OsVersion = Annotated[
    str, StringConstraints(max_length=64), _printable("os_version", 64, allow_empty=True)
]
DeviceKey = Annotated[
    str,
    StringConstraints(max_length=MAX_KEY_LINE),
    AfterValidator(_public_key("public_key", ed25519_only=True)),
]
HostKey = Annotated[
    str,
    StringConstraints(max_length=MAX_KEY_LINE),
    AfterValidator(_public_key("target_host_key", ed25519_only=False)),
]
DeviceId = Annotated[str, StringConstraints(max_length=10), AfterValidator(_device_id)]
RelayName = Annotated[str, StringConstraints(max_length=253), _printable("tunnel.relay", 253)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class EnrollRequest(_Strict):
    token: Token
    hostname: Hostname
    serial: Serial
    os_name: OsName
    os_version: OsVersion
    client_version: ClientVersion
    public_key: DeviceKey
    target_host_key: HostKey | None = None


class EnrollReply(BaseModel):
    device_id: str
    status: Literal["pending", "accepted"]
    relay_hosts: list[str]
    relay_ports: list[int]
    relay_host_ca: str
    user_ca: str
    login_user: str
    tunnel_mode: Literal["persistent", "on-demand"]
    checkin_interval: float


class TunnelReport(_Strict):
    state: Literal["up", "down", "connecting"]
    relay: RelayName | None = None
    port: Annotated[int, Field(ge=0, le=65535)] | None = None
    since: Annotated[float, Field(ge=0, le=1e11)] | None = None


class CheckinRequest(_Strict):
    device_id: DeviceId
    client_version: ClientVersion
    os_name: OsName
    os_version: OsVersion
    uptime: Annotated[float, Field(ge=0, le=1e11)]
    tunnel: TunnelReport
    wait: Annotated[float, Field(ge=0, le=MAX_WAIT)] = 0.0
    # the action_id of the last action received (0: none yet); absent: a client that
    # predates acks, whose actions are cleared as soon as they are answered
    ack: Annotated[int, Field(ge=0, le=MAX_ACTION_ID)] | None = None


Action = Literal["none", "open", "close", "reconnect"]


class RelayChoice(BaseModel):
    host: str
    ports: list[int]


class CheckinReply(BaseModel):
    status: Literal["pending", "accepted", "revoked"]
    action: Action
    action_id: int  # 0 with action "none"; echoed as `ack` once received
    tunnel_mode: str
    next_checkin: float
    server_time: float
    relays: list[RelayChoice] | None = None  # issue 11: the relays to dial, in order


class TunnelView(BaseModel):
    relay_node: str
    listen_port: int
    connected_at: datetime


class DeviceView(BaseModel):
    device_id: str
    hostname: str
    status: str
    tunnel_mode: str
    login_user: str
    key_fingerprint: str
    last_checkin_at: datetime | None
    tunnel: TunnelView | None


class ErrorReply(BaseModel):
    error: str
