"""Check-in acks: an action stays due until the device echoes its id (old clients: once sent)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.devices import request_tunnel
from core.models import Device
from tests.tracker.harness import SignedDevice, TrackerEnv


def _request(env: TrackerEnv, device_id: str, what: str) -> None:
    with env.prepared.sessions() as session, session.begin():
        device = session.get(Device, device_id)
        assert device is not None
        request_tunnel(session, device, what)
    env.hub.notify(f"device:{device_id}")


async def _checkin(device: SignedDevice, *, ack: int | None, wait: float = 0.0) -> dict[str, Any]:
    body = device.body(wait=wait) if ack is None else device.body(wait=wait, ack=ack)
    response = await device.send(body, device.sign(body))
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


@pytest.fixture(params=["sqlite", "postgresql"])
def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TrackerEnv]:
    """The tracker on SQLite, then on PostgreSQL (action ids from both backends' timestamps)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    tracker_env = TrackerEnv.create(tmp_path / "data", database_url=url)
    try:
        yield tracker_env
    finally:
        tracker_env.close()


def test_action_is_sent_again_until_acked(any_env: TrackerEnv) -> None:
    """A device that acks gets the action on every check-in until it echoes the action's id."""
    env = any_env

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            first = await _checkin(device, ack=0)  # the full path (key not cached yet)
            assert (first["action"], first["action_id"]) == ("none", 0)
            _request(env, device.device_id, "reconnect")
            sent = await _checkin(device, ack=0)  # the cached-key fast path from here on
            again = await _checkin(device, ack=0)
            assert sent["action"] == again["action"] == "reconnect"
            assert isinstance(sent["action_id"], int) and sent["action_id"] > 0
            assert again["action_id"] == sent["action_id"]
            assert env.device(device.device_id).tunnel_request == "reconnect"
            acked = await _checkin(device, ack=sent["action_id"])
            assert (acked["action"], acked["action_id"]) == ("none", 0)
            assert env.device(device.device_id).tunnel_request is None

    asyncio.run(scenario())


def test_long_poll_answer_lost_with_a_cancelled_poll_is_sent_again(env: TrackerEnv) -> None:
    """The action that woke a long poll the device gave up on is still due on its next check-in."""

    async def scenario() -> None:
        env.hub.bind(asyncio.get_running_loop())
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            await _checkin(device, ack=0)
            poll = asyncio.create_task(_checkin(device, ack=0, wait=20))
            await asyncio.sleep(0.3)
            _request(env, device.device_id, "reconnect")
            await asyncio.sleep(0.3)  # the poll has read the action; its answer is dropped
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
            reply = await _checkin(device, ack=0)
        assert reply["action"] == "reconnect"

    asyncio.run(scenario())


def test_ack_of_an_older_action_leaves_a_newer_one_due(env: TrackerEnv) -> None:
    """Echoing an earlier action's id does not clear a request made since."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            _request(env, device.device_id, "close")
            old = await _checkin(device, ack=0)
            _request(env, device.device_id, "reconnect")
            new = await _checkin(device, ack=old["action_id"])
        assert (new["action"], new["action_id"] != old["action_id"]) == ("reconnect", True)
        assert env.device(device.device_id).tunnel_request == "reconnect"

    asyncio.run(scenario())


def test_client_without_ack_field_gets_the_action_once(env: TrackerEnv) -> None:
    """An older client that sends no `ack` still works: its action is cleared once answered."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            _request(env, device.device_id, "reconnect")
            first = await _checkin(device, ack=None)
            second = await _checkin(device, ack=None)
        assert (first["action"], second["action"]) == ("reconnect", "none")
        assert env.device(device.device_id).tunnel_request is None

    asyncio.run(scenario())


@pytest.mark.parametrize("ack", [-1, "1", 1.5, 2**60])
def test_bad_ack_is_refused_and_changes_nothing(env: TrackerEnv, ack: object) -> None:
    """An ack that is not a non-negative integer id is a one-line 400; the action stays due."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            _request(env, device.device_id, "reconnect")
            before = env.snapshot()
            body = json.loads(device.body())
            body["ack"] = ack
            raw = json.dumps(body).encode()
            response = await device.send(raw, device.sign(raw))
            assert response.status_code == 400
            assert "ack" in response.json()["error"]
            assert env.snapshot() == before

    asyncio.run(scenario())


def test_request_made_while_a_long_poll_starts_wakes_it(env: TrackerEnv) -> None:
    """A request written just as a long poll reads the device wakes that poll (100 of 100)."""

    def request_now(device_id: str) -> None:
        with env.prepared.sessions() as session, session.begin():
            device = session.get(Device, device_id)
            assert device is not None
            request_tunnel(session, device, "reconnect")
        env.hub.notify(f"device:{device_id}")

    async def scenario() -> list[float]:
        env.hub.bind(asyncio.get_running_loop())
        rng = random.Random(9)
        slow: list[float] = []
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            ack = (await _checkin(device, ack=0))["action_id"]
            for _ in range(100):
                poll = asyncio.create_task(_checkin(device, ack=ack, wait=2))
                await asyncio.sleep(rng.uniform(0, 0.004))  # lands anywhere in the poll's start
                requested = time.monotonic()
                await asyncio.to_thread(request_now, device.device_id)
                reply = await poll
                if time.monotonic() - requested > 1.0:
                    slow.append(time.monotonic() - requested)
                ack = reply["action_id"] or ack
                await _checkin(device, ack=ack)  # acked: the next round starts clean
        return slow

    assert asyncio.run(scenario()) == []
