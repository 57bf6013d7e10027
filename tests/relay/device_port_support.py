"""Helpers for the device-port tests (no tests here): rows, keys and device clients.

Accounts and devices are written straight into the relay's SQLite file with the
core data functions, the way an admin command would; the relay's change feed
sees them like any other process's change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import accounts, devices
from core.db import make_engine, make_sessions
from core.models import AuditEvent, Device, Tunnel
from core.validate import new_id

T = TypeVar("T")


class Db:
    """The relay's database as seen by an admin process."""

    def __init__(self, data_dir: Path) -> None:
        self.engine = make_engine(f"sqlite:///{data_dir / 'rly.sqlite3'}")
        self.sessions: sessionmaker[Session] = make_sessions(self.engine)

    def run(self, fn: Callable[[Session], T]) -> T:
        with self.sessions() as session, session.begin():
            return fn(session)

    def close(self) -> None:
        self.engine.dispose()

    def add_account(self, name: str = "acme") -> int:
        return self.run(lambda s: accounts.add_account(s, name=name, actor="test").id)

    def add_device(self, account_id: int, key: asyncssh.SSHKey, status: str = "accepted") -> str:
        """A device row holding `key` (public part only), in the given status."""
        device_id = new_id()
        public = key.export_public_key().decode().strip()

        def add(session: Session) -> None:
            session.add(
                Device(
                    id=device_id,
                    account_id=account_id,
                    hostname=f"host-{device_id}",
                    serial=f"sn-{device_id}",
                    public_key=public,
                    key_fingerprint=key.get_fingerprint(),
                    status=status,
                )
            )

        self.run(add)
        return device_id

    def allow(self, account_id: int, cidr: str) -> None:
        self.run(lambda s: devices.add_allowlist(s, account_id=account_id, cidr=cidr, actor="t"))

    def disallow(self, account_id: int, cidr: str) -> None:
        self.run(lambda s: devices.remove_allowlist(s, account_id=account_id, cidr=cidr, actor="t"))

    def request(self, device_id: str, request: str | None) -> None:
        self.run(lambda s: devices.request_tunnel(s, devices.get_device(s, device_id), request))

    def tunnels(self, device_id: str) -> list[Tunnel]:
        return self.run(
            lambda s: list(
                s.scalars(select(Tunnel).where(Tunnel.device_id == device_id).order_by(Tunnel.id))
            )
        )

    def open_tunnels(self, device_id: str) -> list[Tunnel]:
        return [t for t in self.tunnels(device_id) if t.closed_at is None]

    def audits(self, action: str, target: str) -> list[str]:
        """The details of audit rows with this action and target, oldest first."""
        return self.run(
            lambda s: list(
                s.scalars(
                    select(AuditEvent.detail)
                    .where(AuditEvent.action == action, AuditEvent.target == target)
                    .order_by(AuditEvent.id)
                )
            )
        )


@contextmanager
def database(data_dir: Path) -> Iterator[Db]:
    db = Db(data_dir)
    try:
        yield db
    finally:
        db.close()


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def write_key(key: asyncssh.SSHKey, path: Path) -> Path:
    """Write a private key file OpenSSH accepts (0600)."""
    key.write_private_key(str(path))
    path.chmod(0o600)
    return path


def host_ca_public(data_dir: Path) -> str:
    return (data_dir / "keys" / "host_ca.pub").read_text().strip()


async def connect_device(
    port: int, device_id: str, key: asyncssh.SSHKey, host_ca: str, **options: Any
) -> asyncssh.SSHClientConnection:
    """Log in to the device port as the device, trusting only the relay host CA."""
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        username=device_id,
        client_keys=[key],
        known_hosts=([], [asyncssh.import_public_key(host_ca)], []),
        agent_path=None,
        config=[],
        **options,
    )


async def login_refused(port: int, device_id: str, key: asyncssh.SSHKey, host_ca: str) -> bool:
    """True if the relay refuses this device: login denied, or disconnected at once."""
    try:
        conn = await connect_device(port, device_id, key, host_ca)
    except (asyncssh.PermissionDenied, asyncssh.DisconnectError):
        return True
    try:
        await asyncio.wait_for(conn.wait_closed(), 5)
    except TimeoutError:
        return False
    finally:
        conn.close()
    return True


def wait_until(check: Callable[[], T | None], timeout: float = 5.0, step: float = 0.05) -> T:
    """Poll `check` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


async def await_until(check: Callable[[], T | None], timeout: float = 5.0) -> T:
    """Async version of wait_until (the check itself is synchronous and quick)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


class EchoServer:
    """A local TCP echo server standing in for the device's target."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class FreezableProxy:
    """A TCP proxy that can stop forwarding without closing (a blackholed network)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        self.frozen = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.frozen:
                writer.write(data)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
