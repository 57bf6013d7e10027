"""Signed check-ins and the device's own view: only fresh, genuine requests count."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import asyncssh
import httpx

from core.devices import request_tunnel, revoke_device
from core.models import Device, Tunnel
from tests.tracker.harness import SignedDevice, TrackerEnv

Attempt = Callable[[SignedDevice], Awaitable[httpx.Response]]


def _check_refused(env: TrackerEnv, status: int, error: str, attempt: Attempt) -> None:
    """Run attempt(device) against a fresh accepted device; expect status and no change."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            assert (await device.checkin()).status_code == 200
            before = env.snapshot()
            response = await attempt(device)
            assert response.status_code == status, response.text
            assert response.json() == {"error": error}
            assert env.snapshot() == before

    asyncio.run(scenario())


def test_signed_checkin_records_device(env: TrackerEnv) -> None:
    """A signed check-in answers the contract reply and records time, ip, versions and uptime."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            response = await device.checkin()
        assert response.status_code == 200, response.text
        reply = response.json()
        assert {k: reply[k] for k in ("status", "action", "tunnel_mode", "next_checkin")} == {
            "status": "accepted",
            "action": "none",
            "tunnel_mode": "persistent",
            "next_checkin": 30.0,
        }
        assert abs(reply["server_time"] - time.time()) < 5
        stored = env.device(device.device_id)
        assert stored.last_request_ms == device.last_ms
        assert stored.last_checkin_ip == "192.0.2.7"
        assert (stored.client_version, stored.os_version, stored.uptime) == (
            "0.1.1",
            "12.5",
            1234.5,
        )
        assert stored.last_checkin_at is not None

    asyncio.run(scenario())


def test_pending_device_checkin(env: TrackerEnv) -> None:
    """A pending device gets status pending and action none, and its check-in is recorded."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token())
            with env.prepared.sessions() as session, session.begin():
                target = session.get(Device, device.device_id)
                assert target is not None
                request_tunnel(session, target, "open")
            response = await device.checkin()
        assert response.json()["status"] == "pending"
        assert response.json()["action"] == "none"
        assert env.device(device.device_id).last_checkin_at is not None

    asyncio.run(scenario())


def test_skewed_timestamp_refused(env: TrackerEnv) -> None:
    """A timestamp outside the allowed clock skew is refused with 401."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        body = device.body()
        stale = time.time_ns() // 1_000_000 - 301_000
        return await device.send(body, device.sign(body, timestamp_ms=stale))

    _check_refused(env, 401, "timestamp outside the allowed window", attempt)


def test_replayed_request_refused(env: TrackerEnv) -> None:
    """Sending the same signed request twice is refused the second time."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            body = device.body()
            headers = device.sign(body)
            assert (await device.send(body, headers)).status_code == 200
            before = env.snapshot()
            again = await device.send(body, headers)
            assert again.status_code == 401
            assert again.json() == {"error": "replayed request"}
            assert env.snapshot() == before

    asyncio.run(scenario())


def test_tampered_body_refused(env: TrackerEnv) -> None:
    """A body changed after signing fails the signature check."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        body = device.body()
        headers = device.sign(body)
        return await device.send(body.replace(b"1234.5", b"9999.5"), headers)

    _check_refused(env, 401, "bad signature", attempt)


def test_wrong_key_refused(env: TrackerEnv) -> None:
    """A request signed with another key is refused."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        body = device.body()
        other = asyncssh.generate_private_key("ssh-ed25519")
        return await device.send(body, device.sign(body, key=other))

    _check_refused(env, 401, "bad signature", attempt)


def test_signed_path_must_match(env: TrackerEnv) -> None:
    """A signature over another path (without the /api/v1 prefix) is refused."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        body = device.body()
        return await device.send(body, device.sign(body, path="/checkin"))

    _check_refused(env, 401, "bad signature", attempt)


def test_revoked_device_refused(env: TrackerEnv) -> None:
    """A revoked device's check-in gets 403 device revoked and is not recorded."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        with env.prepared.sessions() as session, session.begin():
            revoke_device(session, device_id=device.device_id, actor="test")
        before = env.snapshot()
        response = await device.checkin()
        assert env.snapshot() == before
        return response

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            response = await attempt(device)
        assert response.status_code == 403
        assert response.json() == {"error": "device revoked"}
        assert env.device(device.device_id).tunnel_request == "close"

    asyncio.run(scenario())


def test_unknown_device_refused(env: TrackerEnv) -> None:
    """A well-formed but unknown device id gets 404."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        device.device_id = "zzzzzzzzzz"
        return await device.checkin()

    _check_refused(env, 404, "unknown device", attempt)


def test_body_device_id_must_match_header(env: TrackerEnv) -> None:
    """The device_id in the body must be the signing device's."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        body = device.body(device_id="abcdefghjk")
        return await device.send(body, device.sign(body))

    _check_refused(env, 400, "device_id does not match the X-Rly-Device header", attempt)


def test_missing_signature_headers(env: TrackerEnv) -> None:
    """An unsigned check-in is refused with 401."""

    async def attempt(device: SignedDevice) -> httpx.Response:
        return await device.send(device.body(), {})

    _check_refused(env, 401, "missing signature headers", attempt)


def test_request_delivered_once(env: TrackerEnv) -> None:
    """A reconnect request is answered once, then cleared."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(auto_accept=True))
            with env.prepared.sessions() as session, session.begin():
                target = session.get(Device, device.device_id)
                assert target is not None
                request_tunnel(session, target, "reconnect")
            first = await device.checkin()
            second = await device.checkin()
        assert first.json()["action"] == "reconnect"
        assert second.json()["action"] == "none"
        assert env.device(device.device_id).tunnel_request is None

    asyncio.run(scenario())


def test_device_status_view(env: TrackerEnv) -> None:
    """A device reads its own status and open tunnel, and not another device's."""

    async def scenario() -> None:
        async with env.client() as api:
            token = env.token(auto_accept=True, uses=2)
            device = await api.enroll(token)
            other = await api.enroll(token)
            with env.prepared.sessions() as session, session.begin():
                session.add(
                    Tunnel(
                        device_id=device.device_id,
                        relay_node="node-1",
                        listen_port=40001,
                        peer_ip="192.0.2.7",
                        peer_port=5555,
                        transport_port=2200,
                    )
                )
            own = await device.status()
            own_ms = device.last_ms
            foreign = await device.status(other.device_id)
        assert own.status_code == 200, own.text
        view = own.json()
        assert (view["device_id"], view["status"]) == (device.device_id, "accepted")
        assert view["tunnel"]["relay_node"] == "node-1"
        assert view["tunnel"]["listen_port"] == 40001
        assert foreign.status_code == 403
        assert env.device(device.device_id).last_request_ms == own_ms

    asyncio.run(scenario())


def test_openapi_served_under_api_prefix(env: TrackerEnv) -> None:
    """The tracker's OpenAPI document is at /api/v1/openapi.json and lists the three routes."""

    async def scenario() -> None:
        async with env.client() as api:
            response = await api.http.get("/api/v1/openapi.json")
        assert response.status_code == 200
        assert set(response.json()["paths"]) == {"/enroll", "/checkin", "/devices/{device_id}"}
        body = json.dumps(response.json())
        assert "X-Rly-Signature" in body

    asyncio.run(scenario())
