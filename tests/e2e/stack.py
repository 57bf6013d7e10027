"""Helper objects for end-to-end tests: a relay, real devices, their sshd targets.

stack = Stack(rly_factory(), process_factory, sshd_factory, tmp_path)
device = stack.enroll_device(hostname="nas-1")     # rly-client enroll, auto-accepted
device.start()                                     # rly-client run
stack.wait_online(device.id)
"""

from __future__ import annotations

import re
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import tomli_w
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from core.models import Device, Tunnel
from tests.support.procs import ManagedProcess, ProcessFactory
from tests.support.rly_server import RlyServer
from tests.support.sshd import OpenSshd, SshdFactory

T = TypeVar("T")
CLIENT = (sys.executable, "-m", "device_client.cli")


def wait_for(check: Callable[[], T | None], timeout: float, what: str, step: float = 0.05) -> T:
    """Poll until check() returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


@dataclass
class DeviceUnderTest:
    id: str
    config_path: Path
    target: OpenSshd | None
    processes: ProcessFactory
    backoff_cap: float = 2.0
    process: ManagedProcess | None = None

    def start(self) -> ManagedProcess:
        self.process = self.processes(
            [*CLIENT, "run", "--config", str(self.config_path)],
            name=f"rly-client-{self.id}",
            env={"RLY_CLIENT_BACKOFF_CAP": str(self.backoff_cap)},
        )
        return self.process

    def edit_config(self, **changes: object) -> None:
        data = tomllib.loads(self.config_path.read_text())
        data.update(changes)
        self.config_path.write_text(tomli_w.dumps(data))


@dataclass
class Stack:
    server: RlyServer
    processes: ProcessFactory
    sshds: SshdFactory
    workdir: Path
    account: str = "acme"
    devices: list[DeviceUnderTest] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.server.process is None:
            self.server.start()
        accounts = self.server.run_cli("account", "list", check=True).stdout.split()
        if self.account not in accounts:
            self.server.run_cli("account", "add", self.account, check=True)
        engine = create_engine(f"sqlite:///{self.server.data_dir / 'rly.sqlite3'}")
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def user_ca(self) -> str:
        return (self.server.data_dir / "keys" / "user_ca.pub").read_text().strip()

    def token(self, *, auto_accept: bool = True, account: str | None = None) -> str:
        args = ["enroll-token", "create", "--account", account or self.account]
        out = self.server.run_cli(*args, *(["--auto-accept"] if auto_accept else []), check=True)
        match = re.search(r"^token (\S+)$", out.stdout, re.M)
        assert match, out.stdout
        return match.group(1)

    def enroll_device(
        self,
        *,
        hostname: str = "nas-1",
        serial: str = "SN-0001",
        auto_accept: bool = True,
        target: str = "sshd",
        account: str | None = None,
    ) -> DeviceUnderTest:
        """`rly-client enroll` against the tracker, with a real sshd as its target."""
        sshd = None
        name = f"dev{len(self.devices)}"
        args = [
            *CLIENT,
            "enroll",
            "--tracker",
            self.server.base_url,
            "--token",
            self.token(auto_accept=auto_accept, account=account),
            "--config",
            str(self.workdir / name / "client.toml"),
            "--hostname",
            hostname,
            "--serial",
            serial,
            "--target",
            target,
        ]
        if target == "sshd":
            sshd = self.sshds(trusted_user_ca_keys=[self.user_ca])
            args += ["--target-port", str(sshd.port)]
        proc = self.processes(args, name=f"enroll-{name}")
        assert proc.wait(30) == 0, proc.output
        match = re.search(r"enrolled: device (\S+),", proc.stdout)
        assert match, proc.stdout
        device = DeviceUnderTest(
            match.group(1), self.workdir / name / "client.toml", sshd, self.processes
        )
        self.devices.append(device)
        return device

    def db(self) -> Session:
        return self.sessions()

    def open_tunnel(self, device_id: str) -> Tunnel | None:
        with self.db() as s:
            return s.scalar(
                select(Tunnel).where(Tunnel.device_id == device_id, Tunnel.closed_at.is_(None))
            )

    def device_row(self, device_id: str) -> Device:
        with self.db() as s:
            return s.get_one(Device, device_id)

    def wait_online(self, device_id: str, timeout: float = 15) -> Tunnel:
        return wait_for(lambda: self.open_tunnel(device_id), timeout, f"{device_id} online")

    def wait_offline(self, device_id: str, timeout: float = 15) -> None:
        wait_for(lambda: self.open_tunnel(device_id) is None, timeout, f"{device_id} offline")
