"""The tracker inside a real `rly serve`, driven by the device client's own HTTP code."""

from __future__ import annotations

import asyncio
import re

import asyncssh

from device_client.api import TrackerClient
from tests.support.rly_server import RlyFactory


def test_device_client_against_rly_serve(rly_factory: RlyFactory) -> None:
    """rly-client's TrackerClient enrolls, checks in and reads its status over real HTTP."""
    server = rly_factory(only="tracker")
    server.run_cli("account", "add", "acme", check=True)
    created = server.run_cli("enroll-token", "create", "--account", "acme", "--auto-accept")
    match = re.search(r"^token (\S+)$", created.stdout, re.MULTILINE)
    assert match, created.stdout + created.stderr
    key = asyncssh.generate_private_key("ssh-ed25519")
    base = f"http://127.0.0.1:{server.http_port}"

    async def scenario() -> None:
        async with TrackerClient(base) as anonymous:
            enrolled = await anonymous.enroll(
                {
                    "token": match.group(1),
                    "hostname": "box",
                    "serial": "",
                    "os_name": "Linux",
                    "os_version": "6",
                    "client_version": "0.1.0",
                    "public_key": key.export_public_key().decode().strip(),
                }
            )
        assert enrolled.status == "accepted"
        async with TrackerClient(base, device_id=enrolled.device_id, key=key) as device:
            reply = await device.checkin(
                {
                    "device_id": enrolled.device_id,
                    "client_version": "0.1.0",
                    "os_name": "Linux",
                    "os_version": "6",
                    "uptime": 10.0,
                    "tunnel": {"state": "down", "relay": None, "port": None, "since": None},
                    "wait": 0.0,
                }
            )
            status = await device.device_status()
        assert (reply.status, reply.action) == ("accepted", "none")
        assert status["device_id"] == enrolled.device_id
        assert status["tunnel"] is None

    asyncio.run(scenario())
