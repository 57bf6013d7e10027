"""Before login: grace period, caps on unauthenticated connections, logins under a socket flood."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncssh
import pytest

from core.config import Settings
from tests.adversarial.support import Stack
from tests.support.rly_server import RlyFactory

GATE = "partner"


def _source(i: int) -> str:
    return f"127.0.0.{2 + i}"


def _open(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def _admitted(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True if the relay answered our version line with its own, False if it closed the
    connection at once. (The device port reads a client's first bytes before it answers:
    they tell a tunnel from a data connection, docs/architecture.md.)"""
    sock.settimeout(timeout)
    try:
        sock.sendall(b"SSH-2.0-probe\r\n")
        return sock.recv(256).startswith(b"SSH-")
    except (ConnectionError, TimeoutError):
        return False


@contextmanager
def _flood(port: int, count: int, per_source: int) -> Iterator[list[socket.socket]]:
    """`count` sockets from distinct loopback sources: half silent, half trickling a banner."""
    socks = [_open(port, _source(i // per_source)) for i in range(count)]
    try:
        for i, sock in enumerate(socks):
            if i % 2:
                sock.sendall(b"SSH-2.0-")  # slow banner: the rest never comes
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def _timed_login(port: int, user: str, **kw: Any) -> float:
    start = time.monotonic()
    async with asyncssh.connect(
        "127.0.0.1", port, username=user, known_hosts=None, agent_path=None, config=None, **kw
    ):
        return time.monotonic() - start


def test_logins_fast_while_200_idle_or_slow_banner_sockets_are_open(stack: Stack) -> None:
    """With 200 silent or slow-banner sockets on each port, a technician and a device still
    log in in under 2 s."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    device_id = stack.add_device(key)
    tech_port, device_port = stack.server.technician_port, stack.server.device_port
    with _flood(tech_port, 200, per_source=16), _flood(device_port, 200, per_source=16):
        took = asyncio.run(_timed_login(tech_port, "partner", password=GATE, client_keys=None))
        assert took < 2.0, took
        took = asyncio.run(_timed_login(device_port, device_id, client_keys=[key]))
        assert took < 2.0, took


def test_total_unauthenticated_cap(rly_factory: RlyFactory) -> None:
    """Beyond relay.max_unauthenticated (all sources together) a connection is closed at once;
    a freed slot admits the next."""
    config = {"relay": {"max_unauthenticated": 20, "max_unauthenticated_per_source": 16}}
    port = rly_factory(config=config).technician_port
    socks = [_open(port, _source(0)) for _ in range(16)] + [
        _open(port, _source(1)) for _ in range(4)
    ]
    try:
        assert all(_admitted(s) for s in socks)
        extra = _open(port, _source(2))
        socks.append(extra)
        assert not _admitted(extra)
        for sock in socks[:5]:
            sock.close()
        time.sleep(0.3)
        again = _open(port, _source(3))
        socks.append(again)
        assert _admitted(again)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("which", ["technician", "device"])
def test_per_source_unauthenticated_cap(stack: Stack, which: str) -> None:
    """Beyond relay.max_unauthenticated_per_source from one address, a connection to either
    SSH port is closed at once while another address is still admitted."""
    port = stack.server.technician_port if which == "technician" else stack.server.device_port
    cap = Settings().relay.max_unauthenticated_per_source
    socks = [_open(port, _source(0)) for _ in range(cap)]
    try:
        assert all(_admitted(s) for s in socks)
        extra = _open(port, _source(0))
        socks.append(extra)
        assert not _admitted(extra), f"{which} port admitted connection {cap + 1} from one source"
        other = _open(port, _source(1))
        socks.append(other)
        assert _admitted(other)
    finally:
        for sock in socks:
            sock.close()


def test_login_grace_closes_idle_connections(rly_factory: RlyFactory) -> None:
    """A connection that does not log in within relay.login_grace is closed (default <= 30 s)."""
    assert Settings().relay.login_grace <= 30
    server = rly_factory(config={"relay": {"login_grace": "2s"}})
    socks = [_open(server.technician_port, _source(0)), _open(server.device_port, _source(0))]
    try:
        start = time.monotonic()
        for sock in socks:
            assert _admitted(sock)  # sent a version line, then nothing more
        for sock in socks:
            sock.settimeout(6)
            with contextlib.suppress(ConnectionError):
                while sock.recv(65536):
                    pass
        assert time.monotonic() - start < 2 + 1.5
    finally:
        for sock in socks:
            sock.close()


async def _wrong_password(port: int, source: str) -> float:
    start = time.monotonic()
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            port,
            username="partner",
            password="not-the-gate",
            client_keys=None,
            known_hosts=None,
            agent_path=None,
            config=None,
            local_addr=(source, 0),
            preferred_auth="password",
        )
    return time.monotonic() - start


def test_gate_brute_force_is_penalised_per_source(stack: Stack) -> None:
    """A source guessing the gate password waits longer for each failure, while another source
    still logs in at once; failures are audited without the guess."""
    port = stack.server.technician_port

    async def attack() -> tuple[list[float], float]:
        times = [await _wrong_password(port, _source(0)) for _ in range(5)]
        login = await _timed_login(port, "partner", password=GATE, client_keys=None)
        return times, login

    times, login = asyncio.run(attack())
    assert times[-1] >= 1.0 and times[-1] > times[0], times
    assert login < 1.0, login
    failed = stack.audit("technician.login_failed")
    assert len(failed) >= 5 and all(r.source_ip == _source(0) for r in failed)
    assert not any("not-the-gate" in f"{r.detail} {r.actor} {r.target}" for r in failed)
