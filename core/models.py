"""The whole schema, as SQLAlchemy 2 typed models (SPEC §3-§7)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.validate import is_ascii_digits


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime()}


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # 0005: a key login must be approved by someone other than the key's owner
    second_approver: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class User(Base):
    """A portal user; approving an SSH session makes it that session's identity."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    totp_secret: Mapped[str] = mapped_column(String(64))
    totp_confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    last_totp_step: Mapped[int | None] = mapped_column(BigInteger, default=None)
    role: Mapped[str] = mapped_column(String(16), default="technician")
    is_superadmin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    account: Mapped[Account] = relationship(lazy="joined")


class UserKey(Base):
    __tablename__ = "user_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    comment: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    hostname: Mapped[str] = mapped_column(String(253), index=True)
    serial: Mapped[str] = mapped_column(String(128), index=True)
    os_name: Mapped[str] = mapped_column(String(64), default="")
    os_version: Mapped[str] = mapped_column(String(64), default="")
    client_version: Mapped[str] = mapped_column(String(64), default="")
    public_key: Mapped[str] = mapped_column(Text)
    key_fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    target_host_key: Mapped[str | None] = mapped_column(Text, default=None)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    login_user: Mapped[str] = mapped_column(String(32), default="root")
    tunnel_mode: Mapped[str] = mapped_column(String(16), default="persistent")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    accepted_at: Mapped[datetime | None] = mapped_column(default=None)
    last_checkin_at: Mapped[datetime | None] = mapped_column(default=None)
    last_checkin_ip: Mapped[str | None] = mapped_column(String(64), default=None)
    uptime: Mapped[float | None] = mapped_column(default=None)
    last_request_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    tunnel_request: Mapped[str | None] = mapped_column(String(16), default=None)
    tunnel_request_at: Mapped[datetime | None] = mapped_column(default=None)


class EnrollToken(Base):
    __tablename__ = "enroll_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    auto_accept: Mapped[bool] = mapped_column(Boolean, default=False)
    uses_left: Mapped[int] = mapped_column(Integer, default=1)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)  # 0006
    uses_total: Mapped[int | None] = mapped_column(Integer, default=None)  # 0006: uses at creation
    form_nonce: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)  # 0006


class RelayNode(Base):
    __tablename__ = "relay_nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_host: Mapped[str] = mapped_column(String(253))
    device_ports: Mapped[str] = mapped_column(String(128))  # comma-separated, in dial order
    technician_port: Mapped[int] = mapped_column(Integer)
    peer_address: Mapped[str] = mapped_column(String(128), default="")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    # 0007: the fleet registry (heartbeat, load, drain; gone = silent for 3 heartbeats)
    heartbeat_interval: Mapped[float] = mapped_column(default=5.0)
    tunnels: Mapped[int] = mapped_column(Integer, default=0)
    sessions: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="live")  # live | draining
    drain_deadline: Mapped[datetime | None] = mapped_column(default=None)
    gone_at: Mapped[datetime | None] = mapped_column(default=None)  # declared gone, rows closed

    @property
    def port_list(self) -> list[int]:
        """`device_ports` as numbers, in dial order (anything that is not a port is skipped)."""
        return parse_ports(self.device_ports)


def parse_ports(text: str) -> list[int]:
    """A comma-separated port list as stored in relay_nodes.device_ports."""
    ports = (part.strip() for part in str(text).split(","))
    return [int(p) for p in ports if is_ascii_digits(p) and 0 < int(p) < 65536]


class Tunnel(Base):
    """A device's reverse tunnel on a relay node; open while closed_at is NULL."""

    __tablename__ = "tunnels"
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    relay_node: Mapped[str] = mapped_column(String(64), index=True)
    listen_host: Mapped[str] = mapped_column(String(253), default="")
    listen_port: Mapped[int] = mapped_column(Integer)
    peer_ip: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    transport_port: Mapped[int] = mapped_column(Integer)
    client_version: Mapped[str] = mapped_column(String(128), default="")
    # 0004: how the tunnel travels: ssh, ssh+connect, wss, wss+connect (ws without TLS)
    transport: Mapped[str] = mapped_column(String(16), default="ssh", server_default="ssh")
    connected_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_keepalive_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    close_reason: Mapped[str | None] = mapped_column(String(128), default=None)


class Approval(Base):
    """One technician SSH connection waiting for (or given) a portal approval."""

    __tablename__ = "approvals"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    code: Mapped[str] = mapped_column(String(16))
    ssh_login: Mapped[str] = mapped_column(String(64))
    required_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    client_ip: Mapped[str] = mapped_column(String(64))
    client_version: Mapped[str] = mapped_column(String(256), default="")
    relay_node: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    decided_at: Mapped[datetime | None] = mapped_column(default=None)
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"), default=None)
    # 0005: the SSH key of a key login, and how it was decided: portal | cli | cache
    key_fingerprint: Mapped[str | None] = mapped_column(String(128), default=None)
    decided_via: Mapped[str] = mapped_column(String(16), default="portal", server_default="portal")


class ApprovalGrant(Base):
    """A remembered approval (relay.approval_cache): the same key, user and address may
    reconnect until `expires_at` without a new approval, unless revoked (0005)."""

    __tablename__ = "approval_grants"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    approval_id: Mapped[int | None] = mapped_column(ForeignKey("approvals.id"), default=None)
    ssh_login: Mapped[str] = mapped_column(String(64))
    key_fingerprint: Mapped[str] = mapped_column(String(128))
    client_ip: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_by: Mapped[str | None] = mapped_column(String(128), default=None)


class SshSession(Base):
    """A technician's session on one device, opened from the menu."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    approval_id: Mapped[int | None] = mapped_column(ForeignKey("approvals.id"), default=None)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    username: Mapped[str] = mapped_column(String(64), default="")
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"), default=None)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    relay_node: Mapped[str] = mapped_column(String(64))
    client_ip: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_activity_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    end_reason: Mapped[str | None] = mapped_column(String(128), default=None)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    close_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    closed_by: Mapped[str | None] = mapped_column(String(128), default=None)  # 0006: who asked
    recording_path: Mapped[str | None] = mapped_column(String(512), default=None)
    # 0003: "data" or "tunnel"; peering; 0008: "dial-back" (widened to 16)
    path: Mapped[str] = mapped_column(String(16), default="tunnel")


class DataConnection(Base):
    """A single-use ticket for one session's data connection (0003; only its SHA-256 is kept)."""

    __tablename__ = "data_connections"
    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_hash: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    session_id: Mapped[str] = mapped_column(String(32), index=True)
    relay_node: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    peer_ip: Mapped[str] = mapped_column(String(64), default="")
    peer_port: Mapped[int] = mapped_column(Integer, default=0)
    transport_port: Mapped[int] = mapped_column(Integer, default=0)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(128), default="")
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"), default=None)
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    source_ip: Mapped[str] = mapped_column(String(64), default="")
    # the hash chain (core.audit): position, the previous row's hash, this row's hash
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))


class AllowlistEntry(Base):
    __tablename__ = "allowlist_entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    cidr: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PortalSession(Base):
    """A server-side portal login; the cookie holds a token whose hash is the key."""

    __tablename__ = "portal_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    totp_ok: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
