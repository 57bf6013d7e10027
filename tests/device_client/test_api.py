"""The tracker client: signed requests, reply checks and one-line errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncssh
import httpx
import pytest

from core.signing import verify_request
from device_client.api import TrackerClient, TrackerError

KEY = asyncssh.generate_private_key("ssh-ed25519")
CHECKIN_REPLY = {
    "status": "accepted",
    "action": "none",
    "tunnel_mode": "persistent",
    "next_checkin": 0,
    "server_time": 1.0,
}


def _client(handler: Any, base: str = "http://tracker.test") -> TrackerClient:
    return TrackerClient(base, device_id="dev-1", key=KEY, transport=httpx.MockTransport(handler))


def test_checkins_are_signed_with_increasing_timestamps() -> None:
    """Each check-in verifies against the device key and carries a fresh, larger timestamp."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=CHECKIN_REPLY)

    async def scenario() -> None:
        async with _client(handler, "http://tracker.test/rly/") as client:
            for _ in range(3):
                reply = await client.checkin({"device_id": "dev-1", "wait": 0})
                assert reply.action == "none"

    asyncio.run(scenario())
    last = None
    for request in seen:
        assert request.url.path == "/rly/api/v1/checkin"
        stamp = int(request.headers["x-rly-timestamp"])
        last = verify_request(
            public_key=KEY,
            headers=dict(request.headers),
            method="POST",
            path=request.url.path,
            body=request.content,
            now_ms=stamp,
            last_ms=last,
        )
    assert json.loads(seen[0].content)["device_id"] == "dev-1"


def test_enroll_is_not_signed() -> None:
    """Enrollment carries the token, not a signature (the device has no identity yet)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(403, json={"error": "enrollment token expired\nsecond line"})

    async def scenario() -> None:
        async with TrackerClient("http://t.test", transport=httpx.MockTransport(handler)) as c:
            with pytest.raises(TrackerError) as exc:
                await c.enroll({"token": "t"})
            assert exc.value.status_code == 403
            assert str(exc.value) == "tracker refused the request (403): enrollment token expired"

    asyncio.run(scenario())
    assert "x-rly-signature" not in seen[0].headers


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(200, json={**CHECKIN_REPLY, "action": 5}), "'action'"),
        (httpx.Response(200, json=[1]), "not a JSON object"),
        (httpx.Response(200, text="<html>"), "not JSON"),
        (httpx.Response(502, text="bad gateway"), "HTTP 502"),
    ],
)
def test_bad_replies_are_one_line_errors(response: httpx.Response, message: str) -> None:
    """Malformed or failed replies raise TrackerError with a one-line reason."""

    async def scenario() -> None:
        async with _client(lambda _request: response) as client:
            with pytest.raises(TrackerError, match=message) as exc:
                await client.checkin({"wait": 0})
            assert "\n" not in str(exc.value)

    asyncio.run(scenario())


def test_unreachable_tracker_is_a_tracker_error() -> None:
    """A connection failure becomes TrackerError naming the tracker, without a status code."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> None:
        async with _client(handler) as client:
            with pytest.raises(TrackerError, match=r"tracker http://tracker\.test unrea") as e:
                await client.device_status()
            assert e.value.status_code is None

    asyncio.run(scenario())
