"""Body limits and error shapes: bad input gets one JSON line and changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncssh

from tests.tracker.harness import TrackerEnv

LIMIT = 64 * 1024


def _enroll_body(env: TrackerEnv, hostname: str) -> bytes:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return json.dumps(
        {
            "token": env.token(),
            "hostname": hostname,
            "serial": "",
            "os_name": "",
            "os_version": "",
            "client_version": "1",
            "public_key": key.export_public_key().decode().strip(),
        }
    ).encode()


def test_oversize_body_refused(env: TrackerEnv) -> None:
    """A body over 64 KiB with a Content-Length is refused with 413 and changes nothing."""
    body = _enroll_body(env, "x" * (LIMIT + 10))
    before = env.snapshot()

    async def scenario() -> None:
        async with env.client() as api:
            response = await api.http.post("/api/v1/enroll", content=body)
        assert response.status_code == 413
        assert response.json() == {"error": "request body is larger than 64 KiB"}

    asyncio.run(scenario())
    assert env.snapshot() == before


def test_oversize_chunked_body_refused(env: TrackerEnv) -> None:
    """A chunked body without Content-Length is cut off at 64 KiB with 413."""
    body = _enroll_body(env, "x" * (LIMIT + 10))
    before = env.snapshot()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async def scenario() -> None:
        async with env.client() as api:
            request = api.http.build_request("POST", "/api/v1/enroll", content=chunks())
            assert "content-length" not in request.headers
            response = await api.http.send(request)
        assert response.status_code == 413
        assert response.json() == {"error": "request body is larger than 64 KiB"}

    asyncio.run(scenario())
    assert env.snapshot() == before


def test_body_at_limit_reaches_validation(env: TrackerEnv) -> None:
    """A body of exactly 64 KiB passes the size limit and is judged by validation instead."""
    body = _enroll_body(env, "")
    body = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(body) == LIMIT

    async def scenario() -> None:
        async with env.client() as api:
            response = await api.http.post(
                "/api/v1/enroll", content=body, headers={"Content-Type": "application/json"}
            )
        assert response.status_code == 400
        assert response.json() == {"error": "hostname must not be empty"}

    asyncio.run(scenario())


def test_malformed_json_is_one_line_400(env: TrackerEnv) -> None:
    """Malformed JSON is a 400 with a one-line error and creates nothing."""
    before = env.snapshot()

    async def scenario() -> None:
        async with env.client() as api:
            response = await api.http.post(
                "/api/v1/enroll",
                content=b'{"token": "abc", ',
                headers={"Content-Type": "application/json"},
            )
        assert response.status_code == 400
        assert response.json() == {"error": "request body is not valid JSON"}

    asyncio.run(scenario())
    assert env.snapshot() == before


def test_missing_and_extra_fields_named(env: TrackerEnv) -> None:
    """A missing field and an unknown field are each a 400 naming the field."""

    async def scenario() -> None:
        async with env.client() as api:
            missing = await api.http.post("/api/v1/enroll", json={"token": "t"})
            body = json.loads(_enroll_body(env, "h")) | {"shell\n": "rm"}
            extra = await api.http.post("/api/v1/enroll", json=body)
        assert missing.status_code == 400
        assert missing.json() == {"error": "hostname is required"}
        assert extra.status_code == 400
        assert extra.json()["error"].startswith("shell")
        assert "\n" not in extra.json()["error"]

    asyncio.run(scenario())


def test_unknown_route_is_json_404(env: TrackerEnv) -> None:
    """Unknown API paths answer a JSON error too."""

    async def scenario() -> None:
        async with env.client() as api:
            response = await api.http.get("/api/v1/nope")
        assert response.status_code == 404
        assert set(response.json()) == {"error"}

    asyncio.run(scenario())
