"""The tracker's queries on PostgreSQL, the shared database of multi-node setups."""

from __future__ import annotations

import asyncio
from pathlib import Path

from core.devices import request_tunnel
from core.models import Device
from tests.tracker.harness import TrackerEnv


def test_enroll_and_checkin_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """Enroll, signed check-in, replay refusal and action delivery work on PostgreSQL."""
    env = TrackerEnv.create(tmp_path / "data", database_url=pg_url)

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            with env.prepared.sessions() as session, session.begin():
                target = session.get(Device, device.device_id)
                assert target is not None
                request_tunnel(session, target, "open")
            body = device.body()
            headers = device.sign(body)
            first = await device.send(body, headers)
            replay = await device.send(body, headers)
        assert first.status_code == 200, first.text
        assert first.json()["action"] == "open"
        assert replay.status_code == 401
        stored = env.device(device.device_id)
        assert stored.last_request_ms == device.last_ms
        assert stored.tunnel_request is None
        assert stored.last_checkin_at is not None

    try:
        asyncio.run(scenario())
    finally:
        env.close()
