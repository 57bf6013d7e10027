"""Long-polled check-ins answer within a second of a tunnel request or status change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import event

from core.devices import accept_device, request_tunnel, revoke_device
from core.models import Device
from tests.tracker.harness import SignedDevice, TrackerEnv


def _request(env: TrackerEnv, device_id: str, what: str) -> None:
    with env.prepared.sessions() as session, session.begin():
        device = session.get(Device, device_id)
        assert device is not None
        request_tunnel(session, device, what)


async def _change_later(
    env: TrackerEnv, device: SignedDevice, change: Callable[[str], None]
) -> float:
    """Apply change(device_id) after 0.3 s, notify the hub, return when it was notified."""
    await asyncio.sleep(0.3)
    await asyncio.to_thread(change, device.device_id)
    env.hub.notify(f"device:{device.device_id}")
    return time.monotonic()


def test_long_poll_answers_tunnel_request_at_once(env: TrackerEnv) -> None:
    """A waiting check-in gets action open within a second of request_tunnel + notify."""

    async def scenario() -> None:
        env.hub.bind(asyncio.get_running_loop())
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            poll = asyncio.create_task(device.checkin(wait=20))
            notified = await _change_later(env, device, lambda i: _request(env, i, "open"))
            response = await asyncio.wait_for(poll, 5)
            answered = time.monotonic()
        assert response.json()["action"] == "open"
        assert answered - notified < 1.0
        assert env.device(device.device_id).tunnel_request is None

    asyncio.run(scenario())


def test_long_poll_wakes_pending_device_on_accept(env: TrackerEnv) -> None:
    """A pending device waiting in a long poll learns at once that it was accepted."""

    def accept(device_id: str) -> None:
        with env.prepared.sessions() as session, session.begin():
            accept_device(session, device_id=device_id, actor="test")

    async def scenario() -> None:
        env.hub.bind(asyncio.get_running_loop())
        async with env.client() as api:
            device = await api.enroll(env.token())
            poll = asyncio.create_task(device.checkin(wait=20))
            notified = await _change_later(env, device, accept)
            response = await asyncio.wait_for(poll, 5)
        assert time.monotonic() - notified < 1.0
        assert (response.json()["status"], response.json()["action"]) == ("accepted", "none")

    asyncio.run(scenario())


def test_long_poll_ends_with_403_when_revoked(env: TrackerEnv) -> None:
    """A device revoked while long-polling is told 403 device revoked at once."""

    def revoke(device_id: str) -> None:
        with env.prepared.sessions() as session, session.begin():
            revoke_device(session, device_id=device_id, actor="test")

    async def scenario() -> None:
        env.hub.bind(asyncio.get_running_loop())
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            poll = asyncio.create_task(device.checkin(wait=20))
            await _change_later(env, device, revoke)
            response = await asyncio.wait_for(poll, 2)
        assert response.status_code == 403
        assert response.json() == {"error": "device revoked"}

    asyncio.run(scenario())


def test_long_poll_ignores_unrelated_wakeups(env: TrackerEnv) -> None:
    """A wake-up that brings no action or status change keeps the poll waiting."""

    async def scenario() -> None:
        env.hub.bind(asyncio.get_running_loop())
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            started = time.monotonic()
            poll = asyncio.create_task(device.checkin(wait=1.5))
            await asyncio.sleep(0.3)
            env.hub.notify(f"device:{device.device_id}")
            response = await asyncio.wait_for(poll, 5)
        assert time.monotonic() - started >= 1.4
        assert response.json()["action"] == "none"
        assert response.json()["next_checkin"] == 0.0

    asyncio.run(scenario())


def test_server_caps_the_wait(tmp_path: Path) -> None:
    """The tracker waits at most tracker.checkin_wait, whatever the device asks for."""
    env = TrackerEnv.create(tmp_path / "data", checkin_wait=0.4)

    async def scenario() -> None:
        env.hub.bind(asyncio.get_running_loop())
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            started = time.monotonic()
            response = await device.checkin(wait=25)
        assert 0.35 <= time.monotonic() - started < 1.5
        assert response.json()["action"] == "none"

    try:
        asyncio.run(scenario())
    finally:
        env.close()


def test_a_quiet_long_poll_costs_the_statements_of_a_plain_check_in(env: TrackerEnv) -> None:
    """A long poll that nothing woke answers from its first read: it runs no more SQL than a
    `wait: 0` check-in (100,000 on-demand devices cost one recording statement per poll)."""
    statements: list[str] = []

    def count(_conn: object, _cursor: object, sql: str, *_args: object) -> None:
        statements.append(sql)

    async def scenario() -> tuple[int, int]:
        env.hub.bind(asyncio.get_running_loop())
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            assert (await device.checkin()).status_code == 200  # the key is cached from here
            event.listen(env.prepared.engine, "before_cursor_execute", count)
            try:
                assert (await device.checkin()).status_code == 200
                plain = len(statements)
                statements.clear()
                reply = await device.checkin(wait=0.5)
                assert reply.status_code == 200 and reply.json()["action"] == "none"
                quiet = len(statements)
            finally:
                event.remove(env.prepared.engine, "before_cursor_execute", count)
        return plain, quiet

    plain, quiet = asyncio.run(scenario())
    assert plain > 0 and quiet == plain, (plain, quiet, statements)
