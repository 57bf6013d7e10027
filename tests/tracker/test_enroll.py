"""Enrollment: tokens are consumed once, refusals change nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncssh
from sqlalchemy import select, update

from core.enroll_tokens import revoke_token
from core.models import AuditEvent, EnrollToken, RelayNode, utcnow
from tests.tracker.harness import TrackerEnv
from tracker.placement import NodeEndpoint, rank


def test_enroll_pending_reply(env: TrackerEnv) -> None:
    """A normal token enrolls a pending device and answers the full contract reply."""

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token(uses=2))
        reply = device.enrolled
        assert reply["status"] == "pending"
        assert reply["relay_hosts"] == ["localhost"]
        assert reply["relay_ports"] == [2200]
        assert reply["relay_host_ca"] == env.prepared.keys.host_ca_public
        assert reply["user_ca"] == env.prepared.keys.user_ca_public
        assert reply["login_user"] == "root"
        assert reply["tunnel_mode"] == "persistent"
        assert reply["checkin_interval"] == 30.0
        stored = env.device(device.device_id)
        assert (stored.status, stored.account_id, stored.hostname) == (
            "pending",
            env.account_id,
            "appliance-1",
        )
        assert env.snapshot()["uses"] == 1

    asyncio.run(scenario())


def test_enroll_auto_accept_and_audit(env: TrackerEnv) -> None:
    """An auto-accept token enrolls an accepted device and audits it without the token."""

    async def scenario() -> None:
        token = env.token(auto_accept=True)
        async with env.client() as api:
            device = await api.enroll(token)
        assert device.enrolled["status"] == "accepted"
        assert env.device(device.device_id).accepted_at is not None
        with env.prepared.sessions() as session:
            event = session.scalar(select(AuditEvent).where(AuditEvent.action == "device.enroll"))
        assert event is not None
        assert event.target == device.device_id
        assert event.source_ip == "192.0.2.7"
        assert token not in f"{event.actor} {event.detail}"

    asyncio.run(scenario())


def test_enroll_relay_hosts_from_live_nodes(env: TrackerEnv) -> None:
    """Relay hosts and ports come from live relay nodes, in the device's placement order."""
    with env.prepared.sessions() as session, session.begin():
        for name, host, ports, age in (
            ("a", "r1.example", "2200,443", 5),
            ("b", "r2.example", "443,2201", 10),
            ("c", "stale.example", "9999", 120),
        ):
            session.add(
                RelayNode(
                    name=name,
                    public_host=host,
                    device_ports=ports,
                    technician_port=2222,
                    last_seen_at=utcnow() - timedelta(seconds=age),
                )
            )

    async def scenario() -> None:
        async with env.client() as api:
            device = await api.enroll(env.token())
        live = [
            NodeEndpoint("a", "r1.example", (2200, 443)),
            NodeEndpoint("b", "r2.example", (443, 2201)),
        ]
        order = rank(device.device_id, live)  # rendezvous hashing; the stale node is left out
        assert device.enrolled["relay_hosts"] == [n.host for n in order]
        assert device.enrolled["relay_ports"] == list(
            dict.fromkeys(p for n in order for p in n.ports)
        )

    asyncio.run(scenario())


def _refused(env: TrackerEnv, token: str, status: int, error: str) -> None:
    before = env.snapshot()

    async def scenario() -> None:
        async with env.client() as api:
            key = asyncssh.generate_private_key("ssh-ed25519")
            response = await api.post_enroll(token, key)
        assert response.status_code == status
        assert response.json() == {"error": error}

    asyncio.run(scenario())
    assert env.snapshot() == before


def test_expired_token_refused(env: TrackerEnv) -> None:
    """An expired token is refused with 403 and consumes nothing."""
    token = env.token(uses=3)
    with env.prepared.sessions() as session, session.begin():
        session.execute(update(EnrollToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    _refused(env, token, 403, "enrollment token has expired")


def test_revoked_token_refused_as_revoked(env: TrackerEnv) -> None:
    """A token revoked in the portal (core.enroll_tokens) is refused with that word, uses left."""
    token = env.token(uses=3)
    with env.prepared.sessions() as session, session.begin():
        token_id = session.scalars(select(EnrollToken.id)).one()
        revoke_token(session, token_id=token_id, account_id=None, actor="test")
    _refused(env, token, 403, "enrollment token has been revoked")


def test_used_up_token_refused(env: TrackerEnv) -> None:
    """A single-use token enrolls one device; the second attempt gets 403."""
    token = env.token(uses=1)

    async def first() -> None:
        async with env.client() as api:
            await api.enroll(token)

    asyncio.run(first())
    _refused(env, token, 403, "enrollment token has been used up")


def test_unknown_token_refused(env: TrackerEnv) -> None:
    """A token that was never issued is refused with 403."""
    env.token()
    _refused(env, "not-a-real-token", 403, "unknown enrollment token")


def test_same_hostname_twice_gets_two_ids(env: TrackerEnv) -> None:
    """Two devices with the same hostname but different keys get different ids."""

    async def scenario() -> None:
        token = env.token(uses=2)
        async with env.client() as api:
            first = await api.enroll(token, hostname="same")
            second = await api.enroll(token, hostname="same")
        assert first.device_id != second.device_id

    asyncio.run(scenario())


def test_duplicate_key_conflict(env: TrackerEnv) -> None:
    """Enrolling the same public key twice answers 409 and keeps the token use."""

    async def scenario() -> None:
        token = env.token(uses=5)
        key = asyncssh.generate_private_key("ssh-ed25519")
        async with env.client() as api:
            assert (await api.post_enroll(token, key)).status_code == 200
            before = env.snapshot()
            again = await api.post_enroll(token, key, hostname="other")
        assert again.status_code == 409
        assert again.json() == {"error": "this device key is already enrolled"}
        assert env.snapshot() == before

    asyncio.run(scenario())


def test_control_characters_in_hostname(env: TrackerEnv) -> None:
    """A hostname with control characters is a 400 naming the field, and nothing changes."""
    token = env.token()
    before = env.snapshot()

    async def scenario() -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        async with env.client() as api:
            response = await api.post_enroll(token, key, hostname="evil\x1b[2Jhost")
        assert response.status_code == 400
        assert response.json() == {"error": "hostname contains control characters"}

    asyncio.run(scenario())
    assert env.snapshot() == before


def test_non_ed25519_key_refused(env: TrackerEnv) -> None:
    """Device keys must be ssh-ed25519, the only algorithm request signatures use."""
    token = env.token()

    async def scenario() -> None:
        key = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
        async with env.client() as api:
            response = await api.post_enroll(token, key)
        assert response.status_code == 400
        assert response.json() == {"error": "public_key must be an ssh-ed25519 key"}

    asyncio.run(scenario())
