"""Helpers for the adversarial tests (no tests here): a running stack, users, a portal client.

    stack = Stack(rly_factory())
    alice = stack.add_user("alice")
    portal = stack.portal()
    portal.login(alice)                       # password + the current TOTP code
    portal.decide(token, "approve")

Rows are written straight into the relay's SQLite file with the core data
functions, as an admin command would.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncssh
import httpx
import pyotp
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import accounts
from core.db import make_engine, make_sessions
from core.models import Account, Approval, AuditEvent, Device, User
from core.signing import sign_request
from core.validate import new_id
from tests.support.rly_server import RlyServer

T = TypeVar("T")
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
URL_RE = r"(http://\S+/approve/([A-Za-z0-9_-]+))"


@dataclass
class PortalUser:
    username: str
    password: str
    secret: str

    def code(self, offset_steps: int = 0) -> str:
        return pyotp.TOTP(self.secret).at(time.time() + 30 * offset_steps)


class Stack:
    """A running `rly serve` and its database, seen from an admin process."""

    def __init__(self, server: RlyServer, database_url: str | None = None) -> None:
        self.server = server
        self.engine = make_engine(database_url or f"sqlite:///{server.data_dir / 'rly.sqlite3'}")
        self.sessions: sessionmaker[Session] = make_sessions(self.engine)

    def run(self, fn: Callable[[Session], T]) -> T:
        with self.sessions() as session, session.begin():
            return fn(session)

    def close(self) -> None:
        self.engine.dispose()

    def account(self, name: str = "acme") -> int:
        def get_or_add(session: Session) -> int:
            found = session.scalar(select(Account.id).where(Account.name == name))
            return found or accounts.add_account(session, name=name, actor="test").id

        return self.run(get_or_add)

    def add_user(
        self, username: str, account: str = "acme", role: str = "technician"
    ) -> PortalUser:
        """A portal user with TOTP already enrolled and a random password."""
        self.account(account)
        password = "pw-" + secrets.token_urlsafe(12)

        def add(session: Session) -> str:
            user = accounts.add_user(
                session,
                username=username,
                account_name=account,
                role=role,
                password=password,
                actor="test",
            )
            user.totp_confirmed = True
            return user.totp_secret

        return PortalUser(username, password, self.run(add))

    def add_device(
        self, key: asyncssh.SSHKey, account: str = "acme", status: str = "accepted"
    ) -> str:
        account_id = self.account(account)
        device_id = new_id()

        def add(session: Session) -> None:
            session.add(
                Device(
                    id=device_id,
                    account_id=account_id,
                    hostname=f"host-{device_id}",
                    serial=f"sn-{device_id}",
                    public_key=key.export_public_key().decode().strip(),
                    key_fingerprint=key.get_fingerprint(),
                    status=status,
                )
            )

        self.run(add)
        return device_id

    def audit(self, action: str | None = None) -> list[AuditEvent]:
        query = select(AuditEvent).order_by(AuditEvent.id)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        return self.run(lambda s: list(s.scalars(query)))

    def approval(self, approval_id: int) -> Approval:
        found = self.run(lambda s: s.get(Approval, approval_id))
        assert found is not None
        return found

    def approvals(self) -> list[Approval]:
        return self.run(lambda s: list(s.scalars(select(Approval).order_by(Approval.id))))

    def user_id(self, username: str) -> int:
        found = self.run(lambda s: s.scalar(select(User.id).where(User.username == username)))
        assert found is not None
        return found

    def portal(self, **kwargs: Any) -> PortalClient:
        return PortalClient(self.server.base_url, **kwargs)


class PortalClient:
    """One browser-like portal client (own cookie jar) over real HTTP."""

    def __init__(self, base_url: str, timeout: float = 10.0, **kwargs: Any) -> None:
        self.http = httpx.Client(
            base_url=base_url, follow_redirects=False, timeout=timeout, **kwargs
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> PortalClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def form_csrf(self) -> str:
        page = self.http.get("/login")
        found = CSRF_RE.search(page.text)
        assert found, page.text
        return found.group(1)

    def login(
        self, user: PortalUser, code: str | None = None, password: str | None = None
    ) -> httpx.Response:
        data = {
            "username": user.username,
            "password": user.password if password is None else password,
            "code": user.code() if code is None else code,
            "csrf": self.form_csrf(),
            "next": "/",
        }
        return self.http.post("/login", data=data)

    def csrf(self, path: str = "/") -> str:
        found = CSRF_RE.search(self.http.get(path).text)
        assert found, "not logged in"
        return found.group(1)

    def decide(
        self, token: str, decision: str = "approve", csrf: str | None = None
    ) -> httpx.Response:
        data = {"decision": decision, "csrf": self.csrf() if csrf is None else csrf}
        return self.http.post(f"/approve/{token}", data=data)


def checkin_body(device_id: str, wait: float = 0.0) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "client_version": "0.1.0",
        "os_name": "Linux",
        "os_version": "6",
        "uptime": 1.0,
        "tunnel": {"state": "down", "relay": None, "port": None, "since": None},
        "wait": wait,
    }


def signed_checkin(
    http: httpx.Client, device_id: str, key: asyncssh.SSHKey, body: bytes | None = None
) -> httpx.Response:
    """POST /api/v1/checkin signed with the device key (a fresh timestamp each call)."""
    payload = body if body is not None else json.dumps(checkin_body(device_id)).encode()
    headers = sign_request(
        key=key, device_id=device_id, method="POST", path="/api/v1/checkin", body=payload
    )
    headers["Content-Type"] = "application/json"
    return http.post("/api/v1/checkin", content=payload, headers=headers)


class _InstructionsKept(asyncssh.SSHClient):
    """Answers the gate's password prompt and keeps the prompt-less round's instructions."""

    def __init__(self, password: str) -> None:
        self.instructions = ""
        self.password = password

    def kbdint_auth_requested(self) -> str:
        return ""  # answer the prompts here rather than with asyncssh's silent responder

    def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
    ) -> Sequence[str] | None:
        self.instructions += instructions
        return [self.password for _prompt in prompts]


async def technician(
    port: int,
    *,
    password: str = "partner",  # noqa: S107 - the documented, non-secret gate password
    source: str = "127.0.0.1",
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientProcess[str], str]:
    """Log in as the gate user with asyncssh, open the menu session and read its approval token.

    The relay shows the approval once: in the keyboard-interactive round when the login
    went that way (asyncssh answers the password prompt), else in the session."""
    conn, client = await asyncssh.create_connection(
        lambda: _InstructionsKept(password),
        "127.0.0.1",
        port,
        username="partner",
        password=password,
        client_keys=None,
        known_hosts=None,
        agent_path=None,
        config=None,
        local_addr=(source, 0),
    )
    process = await conn.create_process(term_type="xterm", term_size=(80, 24))
    text = client.instructions
    while (found := re.search(URL_RE, text)) is None:
        chunk = await asyncio.wait_for(process.stdout.read(4096), 10)
        if not chunk:
            raise AssertionError(f"session ended before the approval URL: {text!r}")
        text += chunk
    return conn, process, found.group(2)
