"""Helpers for the technician-port tests (no tests here): portal users, devices, approvals.

Rows are written straight into the relay's SQLite file with the core data
functions, as the portal or an admin command would; the relay sees decisions
through its change feed like any other process's change.
"""

from __future__ import annotations

import re
from datetime import timedelta

import asyncssh
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import accounts, approvals
from core.models import Approval, AuditEvent, Device, SshSession, User, utcnow
from tests.relay.device_port_support import Db, host_ca_public, new_key, write_key
from tests.support.procs import ManagedProcess, ProcessFactory
from tests.support.rly_server import RlyServer
from tests.support.technician import Technician

URL_RE = r"(http://\S+/approve/([A-Za-z0-9_-]+))"
PASSWORD = "correct horse battery"


class TechDb(Db):
    """The relay's database, plus what the technician tests need."""

    def add_user(self, username: str, account: str) -> int:
        return self.run(
            lambda s: (
                accounts.add_user(
                    s,
                    username=username,
                    account_name=account,
                    role="technician",
                    password=PASSWORD,
                    actor="t",
                ).id
            )
        )

    def add_user_key(self, username: str, key: asyncssh.SSHKey) -> None:
        line = key.export_public_key().decode()
        self.run(lambda s: accounts.add_user_key(s, username=username, key_text=line, actor="t"))

    def add_named_device(
        self,
        account_id: int,
        *,
        hostname: str,
        serial: str = "",
        checked_in: bool = True,
        client_version: str = "1.0.0",
        key: asyncssh.SSHKey | None = None,
    ) -> str:
        """An accepted device with this hostname; `checked_in` sets last_checkin_at."""
        device_id = self.add_device(account_id, key or new_key())

        def update(session: Session) -> None:
            device = session.get(Device, device_id)
            assert device is not None
            device.hostname = hostname
            device.serial = serial or f"sn-{device_id}"
            device.client_version = client_version
            device.last_checkin_at = utcnow() - timedelta(seconds=5) if checked_in else None

        self.run(update)
        return device_id

    def decide(self, token: str, username: str, *, approve: bool = True) -> Approval:
        def run(session: Session) -> Approval:
            user = session.scalar(select(User).where(User.username == username))
            assert user is not None
            return approvals.decide(
                session, token=token, user=user, approve=approve, source_ip="127.0.0.1"
            )

        return self.run(run)

    def approval(self, token: str) -> Approval:
        def run(session: Session) -> Approval:
            found = approvals.find_by_token(session, token)
            assert found is not None
            return found

        return self.run(run)

    def actions(self, action: str) -> list[AuditEvent]:
        return self.run(
            lambda s: list(
                s.scalars(
                    select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
                )
            )
        )

    def sessions_of(self, device_id: str) -> list[SshSession]:
        return self.run(
            lambda s: list(s.scalars(select(SshSession).where(SshSession.device_id == device_id)))
        )

    def device(self, device_id: str) -> Device:
        found = self.run(lambda s: s.get(Device, device_id))
        assert found is not None
        return found


def approval_token(tech: Technician, timeout: float = 10.0) -> str:
    """Wait for the approval URL on the technician's terminal and return its token."""
    return tech.expect(URL_RE, timeout=timeout).group(2)


def approve(tech: Technician, db: TechDb, username: str) -> None:
    """Approve the session as `username` and wait for the menu prompt."""
    db.decide(approval_token(tech), username)
    tech.expect(re.escape(f"rly:{username}@"), timeout=3)


def device_tunnel(
    processes: ProcessFactory,
    relay: RlyServer,
    device_id: str,
    key: asyncssh.SSHKey,
    target_port: int,
) -> ManagedProcess:
    """An OpenSSH `ssh -N -R` holding the device's tunnel to a local target port."""
    workdir, device_port, data_dir = processes.workdir, relay.device_port, relay.data_dir
    key_path = write_key(key, workdir / f"device_key_{device_id}")
    known = workdir / f"known_hosts_{device_id}"
    known.write_text(f"@cert-authority * {host_ca_public(data_dir)}\n")
    argv = [
        "ssh", "-N", "-R", f"0:127.0.0.1:{target_port}", "-p", str(device_port),
        "-i", str(key_path), "-o", f"UserKnownHostsFile={known}",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
        "-F", "/dev/null", f"{device_id}@127.0.0.1",
    ]  # fmt: skip
    return processes(argv, name=f"device-{device_id}")
