"""Relay endpoints are tried the last good one first, the rest staggered (issue 9 item 7).

A fake asyncssh relay on loopback plus a black hole (accepts, never answers)
and a closed port stand in for a dead relay port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_client import dialer
from device_client.dialer import RelayUnreachable, dial_relay
from device_client.endpoints import Endpoint, parse_endpoint, remembered_first
from tests.device_client.test_tunnel import Keys, device_config, relay


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP port that accepts and never says a word; yields (port, [accepted count])."""
    accepted = [0]
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        for writer in held:
            writer.close()
        server.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dead_port_first_costs_one_stagger(tmp_path: Path) -> None:
    """A black-holed first endpoint delays the tunnel by about the stagger, not a timeout."""

    async def scenario() -> float:
        keys = Keys.make()
        async with relay(keys) as good, black_hole() as (dead, _accepted):
            config = device_config(
                tmp_path,
                keys,
                good,
                relay_endpoints=(f"ssh://127.0.0.1:{dead}", f"ssh://127.0.0.1:{good}"),
            )
            started = time.monotonic()
            dialled = await dial_relay(config, keys.device)
            elapsed = time.monotonic() - started
            assert dialled.endpoint.port == good
            dialled.conn.close()
            return elapsed

    elapsed = asyncio.run(scenario())
    assert dialer.STAGGER <= elapsed < 1.0, elapsed


def test_last_good_endpoint_is_tried_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the working endpoint remembered, the dead one listed first is never even dialled."""

    async def scenario() -> int:
        keys = Keys.make()
        async with relay(keys) as good, black_hole() as (dead, accepted):
            config = device_config(
                tmp_path,
                keys,
                good,
                relay_endpoints=(f"ssh://127.0.0.1:{dead}", f"ssh://127.0.0.1:{good}"),
            )
            dialled = await dial_relay(config, keys.device, last_good=f"ssh://127.0.0.1:{good}")
            dialled.conn.close()
            return accepted[0]

    with caplog.at_level(logging.INFO, logger="device_client.dialer"):
        assert asyncio.run(scenario()) == 0
    assert "last good, tried first" in caplog.text


def test_every_failure_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused port and a silent one each get a log line that says why (never empty)."""
    monkeypatch.setattr(dialer, "CONNECT_TIMEOUT", 0.5)

    async def scenario() -> str:
        keys = Keys.make()
        async with black_hole() as (dead, _accepted):
            refused = closed_port()
            config = device_config(
                tmp_path,
                keys,
                refused,
                relay_endpoints=(f"ssh://127.0.0.1:{refused}", f"ssh://127.0.0.1:{dead}"),
            )
            with pytest.raises(RelayUnreachable) as raised:
                await dial_relay(config, keys.device)
            return str(raised.value)

    with caplog.at_level(logging.INFO, logger="device_client.dialer"):
        summary = asyncio.run(scenario())
    failed = [r.getMessage() for r in caplog.records if " failed: " in r.getMessage()]
    assert len(failed) == 2, caplog.text
    assert all(not line.endswith("failed: ") for line in failed)
    assert any(line.endswith("failed: connection refused") for line in failed), failed
    assert any(line.endswith("failed: no answer within 0.5s") for line in failed), failed
    assert "connection refused" in summary and "no answer within 0.5s" in summary


def test_remembered_first_keeps_the_configured_order_otherwise() -> None:
    """The last good endpoint moves to the front; an unknown one changes nothing."""
    eps = [parse_endpoint(u) for u in ("ssh://r:80", "ssh://r:2200", "wss://r/api/v1/tunnel")]
    assert [str(e) for e in remembered_first(eps, "ssh://r:2200")] == [
        "ssh://r:2200",
        "ssh://r:80",
        "wss://r/api/v1/tunnel",
    ]
    assert remembered_first(eps, "ssh://gone:1") == eps
    assert parse_endpoint("wss://r:8443") == Endpoint("wss", "r", 8443, "/api/v1/tunnel")
