"""Devices, sessions, audit and allowlist pages: scoped to the account, changed only by admins."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from core.models import AllowlistEntry, Device, SshSession, Tunnel, User, utcnow
from tests.portal.support import Client, PortalEnv


def _device(env: PortalEnv, device_id: str, account_id: int, status: str = "pending") -> None:
    with env.sessions() as s, s.begin():
        s.add(
            Device(
                id=device_id,
                account_id=account_id,
                hostname=f"host-{device_id}",
                serial=f"SN-{device_id}",
                public_key="ssh-ed25519 AAAA",
                key_fingerprint=f"SHA256:{device_id}",
                status=status,
            )
        )


def _account_of(env: PortalEnv, user_id: int) -> int:
    with env.sessions() as s:
        account = s.scalar(select(User.account_id).where(User.id == user_id))
        assert account is not None
        return account


def _client(
    env: PortalEnv, name: str, role: str = "technician", account: str = "acme", sa: bool = False
) -> tuple[Client, int]:
    user = env.add_user(name, role=role, account=account, superadmin=sa)
    client = env.client()
    client.login_user(user)
    return client, _account_of(env, user.id)


def test_devices_page_shows_state_and_only_own_account(env: PortalEnv) -> None:
    """Devices list shows online/offline/pending and fingerprints, only for the user's account."""
    client, acme = _client(env, "alice")
    _, other = _client(env, "mallory", account="other")
    _device(env, "dev0000001", acme, "accepted")
    _device(env, "dev0000002", acme, "accepted")
    _device(env, "dev0000003", acme)
    _device(env, "dev0000009", other, "accepted")
    with env.sessions() as s, s.begin():
        s.add(
            Tunnel(
                device_id="dev0000001",
                relay_node="r",
                listen_port=1,
                peer_ip="x",
                peer_port=1,
                transport_port=2200,
            )
        )
        s.get_one(Device, "dev0000002").last_checkin_at = utcnow() - timedelta(hours=1)
    _device(env, "dev0000004", acme, "accepted")  # never checked in
    page = client.http.get("/devices").text
    assert "state-online" in page
    assert "state-offline" in page
    assert "state-pending" in page
    assert "never checked in" in page
    assert "dev0000009" not in page
    assert "SHA256:dev0000001" in client.http.get("/devices/dev0000001").text
    assert client.http.get("/devices/dev0000009").status_code == 404


def test_admin_accepts_and_revokes_devices(env: PortalEnv) -> None:
    """An admin's Accept and Revoke change the device and wake its relay."""
    client, acme = _client(env, "alice", role="admin")
    _device(env, "dev0000001", acme)
    assert client.post("/devices/dev0000001/accept").status_code == 303
    assert client.post("/devices/dev0000001/revoke", {"confirm": "yes"}).status_code == 303
    with env.sessions() as s:
        assert s.scalar(select(Device.status)) == "revoked"
    assert env.hub.topics == ["device:dev0000001", "device:dev0000001"]


def test_technician_and_other_accounts_cannot_change_devices(env: PortalEnv) -> None:
    """A technician gets 403 and another account's admin cannot touch the device."""
    tech, acme = _client(env, "tom")
    admin, _ = _client(env, "olga", role="admin", account="other")
    _device(env, "dev0000001", acme)
    assert tech.post("/devices/dev0000001/accept").status_code == 403
    assert admin.post("/devices/dev0000001/accept").status_code == 400
    with env.sessions() as s:
        assert s.scalar(select(Device.status)) == "pending"


def test_audit_is_for_admins_and_scoped(env: PortalEnv) -> None:
    """Technicians get 403; admins see their account; a superadmin sees everyone's."""
    tech, _ = _client(env, "tom")
    admin, _ = _client(env, "alice", role="admin")
    root, _ = _client(env, "root", role="admin", account="ops", sa=True)
    assert tech.http.get("/audit").status_code == 403
    own = admin.http.get("/audit").text
    assert "user:alice" in own
    assert "user:root" not in own
    assert "user:root" in root.http.get("/audit").text


def test_admin_edits_allowlist(env: PortalEnv) -> None:
    """Admins add and remove CIDRs; bad input is a one-line 400 that changes nothing."""
    client, _ = _client(env, "alice", role="admin")
    assert client.post("/allowlist/add", {"cidr": "203.0.113.7/24"}).status_code == 303
    assert "203.0.113.0/24" in client.http.get("/allowlist").text
    bad = client.post("/allowlist/add", {"cidr": "not-a-net"})
    assert bad.status_code == 400
    assert "not a CIDR" in bad.text
    assert env.count(AllowlistEntry) == 1
    assert client.post("/allowlist/remove", {"cidr": "203.0.113.0/24"}).status_code == 303
    assert env.count(AllowlistEntry) == 0


def test_sessions_page_lists_account_sessions(env: PortalEnv) -> None:
    """The sessions page shows the technician's own SSH sessions, live ones with Terminate."""
    client, acme = _client(env, "alice")
    with env.sessions() as s:
        alice_id = s.scalar(select(User.id).where(User.username == "alice"))
    _device(env, "dev0000001", acme, "accepted")
    with env.sessions() as s, s.begin():
        s.add(
            SshSession(
                id="sess000001",
                user_id=alice_id,
                username="alice",
                account_id=acme,
                device_id="dev0000001",
                relay_node="r",
                started_at=utcnow() - timedelta(minutes=5),
            )
        )
    page = client.http.get("/sessions").text
    assert "sess000001" in page
    assert "/sessions/sess000001/terminate" in page
