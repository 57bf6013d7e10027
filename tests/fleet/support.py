"""A fleet on one PostgreSQL database: one tracker+portal process, relays on their own addresses.

    fleet = Fleet(workdir, database_url)          # `rly db upgrade`, then tracker,portal
    a = fleet.add_relay("relay-a", "127.0.1.1")   # `rly serve --only relay`, CA keys shared
    device = fleet.enroll_device("nas-1")         # a real rly-client (builtin target)
    portal = fleet.portal_user("alice")           # logs in over HTTP, approves by token

Each relay listens on its own loopback address, so "the tunnel is on B" is real.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pyotp
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.models import Tunnel, User
from tests.e2e.stack import CLIENT, DeviceUnderTest
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyServer, deep_merge
from tests.support.technician import Technician

T = TypeVar("T")
ACCOUNT = "acme"
SHARED_KEYS = ("host_ca", "host_ca.pub", "user_ca", "user_ca.pub")
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
URL_RE = r"(http://\S+/approve/([A-Za-z0-9_-]+))"
PASSWORD = "fleet test password"


def wait_for(check: Callable[[], T | None], timeout: float, what: str, step: float = 0.02) -> T:
    """Poll until check() returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class PortalUser:
    """A confirmed portal user logged in over plain HTTP (own cookie jar)."""

    def __init__(self, base_url: str, username: str, secret: str) -> None:
        self.http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=10)
        self.username = username
        self.totp = pyotp.TOTP(secret)
        page = self.http.get("/login")
        csrf = CSRF_RE.search(page.text)
        assert csrf, page.text
        form = {"username": username, "password": PASSWORD, "code": self.totp.now()}
        done = self.http.post("/login", data={**form, "csrf": csrf.group(1), "next": "/"})
        assert done.status_code == 303, done.text

    def decide(self, token: str, decision: str = "approve") -> float:
        """POST the decision; return time.monotonic() just before the POST was sent."""
        page = self.http.get(f"/approve/{token}")
        csrf = CSRF_RE.search(page.text)
        assert csrf, page.text
        sent = time.monotonic()
        done = self.http.post(
            f"/approve/{token}", data={"csrf": csrf.group(1), "decision": decision}
        )
        assert done.status_code == 200, done.text
        return sent

    def close(self) -> None:
        self.http.close()


@dataclass
class Fleet:
    workdir: Path
    database_url: str
    processes: ProcessFactory = field(init=False)
    relays: dict[str, RlyServer] = field(default_factory=dict)
    devices: list[DeviceUnderTest] = field(default_factory=list)
    users: list[PortalUser] = field(default_factory=list)
    relay_config: dict[str, Any] = field(default_factory=dict)
    hub_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.processes = ProcessFactory(self.workdir)
        self.hub = RlyServer(
            self.workdir,
            database_url=self.database_url,
            only="tracker,portal",
            config=self.hub_config,
        )
        self.hub.run_cli("db", "upgrade", check=True)
        self.hub.start()
        self.hub.run_cli("account", "add", ACCOUNT, check=True)
        engine = create_engine(self.database_url, pool_size=2)
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def add_relay(self, name: str, address: str, **config: Any) -> RlyServer:
        """`rly serve --only relay` named `name` on `address`, sharing the fleet's CA keys."""
        own = {"relay": {"node_name": name, "listen": address, "public_host": address}}
        settings = deep_merge(deep_merge(self.relay_config, own), config)
        server = RlyServer(
            self.workdir, database_url=self.database_url, only="relay", config=settings
        )
        keys = server.data_dir / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        for name_ in SHARED_KEYS:
            shutil.copy2(self.hub.data_dir / "keys" / name_, keys / name_)
        self.relays[name] = server.start()
        return server

    def cli(self, *args: str) -> str:
        done = self.hub.run_cli(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def token(self) -> str:
        out = self.cli("enroll-token", "create", "--account", ACCOUNT, "--auto-accept")
        match = re.search(r"^token (\S+)$", out, re.M)
        assert match, out
        return match.group(1)

    def enroll_device(
        self, hostname: str, *, sshd_port: int | None = None, start: bool = True
    ) -> DeviceUnderTest:
        """`rly-client enroll` (builtin target, or the sshd on `sshd_port`) and `rly-client run`."""
        config = self.workdir / hostname / "client.toml"
        args = [*CLIENT, "enroll", "--tracker", self.hub.base_url, "--token", self.token()]
        args += ["--config", str(config), "--hostname", hostname]
        args += ["--target", "builtin"] if sshd_port is None else ["--target-port", str(sshd_port)]
        proc = self.processes(args, name=f"enroll-{hostname}")
        assert proc.wait(30) == 0, proc.output
        match = re.search(r"enrolled: device (\S+),", proc.stdout)
        assert match, proc.stdout
        device = DeviceUnderTest(match.group(1), config, None, self.processes, backoff_cap=1.0)
        self.devices.append(device)
        if start:
            device.start()
        return device

    def portal_user(self, username: str) -> PortalUser:
        added = self.hub.run_cli(
            "user", "add", username, "--account", ACCOUNT, "--password-stdin", input=PASSWORD + "\n"
        )
        assert added.returncode == 0, added.stderr
        secret = re.search(r"secret=([A-Z2-7]+)", added.stdout)
        assert secret, added.stdout
        with self.sessions() as s, s.begin():  # TOTP enrolment is the portal's test, not ours
            s.execute(update(User).where(User.username == username).values(totp_confirmed=True))
        user = PortalUser(self.hub.base_url, username, secret.group(1))
        self.users.append(user)
        return user

    def db(self) -> Session:
        return self.sessions()

    def open_tunnel(self, device_id: str) -> Tunnel | None:
        with self.db() as s:
            return s.scalar(
                select(Tunnel).where(Tunnel.device_id == device_id, Tunnel.closed_at.is_(None))
            )

    def wait_online(self, device_id: str, timeout: float = 20) -> Tunnel:
        return wait_for(lambda: self.open_tunnel(device_id), timeout, f"{device_id} online")

    def technician(self, relay: RlyServer) -> Technician:
        host = relay.config["relay"]["listen"]
        return Technician(relay.technician_port, host=host, timeout=20)

    def stop(self) -> None:
        for user in self.users:
            user.close()
        self.processes.stop_all()
        for server in self.relays.values():
            server.stop()
        self.hub.stop()
        self.sessions.kw["bind"].dispose()
