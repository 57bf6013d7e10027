"""One SSH connection cannot open channels without bound (relay.max_channels_per_connection)."""

from __future__ import annotations

import asyncio

import asyncssh

from core.config import Settings
from tests.adversarial.support import Stack

OPENS = 1000


async def _open_many(port: int) -> tuple[int, int]:
    """Open OPENS session channels at once on one technician connection: (opened, refused)."""
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        username="partner",
        password="partner",
        client_keys=None,
        known_hosts=None,
        agent_path=None,
        config=None,
    ) as conn:

        async def one() -> bool:
            try:
                await conn.create_session(asyncssh.SSHClientSession, term_type="xterm")
            except asyncssh.ChannelOpenError:
                return False
            return True

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(OPENS))), 60)
        return sum(results), OPENS - sum(results)


def test_thousand_channel_opens_on_one_technician_connection_are_capped(stack: Stack) -> None:
    """1,000 session opens on one technician connection: at most the cap are accepted, the rest
    refused, and no more approval requests than the cap are created."""
    cap = Settings().relay.max_channels_per_connection
    opened, refused = asyncio.run(_open_many(stack.server.technician_port))
    assert opened <= cap, f"{opened} channels accepted on one connection (cap {cap})"
    assert refused >= OPENS - cap
    assert len(stack.approvals()) <= cap
    assert stack.server.process is not None and stack.server.process.running
