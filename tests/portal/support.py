"""Helper objects for portal tests: a temp database, a portal app, a logged-in client.

env = make_env()
alice = env.add_user("alice", role="admin")
client = env.client()
client.login(alice.username, alice.password, alice.code())
"""

from __future__ import annotations

import re
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import StarletteDeprecationWarning

from approval_portal.app import create_app
from core import accounts, approvals
from core.config import Settings
from core.db import make_engine, make_sessions
from core.hub import Hub
from core.models import Account, Approval

with warnings.catch_warnings():
    # starlette 1.x prefers the httpx2 package; plain httpx still works for TestClient
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient as TestClient

PASSWORD = "correct horse battery"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class FakeClock:
    """The portal's clock for TOTP steps and rate-limit windows."""

    now: float

    def __call__(self) -> float:
        return self.now


class RecordingHub(Hub):
    """A hub that remembers which topics were notified."""

    def __init__(self) -> None:
        super().__init__()
        self.topics: list[str] = []

    def notify(self, topic: str) -> None:
        self.topics.append(topic)
        super().notify(topic)


@dataclass
class TestUser:
    __test__ = False
    id: int
    username: str
    password: str
    secret: str
    clock: FakeClock

    def code(self, offset_steps: int = 0) -> str:
        """The TOTP code for the portal clock's step plus `offset_steps`."""
        return pyotp.TOTP(self.secret).at(self.clock.now + 30 * offset_steps)


def copy_database(template: Path, target: Path) -> None:
    """A consistent copy of a migrated SQLite file (the backup API, not a file copy)."""
    src, dst = sqlite3.connect(template), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


@dataclass
class PortalEnv:
    settings: Settings
    sessions: sessionmaker[Session]
    hub: RecordingHub
    clock: FakeClock
    app: Any
    clients: list[TestClient] = field(default_factory=list)

    def client(self, source: str = "testclient", base_url: str = "http://testserver") -> Client:
        test_client = TestClient(
            self.app, base_url=base_url, follow_redirects=False, client=(source, 50000)
        )
        self.clients.append(test_client)
        return Client(test_client)

    def add_user(
        self,
        username: str,
        *,
        role: str = "technician",
        account: str = "acme",
        confirmed: bool = True,
        superadmin: bool = False,
    ) -> TestUser:
        with self.sessions() as s, s.begin():
            if s.scalar(select(Account).where(Account.name == account)) is None:
                accounts.add_account(s, name=account, actor="test")
            user = accounts.add_user(
                s,
                username=username,
                account_name=account,
                role=role,
                password=PASSWORD,
                actor="test",
            )
            user.totp_confirmed = confirmed
            user.is_superadmin = superadmin
            s.flush()
            return TestUser(user.id, username, PASSWORD, user.totp_secret, self.clock)

    def create_approval(self, *, ttl: float = 300.0, **kwargs: Any) -> tuple[int, str]:
        values: dict[str, Any] = {
            "ssh_login": "partner",
            "required_user_id": None,
            "client_ip": "198.51.100.7",
            "client_version": "SSH-2.0-OpenSSH_9.2p1",
            "relay_node": "relay-1",
            **kwargs,
        }
        with self.sessions() as s, s.begin():
            approval, token = approvals.create_approval(s, ttl=ttl, **values)
            return approval.id, token

    def approval(self, approval_id: int) -> Approval:
        with self.sessions() as s:
            row = s.get(Approval, approval_id)
            assert row is not None
            return row

    def count(self, model: type[Any]) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(model)) or 0

    def close(self) -> None:
        for test_client in self.clients:
            test_client.close()


class Client:
    """One browser-like client (own cookie jar) speaking forms to the portal."""

    def __init__(self, http: TestClient) -> None:
        self.http = http

    def login_csrf(self, next_path: str = "/") -> str:
        page = self.http.get("/login", params={"next": next_path})
        match = CSRF_RE.search(page.text)
        assert match, page.text
        return match.group(1)

    def login(self, username: str, password: str, code: str, next_path: str = "/") -> Any:
        """Fetch the form (for its CSRF cookie) and submit it; returns the POST response."""
        csrf = self.login_csrf(next_path)
        data = {"username": username, "password": password, "code": code, "csrf": csrf}
        return self.http.post("/login", data={**data, "next": next_path})

    def login_user(self, user: TestUser, offset_steps: int = 0) -> None:
        response = self.login(user.username, user.password, user.code(offset_steps))
        assert response.status_code == 303, response.text

    def csrf(self, path: str = "/") -> str:
        """The session's CSRF token, read from a page's logout form."""
        match = CSRF_RE.search(self.http.get(path).text)
        assert match, "not logged in"
        return match.group(1)

    def post(self, path: str, data: dict[str, str] | None = None, csrf: bool = True) -> Any:
        values = dict(data or {})
        if csrf:
            values["csrf"] = self.csrf()
        return self.http.post(path, data=values)


def make_portal_env(data_dir: Path, template: Path, settings: Settings, now: float) -> PortalEnv:
    copy_database(template, data_dir / "rly.sqlite3")
    settings = settings.with_data_dir(data_dir)
    sessions = make_sessions(make_engine(settings.effective_database_url))
    hub, clock = RecordingHub(), FakeClock(now)
    app = create_app(settings, sessions, hub, clock=clock)
    return PortalEnv(settings, sessions, hub, clock, app)
