"""A locked or unreachable database: logins, approvals and check-ins fail closed, then resume."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncssh
import httpx
import psycopg
from psycopg import sql

from approval_portal.app import DB_DOWN
from core import approvals
from tests.adversarial.support import Stack, signed_checkin
from tests.support.pg import ADMIN_URL
from tests.support.rly_server import RlyFactory, RlyServer

FAIL_WITHIN = 8.0  # the busy timeout is 5 s; the answer must come soon after


def _pending_token(stack: Stack) -> tuple[int, str]:
    def create(session: object) -> tuple[int, str]:
        approval, token = approvals.create_approval(
            session,  # type: ignore[arg-type]
            ssh_login="partner",
            required_user_id=None,
            client_ip="192.0.2.1",
            client_version="SSH-2.0-test",
            relay_node="relay",
            ttl=300,
        )
        return approval.id, token

    return stack.run(create)


def _timed(fn: object) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = fn()  # type: ignore[operator]
    return response, time.monotonic() - start


def _clear_refusal(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:500])
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()


@contextmanager
def _locked(stack: Stack) -> Iterator[None]:
    """Hold the SQLite file in an exclusive transaction (another writer stuck mid-write)."""
    locker = sqlite3.connect(stack.server.data_dir / "rly.sqlite3", timeout=1)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        locker.rollback()
        locker.close()


def test_locked_database_portal_fails_closed_and_resumes(stack: Stack) -> None:
    """Under an exclusive lock, approve and login answer the 503 sentence within seconds,
    change nothing, and work again once the lock is gone (no restart)."""
    alice, bob = stack.add_user("alice"), stack.add_user("bob")
    approval_id, token = _pending_token(stack)
    with stack.portal() as approver, stack.portal() as newcomer:
        assert approver.login(alice).status_code == 303
        csrf = approver.csrf()
        with _locked(stack):
            response, took = _timed(lambda: approver.decide(token, csrf=csrf))
            _clear_refusal(response)
            assert DB_DOWN in response.text and took < FAIL_WITHIN
            response, took = _timed(lambda: newcomer.login(bob))
            _clear_refusal(response)
            assert DB_DOWN in response.text and took < FAIL_WITHIN
        assert stack.approval(approval_id).status == "pending"
        assert approver.decide(token, csrf=csrf).status_code == 200
        assert stack.approval(approval_id).status == "approved"
        assert newcomer.login(bob).status_code == 303


def test_locked_database_checkin_fails_closed_and_resumes(stack: Stack) -> None:
    """Under an exclusive lock, a signed check-in gets a one-line JSON 503 within seconds
    (not a 500), and the next one succeeds."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    device_id = stack.add_device(key)
    with httpx.Client(base_url=stack.server.base_url, timeout=30) as device:
        with _locked(stack):
            response, took = _timed(lambda: signed_checkin(device, device_id, key))
        assert took < FAIL_WITHIN
        _clear_refusal(response)
        assert set(response.json()) == {"error"}
        assert signed_checkin(device, device_id, key).status_code == 200


def _set_connections(database: str, allowed: bool) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.SQL("true" if allowed else "false")
            )
        )
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )


def test_unreachable_postgres_fails_closed_and_resumes(
    rly_factory: RlyFactory, pg_url: str
) -> None:
    """With PostgreSQL refusing connections, login and check-in get a clear 503 within seconds,
    and both work again once it is back, without a restart."""
    server = RlyServer(rly_factory.workdir, database_url=pg_url)
    server.run_cli("db", "upgrade", check=True)
    rly_factory.servers.append(server)
    server.start()
    stack = Stack(server, database_url=pg_url)
    database = pg_url.rsplit("/", 1)[1]
    try:
        alice = stack.add_user("alice")
        key = asyncssh.generate_private_key("ssh-ed25519")
        device_id = stack.add_device(key)
        stack.engine.dispose()
        with (
            stack.portal() as portal,
            httpx.Client(base_url=server.base_url, timeout=30) as device,
        ):
            form = portal.form_csrf()
            _set_connections(database, allowed=False)
            try:
                data = {"username": "alice", "password": alice.password, "code": alice.code()}
                response, took = _timed(
                    lambda: portal.http.post("/login", data={**data, "csrf": form, "next": "/"})
                )
                _clear_refusal(response)
                assert DB_DOWN in response.text and took < FAIL_WITHIN
                response, took = _timed(lambda: signed_checkin(device, device_id, key))
                _clear_refusal(response)
                assert took < FAIL_WITHIN
                assert server.process is not None and server.process.running
            finally:
                _set_connections(database, allowed=True)
            assert portal.login(alice).status_code == 303
            assert signed_checkin(device, device_id, key).status_code == 200
    finally:
        stack.close()
