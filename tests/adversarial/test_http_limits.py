"""HTTP server limits against a real `rly serve`: header read deadline, slowloris, body cap."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import httpx
import pytest

from rly.http_limits import HEADER_TIMEOUT
from tests.support.rly_server import RlyFactory, RlyServer

TRICKLERS = 200


@pytest.fixture
def server(rly_factory: RlyFactory) -> RlyServer:
    return rly_factory()


async def _trickle(port: int, opened: list[float], closed: list[float]) -> None:
    """Send a request line, then one header byte a second, until the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened.append(time.monotonic())
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        for _ in range(int(HEADER_TIMEOUT * 3)):
            writer.write(b"X")
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(1024), 1.0)
            except TimeoutError:
                continue
            if not data:
                break
    except (ConnectionError, OSError):
        pass
    finally:
        closed.append(time.monotonic())
        writer.close()


async def _idle(port: int, closed: list[float]) -> None:
    """Connect and send nothing at all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.wait_for(reader.read(1024), HEADER_TIMEOUT * 3)
    except (ConnectionError, OSError):
        pass
    finally:
        closed.append(time.monotonic())
        writer.close()


async def _real_requests(base: str, until: float) -> list[float]:
    """GET /healthz once a second while the attack runs; return each latency."""
    latencies = []
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while time.monotonic() < until:
            start = time.monotonic()
            response = await client.get("/healthz", headers={"Connection": "close"})
            assert response.status_code == 200
            latencies.append(time.monotonic() - start)
            await asyncio.sleep(1.0)
    return latencies


def test_slowloris_closed_at_header_deadline_real_requests_answered(server: RlyServer) -> None:
    """200 trickling + 20 silent sockets close at the header deadline; real requests take < 1 s."""

    async def attack() -> tuple[list[float], list[float], list[float], list[float]]:
        opened: list[float] = []
        closed: list[float] = []
        idle_closed: list[float] = []
        start = time.monotonic()
        attackers = [_trickle(server.http_port, opened, closed) for _ in range(TRICKLERS)]
        attackers += [_idle(server.http_port, idle_closed) for _ in range(20)]
        real = _real_requests(server.base_url, start + HEADER_TIMEOUT + 1)
        latencies = (await asyncio.gather(real, *attackers))[0]
        assert latencies is not None
        return opened, closed, idle_closed, latencies

    start = time.monotonic()
    opened, closed, idle_closed, latencies = asyncio.run(attack())
    assert len(opened) == TRICKLERS
    assert len(closed) == TRICKLERS and len(idle_closed) == 20
    assert max(closed) - min(opened) < HEADER_TIMEOUT + 3, "tricklers outlived the deadline"
    assert min(closed) - start >= HEADER_TIMEOUT - 0.5, "closed before the deadline"
    assert max(idle_closed) - start < HEADER_TIMEOUT + 3
    assert latencies and max(latencies) < 1.0, latencies
    assert server.process is not None and server.process.running


def test_portal_and_api_bodies_over_64_kib_are_refused(server: RlyServer) -> None:
    """Request bodies over 64 KiB get 413 on the portal and the API, declared or chunked."""
    big = b"username=" + b"a" * (65 * 1024)
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert client.post("/login", content=big, headers=form).status_code == 413
        chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))
        assert client.post("/login", content=chunks, headers=form).status_code == 413
        json_big = b'{"token": "' + b"a" * (65 * 1024) + b'"}'
        response = client.post("/api/v1/enroll", content=json_big)
        assert response.status_code == 413
        assert "error" in response.json()
        assert client.get("/healthz").status_code == 200


def _exchange(port: int, *requests: bytes) -> bytes:
    """Send each request on one connection, pausing between them; return all replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for request in requests:
            sock.sendall(request)
            time.sleep(0.2)
        replies = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                replies += chunk
    return replies


def _flood(port: int, data: bytes) -> bool:
    """True if the server hung up before taking all of `data`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except ConnectionError:
            return True
    return False


def test_oversized_headers_are_refused_and_memory_stays_flat(server: RlyServer) -> None:
    """Request line + headers over 16 KiB get a 400 and a close; a 60 KiB body does not count."""
    port = server.http_port
    assert server.process is not None
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    endless = head + b"X-Big: " + b"a" * (17 * 1024)  # a header value that has not ended
    many = head + b"".join(b"X-%d: v\r\n" % i for i in range(2000))  # ~20 KiB of headers
    for request in (endless, many):
        reply = _exchange(port, request)
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
        assert b"Request headers too large." in reply
    replies = _exchange(port, head + b"\r\n", endless)  # the second request on a keep-alive
    assert replies.startswith(b"HTTP/1.1 200 "), replies[:80]
    assert replies.count(b"HTTP/1.1 ") == 2 and b"Request headers too large." in replies

    near_limit = head + b"X-Fine: " + b"a" * (12 * 1024) + b"\r\nConnection: close\r\n\r\n"
    assert _exchange(port, near_limit).startswith(b"HTTP/1.1 200 ")
    body = b'{"token": "' + b"a" * (60 * 1024) + b'"}'
    post = (
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body
    reply = _exchange(port, post)
    assert b"application/json" in reply and b"too large" not in reply, reply[:300]  # the app's word

    rss_before = _rss_kib(server.process.pid)
    flood = head + b"X-Big: " + b"a" * (64 << 20)
    assert all(_flood(port, flood) for _ in range(4)), "the server kept reading headers"
    assert _rss_kib(server.process.pid) - rss_before < 16 * 1024, "headers were buffered"
    with httpx.Client(base_url=server.base_url, timeout=5) as client:
        assert client.get("/healthz").status_code == 200


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")
