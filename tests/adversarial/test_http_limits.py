"""HTTP server limits against a real `rly serve`: header read deadline, slowloris, body cap."""

from __future__ import annotations

import asyncio
import time

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
