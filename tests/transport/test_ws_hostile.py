"""Hostile peers on the WebSocket tunnel endpoint: bounded time and memory, tunnels unaffected.

One `rly serve` holds a real rly-client's tunnel over ws:// while raw sockets
send garbage, never upgrade, upgrade and stay silent, send oversized or text
messages, or flood frames without reading. Each is dropped within its bound,
the relay's memory stays bounded, and the device's tunnel stays up.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.frames import Frame, Opcode

from tests.e2e.stack import wait_for
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyServer
from tests.transport.test_proxy import open_tunnel, root_shell, token

CLIENT = (sys.executable, "-m", "device_client.cli")
HEADER_DEADLINE = 10.0  # rly.http_limits.HEADER_TIMEOUT
PREAMBLE_DEADLINE = 5.0  # core.data_wire.PREAMBLE_TIMEOUT
SLACK = 3.0


class World:
    def __init__(self, server: RlyServer, device: str) -> None:
        self.server, self.device = server, device
        self.port = server.http_port


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A relay with one device whose tunnel runs over ws:// (builtin root shell)."""
    workdir = tmp_path_factory.mktemp("ws-hostile")
    workdir.chmod(0o700)
    server = RlyServer(workdir, config={"relay": {"keepalive_interval": "2s"}})
    processes = ProcessFactory(workdir)
    server.start()
    try:
        server.run_cli("account", "add", "acme", check=True)
        from tests.relay.test_technician_support import TechDb

        db = TechDb(server.data_dir)
        db.add_user("alice", "acme")
        db.close()
        config = workdir / "dev" / "client.toml"
        argv = [*CLIENT, "enroll", "--tracker", server.base_url, "--token", token(server)]
        enroll = processes([*argv, "--config", str(config), "--target", "builtin"], name="enroll")
        assert enroll.wait(30) == 0, enroll.output
        match = re.search(r"enrolled: device (\S+),", enroll.stdout)
        assert match, enroll.output
        ws = server.base_url.replace("http://", "ws://") + "/api/v1/tunnel"
        config.write_text(config.read_text() + f'relay_endpoints = ["{ws}"]\n')
        processes([*CLIENT, "run", "--config", str(config)], name="rly-client")
        wait_for(lambda: open_tunnel(server, match.group(1)), 20, "ws tunnel")
        yield World(server, match.group(1))
    finally:
        processes.stop_all()
        server.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def closed_within(sock: socket.socket, limit: float, started: float | None = None) -> float:
    """Seconds from `started` (default: now) until the relay closes `sock`; fail past `limit`."""
    started = time.monotonic() if started is None else started
    sock.settimeout(0.5)
    while time.monotonic() - started < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    raise AssertionError(f"the relay kept the connection open for over {limit}s")


def upgraded(port: int) -> socket.socket:
    """A raw socket that completed the WebSocket upgrade on /api/v1/tunnel."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /api/v1/tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        assert chunk, reply
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 101"), reply
    return sock


def frame(opcode: Opcode, payload: bytes, *, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=True)


def tunnel_still_up(world: World) -> None:
    row = open_tunnel(world.server, world.device)
    assert row is not None and row.transport == "ws"


def test_garbage_and_silence_are_dropped_in_bounded_time(world: World) -> None:
    """Garbage instead of HTTP is refused at once; a peer that never upgrades is closed at the
    header deadline; one that upgrades and sends nothing at the device port's preamble
    deadline; non-SSH bytes after the upgrade at once."""
    opened = time.monotonic()
    garbage = socket.create_connection(("127.0.0.1", world.port))
    garbage.sendall(os.urandom(4096))
    silent = socket.create_connection(("127.0.0.1", world.port))
    half = socket.create_connection(("127.0.0.1", world.port))
    half.sendall(b"GET /api/v1/tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    quiet = upgraded(world.port)
    noise = upgraded(world.port)
    noise.sendall(frame(Opcode.BINARY, b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64)))
    assert closed_within(garbage, 2) < 2
    assert closed_within(noise, 2) < 2
    assert closed_within(quiet, PREAMBLE_DEADLINE + SLACK, opened) >= PREAMBLE_DEADLINE - 1
    assert closed_within(silent, HEADER_DEADLINE + SLACK, opened) >= HEADER_DEADLINE - 1
    assert closed_within(half, HEADER_DEADLINE + SLACK, opened) >= HEADER_DEADLINE - 1
    tunnel_still_up(world)


def test_frame_floods_cost_bounded_memory_and_leave_tunnels_alone(world: World) -> None:
    """An oversized message, a text message, a ping flood that reads nothing, and a flood of
    tiny binary frames: each connection is dropped, the relay's RSS stays within a few MiB,
    and the device's tunnel still gives a root shell."""
    pid = world.server.process.pid if world.server.process else 0
    before = rss_kib(pid)

    big = upgraded(world.port)
    with contextlib.suppress(OSError):  # the relay may drop us before the message is sent
        big.sendall(frame(Opcode.BINARY, b"SSH-2.0-x\r\n" + b"\0" * (2 * 1024 * 1024)))
    text = upgraded(world.port)
    with contextlib.suppress(OSError):
        text.sendall(frame(Opcode.TEXT, b"SSH-2.0-hello\r\n"))

    pings = upgraded(world.port)
    pings.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    burst = frame(Opcode.PING, b"p" * 125) * 1000
    sent = 0
    pings.settimeout(5)
    try:
        for _ in range(400):  # up to 400k pings (~52 MiB of pongs if nothing bounded them)
            pings.sendall(burst)
            sent += 1000
    except OSError:
        pass  # the relay dropped us

    tiny = upgraded(world.port)
    tiny.sendall(frame(Opcode.BINARY, b"SSH-2.0-flood"))
    with contextlib.suppress(OSError):
        tiny.sendall(frame(Opcode.BINARY, b"x") * 50_000)  # a version line that never ends

    for sock in (big, text, pings, tiny):
        closed_within(sock, 15)
    grown = rss_kib(pid) - before
    assert grown < 20 * 1024, f"relay RSS grew by {grown} KiB"
    tunnel_still_up(world)
    root_shell(world.server, world.device)
