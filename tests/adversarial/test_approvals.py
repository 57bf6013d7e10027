"""Approval tokens end to end: hashed, single use, CSRF-bound, tied to a live SSH connection."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import time

import httpx
import pytest

from core.approvals import token_hash
from core.models import Approval, AuditEvent, PortalSession
from tests.adversarial.support import PortalClient, Stack, technician


def _count(stack: Stack, model: type) -> int:
    return stack.run(lambda s: s.query(model).count())


def test_token_is_long_and_stored_only_hashed(stack: Stack) -> None:
    """The token in the URL carries >= 128 bits and only its SHA-256 is in the database."""

    async def run() -> str:
        conn, _process, token = await technician(stack.server.technician_port)
        conn.close()
        return token

    token = asyncio.run(run())
    assert len(token) * 6 >= 128  # urlsafe base64: 6 bits per character
    rows = stack.approvals()
    assert [r.token_hash for r in rows] == [token_hash(token)]
    dump = "\n".join(stack.run(lambda s: [str(vars(r)) for r in s.query(Approval)]))
    assert token not in dump


def test_cross_site_post_and_get_change_nothing(stack: Stack) -> None:
    """A POST without this session's CSRF token is 403, and GET shows the request without
    changing it; the SSH session keeps waiting."""
    alice = stack.add_user("alice")

    async def run() -> None:
        conn, process, token = await technician(stack.server.technician_port)
        with PortalClient(stack.server.base_url) as portal:
            assert portal.login(alice).status_code == 303
            for csrf in ("", "x" * 43):
                assert portal.decide(token, csrf=csrf).status_code == 403
            forged = portal.http.post(
                f"/approve/{token}",
                data={"decision": "approve"},
                headers={"Origin": "https://evil.example", "Referer": "https://evil.example/"},
            )
            assert forged.status_code == 403
            assert portal.http.get(f"/approve/{token}").status_code == 200
        assert [r.status for r in stack.approvals()] == ["pending"]
        assert not process.channel.is_closing()
        conn.close()

    asyncio.run(run())


def test_concurrent_approvals_of_one_token_have_one_winner(stack: Stack) -> None:
    """Six users approving the same token at once: exactly one succeeds, one audit row."""
    users = [stack.add_user(f"user{i}") for i in range(6)]
    clients = [PortalClient(stack.server.base_url) for _ in users]

    async def start() -> tuple[object, str]:
        conn, _process, token = await technician(stack.server.technician_port)
        return conn, token

    loop = asyncio.new_event_loop()
    try:
        conn, token = loop.run_until_complete(start())
        for client, user in zip(clients, users, strict=True):
            assert client.login(user).status_code == 303
        tokens = [c.csrf() for c in clients]
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            codes = list(
                pool.map(
                    lambda ct: ct[0].decide(token, csrf=ct[1]).status_code,
                    zip(clients, tokens, strict=True),
                )
            )
        assert sorted(codes).count(200) == 1, codes
        assert all(c in (409, 410) for c in codes if c != 200), codes
        assert len(stack.audit("approval.approved")) == 1
        conn.close()  # type: ignore[attr-defined]
    finally:
        for client in clients:
            client.close()
        loop.close()


@pytest.mark.slow
def test_bogus_tokens_flood_then_real_approval_is_fast(stack: Stack) -> None:
    """10,000 random tokens get only 4xx and write nothing; a real approval then lets the
    SSH session in within a second."""
    alice = stack.add_user("alice")

    async def run() -> None:
        conn, process, token = await technician(stack.server.technician_port)
        with PortalClient(stack.server.base_url) as portal:
            assert portal.login(alice).status_code == 303
            csrf = portal.csrf()
            before = (_count(stack, AuditEvent), _count(stack, PortalSession))
            limits = httpx.Limits(max_connections=16)
            async with httpx.AsyncClient(
                base_url=stack.server.base_url, cookies=portal.http.cookies, limits=limits
            ) as http:
                sem = asyncio.Semaphore(16)

                async def one(i: int) -> int:
                    bogus = secrets.token_urlsafe(24)
                    async with sem:
                        if i % 2:
                            r = await http.get(f"/approve/{bogus}")
                        else:
                            r = await http.post(
                                f"/approve/{bogus}", data={"decision": "approve", "csrf": csrf}
                            )
                    return r.status_code

                codes = await asyncio.gather(*(one(i) for i in range(10_000)))
            assert set(codes) <= {404}, set(codes)
            assert (_count(stack, AuditEvent), _count(stack, PortalSession)) == before
            assert len(stack.approvals()) == 1
            start = time.monotonic()
            assert portal.decide(token, csrf=csrf).status_code == 200
            text = ""
            while "rly:alice@" not in text:
                text += await asyncio.wait_for(process.stdout.read(4096), 1.0)
            assert time.monotonic() - start < 1.0
        conn.close()

    asyncio.run(run())


def test_token_is_refused_after_its_ssh_client_left(stack: Stack) -> None:
    """Once the SSH connection that asked is gone, its token can no longer be approved."""
    alice = stack.add_user("alice")

    async def run() -> str:
        conn, _process, token = await technician(stack.server.technician_port)
        conn.close()
        await conn.wait_closed()
        return token

    token = asyncio.run(run())
    deadline = time.monotonic() + 5
    while stack.approvals()[0].status == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    with PortalClient(stack.server.base_url) as portal:
        assert portal.login(alice).status_code == 303
        assert portal.decide(token).status_code == 410
    assert [r.status for r in stack.approvals()] == ["abandoned"]
    assert stack.audit("approval.approved") == []
