"""Helpers for the peering tests: the fleet database as an admin sees it, a plain OpenSSH device."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncssh
from sqlalchemy import select

from core.db import make_engine, make_sessions
from core.models import Account, AuditEvent, RelayNode, SshSession
from tests.fleet.support import Fleet
from tests.relay.device_port_support import write_key
from tests.relay.test_jump import Transfer
from tests.relay.test_technician_support import TechDb, approval_token
from tests.support.procs import ManagedProcess, ProcessFactory
from tests.support.rly_server import RlyServer
from tests.support.technician import Technician, TechnicianFactory

PROMPT = re.escape("rly:alice@acme> ")


class FleetDb(TechDb):
    """TechDb on the fleet's PostgreSQL database instead of a relay's SQLite file."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = make_sessions(self.engine)

    def account_id(self, name: str) -> int:
        found = self.run(lambda s: s.scalar(select(Account.id).where(Account.name == name)))
        assert found is not None
        return found

    def peer_address(self, node: str) -> str:
        found = self.run(
            lambda s: s.scalar(select(RelayNode.peer_address).where(RelayNode.name == node))
        )
        assert found, f"{node} has no peering address"
        return found

    def audit_details(self, action: str) -> list[tuple[str, str]]:
        """(actor, detail) of every audit row with this action, oldest first."""
        return [(e.actor, e.detail) for e in self.actions(action)]

    def session_rows(self, device_id: str) -> list[SshSession]:
        return self.run(
            lambda s: list(
                s.scalars(
                    select(SshSession)
                    .where(SshSession.device_id == device_id)
                    .order_by(SshSession.started_at)
                )
            )
        )

    def audit_rows(self, action: str, needle: str) -> list[AuditEvent]:
        return [e for e in self.actions(action) if needle in e.detail]


def plain_device(
    processes: ProcessFactory,
    relay: RlyServer,
    device_id: str,
    key: asyncssh.SSHKey,
    target_port: int,
) -> ManagedProcess:
    """An OpenSSH `ssh -N -R` holding the device's tunnel at `relay` (on its own address)."""
    workdir, host = processes.workdir, relay.config["relay"]["listen"]
    key_path = write_key(key, workdir / f"device_key_{device_id}")
    known = workdir / f"known_hosts_{device_id}"
    ca = (relay.data_dir / "keys" / "host_ca.pub").read_text().strip()
    known.write_text(f"@cert-authority * {ca}\n")
    argv = [
        "ssh", "-N", "-R", f"0:127.0.0.1:{target_port}", "-p", str(relay.device_port),
        "-i", str(key_path), "-o", f"UserKnownHostsFile={known}",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
        "-o", "ServerAliveInterval=2", "-F", "/dev/null", f"{device_id}@{host}",
    ]  # fmt: skip
    return processes(argv, name=f"device-{device_id}")


def ssh_config(workdir: Path, relay: RlyServer) -> Path:
    """Host alias `relay` for `relay`'s technician port; device names verified by the host CA."""
    ca = (relay.data_dir / "keys" / "host_ca.pub").read_text().strip()
    known = workdir / "known_hosts_jump"
    known.write_text(f"@cert-authority * {ca}\n")
    config = workdir / "ssh_config_jump"
    config.write_text(
        f"Host relay\n  HostName {relay.config['relay']['listen']}\n"
        f"  Port {relay.technician_port}\n  User partner\n"
        f"Host *\n  UserKnownHostsFile {known}\n"
        "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
        "  PubkeyAuthentication no\n  NumberOfPasswordPrompts 1\n  LogLevel INFO\n"
    )
    return config


@dataclass
class TwoRelays:
    """The fleet's relay-a (127.0.1.1) and relay-b (127.0.1.2) with alice's menu on relay-a."""

    fleet: Fleet
    db: FleetDb

    @property
    def a(self) -> RlyServer:
        return self.fleet.relays["relay-a"]

    @property
    def b(self) -> RlyServer:
        return self.fleet.relays["relay-b"]

    def menu(self, factory: TechnicianFactory) -> Technician:
        """A menu session on relay-a, approved as alice."""
        tech = factory(self.a.technician_port, host="127.0.1.1", timeout=20)
        self.db.decide(approval_token(tech), "alice")
        tech.expect(PROMPT)
        return tech


def scp_sftp_round_trip(db: FleetDb, ssh_config: Path, device_id: str, workdir: Path) -> None:
    """ProxyJump scp up, scp down and an sftp get of random bytes, each approved, all intact."""
    payload = os.urandom(2_000_000)
    local, remote, back = workdir / "up.bin", workdir / "on-device.bin", workdir / "down.bin"
    local.write_bytes(payload)
    scp = ["/usr/bin/scp", "-F", str(ssh_config), "-J", "relay"]
    on_device = f"root@{device_id}:{remote}"
    batch, got = workdir / "batch", workdir / "got.bin"
    batch.write_text(f"get {remote} {got}\n")
    sftp = ["/usr/bin/sftp", *scp[1:], "-b", str(batch), f"root@{device_id}"]
    for argv in ([*scp, str(local), on_device], [*scp, on_device, str(back)], sftp):
        transfer = Transfer(argv)
        transfer.approve(db)
        status, out = transfer.finish()
        assert status == 0, out
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert got.read_bytes() == payload
