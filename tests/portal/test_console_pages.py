"""Tokens, devices, sessions, users and dashboard pages, in process: rules, scope and audit rows."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import asyncssh
from sqlalchemy import select

from approval_portal.pages import tunnel_chart
from core.models import (
    Account,
    AuditEvent,
    Device,
    EnrollToken,
    PortalSession,
    SshSession,
    Tunnel,
    User,
    UserKey,
    utcnow,
)
from tests.portal.support import Client, PortalEnv, TestUser


def _login(env: PortalEnv, name: str, role: str = "technician") -> tuple[Client, TestUser]:
    user = env.add_user(name, role=role)
    client = env.client()
    client.login_user(user)
    return client, user


def _account(env: PortalEnv, user: TestUser) -> int:
    with env.sessions() as s:
        return s.get_one(User, user.id).account_id


def _device(env: PortalEnv, device_id: str, account_id: int, **kw: object) -> None:
    with env.sessions() as s, s.begin():
        s.add(
            Device(
                id=device_id,
                account_id=account_id,
                hostname=kw.pop("hostname", f"host-{device_id}"),
                serial=kw.pop("serial", f"SN-{device_id}"),
                public_key="ssh-ed25519 AAAA",
                key_fingerprint=f"SHA256:{device_id}",
                **kw,
            )
        )


def _actions(env: PortalEnv) -> list[str]:
    with env.sessions() as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


def test_token_created_shown_once_listed_and_revoked(env: PortalEnv) -> None:
    """A portal token has the CLI's rules and audit row; its command shows once; revoke ends it."""
    admin, _ = _login(env, "alice", role="admin")
    created = admin.post("/tokens", {"uses": "3", "ttl": "2h", "auto_accept": "yes"})
    assert created.status_code == 200
    command = re.search(r'id="install-command">([^<]+)<', created.text)
    assert command, created.text
    line = html.unescape(command.group(1))
    assert line.startswith("rly-client enroll --tracker http://localhost:8000 --token rlyet_")
    assert line.endswith(" && rly-client install-service")
    token = re.search(r"--token (\S+)", line)
    assert token
    listing = admin.http.get("/tokens").text
    assert token.group(1) not in listing  # shown once: never again
    assert "3 of 3" in listing
    with env.sessions() as s:
        row = s.scalars(select(EnrollToken)).one()
        assert row.auto_accept and row.uses_left == 3
        assert timedelta(minutes=119) < row.expires_at - utcnow() <= timedelta(hours=2)
    assert "enroll_token.create" in _actions(env)
    bad = admin.post("/tokens", {"uses": "0"})
    assert bad.status_code == 400 and "uses must be at least 1" in bad.text
    assert admin.post("/tokens", {"ttl": "soon"}).status_code == 400
    assert env.count(EnrollToken) == 1
    assert admin.post(f"/tokens/{row.id}/revoke").status_code == 303
    with env.sessions() as s:
        assert s.get_one(EnrollToken, row.id).revoked_at is not None
    assert "enroll_token.revoke" in _actions(env)
    assert "revoked" in admin.http.get("/tokens").text
    assert admin.post(f"/tokens/{row.id}/revoke").status_code == 400


def test_a_resubmitted_token_form_creates_no_second_token(env: PortalEnv) -> None:
    """Reloading the answer to the token form (same form nonce) is refused with one line."""
    admin, _ = _login(env, "alice", role="admin")
    nonce = re.search(r'name="nonce" value="([^"]+)"', admin.http.get("/tokens").text)
    assert nonce
    assert admin.post("/tokens", {"nonce": nonce.group(1)}).status_code == 200
    again = admin.post("/tokens", {"nonce": nonce.group(1)})
    assert again.status_code == 409 and "This form was already used" in again.text
    assert "install-command" not in again.text
    assert env.count(EnrollToken) == 1


def test_technician_cannot_reach_admin_pages_or_actions(env: PortalEnv) -> None:
    """Tokens, users, revoke confirmation and device actions are refused to a technician."""
    tech, user = _login(env, "tom")
    _device(env, "dev0000001", _account(env, user))
    for path in ("/tokens", "/users", "/users/tom", "/devices/dev0000001/revoke"):
        assert tech.http.get(path).status_code == 403, path
    for path in ("/tokens", "/users", "/users/tom/role", "/devices/dev0000001/repair"):
        assert tech.post(path, {"role": "admin"}).status_code == 403, path
    with env.sessions() as s:
        assert s.get_one(User, user.id).role == "technician"


def test_devices_search_filter_and_paging(env: PortalEnv) -> None:
    """Search by id/hostname/serial, filter by state, 25 per page with a next link."""
    admin, user = _login(env, "alice", role="admin")
    acme = _account(env, user)
    for i in range(30):
        _device(env, f"dev{i:07d}", acme, hostname=f"nas-{i:02d}", status="accepted")
    _device(env, "pend000001", acme, hostname="box-new", serial="XY-77")
    first = admin.http.get("/devices").text
    assert "box-new" in first  # pending sorts first
    assert "Page 1 of 2" in first and 'rel="next"' in first
    assert "nas-29" in admin.http.get("/devices?page=2").text
    assert "box-new" in admin.http.get("/devices?q=XY-7").text
    assert "nas-05" not in admin.http.get("/devices?q=XY-7").text
    assert "1 device matches" in admin.http.get("/devices?q=pend000001").text
    assert "1 device matches" in admin.http.get("/devices?state=pending").text
    never = admin.http.get("/devices?state=never").text
    assert "30 devices match" in never
    assert "0 devices match" in admin.http.get("/devices?state=online").text
    assert admin.http.get("/devices?q=%25").status_code == 200  # LIKE metacharacters are literal
    assert "0 devices match" in admin.http.get("/devices?q=%25").text


def test_revoke_needs_the_confirmation_form(env: PortalEnv) -> None:
    """A revoke POST without confirm=yes only leads to the confirmation page; with it, revokes."""
    admin, user = _login(env, "alice", role="admin")
    _device(env, "dev0000001", _account(env, user), status="accepted")
    unconfirmed = admin.post("/devices/dev0000001/revoke")
    assert unconfirmed.status_code == 303
    assert unconfirmed.headers["location"] == "/devices/dev0000001/revoke"
    page = admin.http.get("/devices/dev0000001/revoke").text
    assert 'name="confirm" value="yes"' in page
    with env.sessions() as s:
        assert s.get_one(Device, "dev0000001").status == "accepted"
    assert admin.post("/devices/dev0000001/revoke", {"confirm": "yes"}).status_code == 303
    with env.sessions() as s:
        assert s.get_one(Device, "dev0000001").status == "revoked"


def test_repair_close_and_tunnel_mode_reach_the_relay_through_the_row(env: PortalEnv) -> None:
    """Repair and close tunnel store the request the relay and tracker act on; mode is saved."""
    admin, user = _login(env, "alice", role="admin")
    _device(env, "dev0000001", _account(env, user), status="accepted")
    assert admin.post("/devices/dev0000001/repair").status_code == 303
    with env.sessions() as s:
        assert s.get_one(Device, "dev0000001").tunnel_request == "reconnect"
    assert admin.post("/devices/dev0000001/close-tunnel").status_code == 303
    with env.sessions() as s:
        assert s.get_one(Device, "dev0000001").tunnel_request == "close"
    assert admin.post("/devices/dev0000001/tunnel-mode", {"mode": "on-demand"}).status_code == 303
    assert admin.post("/devices/dev0000001/tunnel-mode", {"mode": "sometimes"}).status_code == 400
    with env.sessions() as s:
        assert s.get_one(Device, "dev0000001").tunnel_mode == "on-demand"
    assert env.hub.topics.count("device:dev0000001") == 3
    actions = _actions(env)
    assert {"device.repair", "tunnel.close_requested", "device.tunnel_mode"} <= set(actions)


def _session(env: PortalEnv, sid: str, user: TestUser, device_id: str) -> None:
    with env.sessions() as s, s.begin():
        s.add(
            SshSession(
                id=sid,
                user_id=user.id,
                username=user.username,
                account_id=s.get_one(User, user.id).account_id,
                device_id=device_id,
                relay_node="r1",
                client_ip="198.51.100.9",
                bytes_up=2048,
                bytes_down=5 * 1024 * 1024,
            )
        )


def test_technicians_see_and_end_only_their_own_sessions(env: PortalEnv) -> None:
    """A technician lists and ends only their sessions; an admin sees and ends the account's."""
    tech, tom = _login(env, "tom")
    admin, alice = _login(env, "alice", role="admin")
    _device(env, "dev0000001", _account(env, tom), status="accepted", hostname="nas-7")
    _session(env, "sesstom001", tom, "dev0000001")
    _session(env, "sessali001", alice, "dev0000001")
    own = tech.http.get("/sessions").text
    assert "sesstom001" in own and "sessali001" not in own
    assert "nas-7" in own and "5.0 MiB" in own and "2.0 KiB" in own
    assert tech.post("/sessions/sessali001/terminate").status_code == 404
    listed = admin.http.get("/sessions").text
    assert "sesstom001" in listed and "sessali001" in listed
    assert tech.post("/sessions/sesstom001/terminate").status_code == 303
    assert admin.post("/sessions/sessali001/terminate").status_code == 303
    with env.sessions() as s:
        rows = {r.id: r for r in s.scalars(select(SshSession))}
    assert rows["sesstom001"].close_requested and rows["sesstom001"].closed_by == "tom (portal)"
    assert rows["sessali001"].closed_by == "alice (portal)"
    assert env.hub.topics[-2:] == ["session:sesstom001", "session:sessali001"]


def test_last_admin_cannot_be_disabled_or_demoted(env: PortalEnv) -> None:
    """Disabling or demoting the only active admin is refused with one line; with two it works."""
    admin, alice = _login(env, "alice", role="admin")
    for action, data in (("disable", {}), ("role", {"role": "technician"})):
        refused = admin.post(f"/users/alice/{action}", data)
        assert refused.status_code == 400
        assert "would leave the account without an admin" in refused.text
    env.add_user("bob", role="admin")
    assert admin.post("/users/bob/role", {"role": "technician"}).status_code == 303
    assert admin.post("/users/alice/disable").status_code == 400  # bob is no admin now
    with env.sessions() as s:
        assert s.get_one(User, alice.id).role == "admin" and not s.get_one(User, alice.id).disabled
    assert "user.role" in _actions(env)


def test_disabled_user_is_logged_out_and_cannot_log_in(env: PortalEnv) -> None:
    """Disabling ends the user's live portal session and their SSH sessions (saying why),
    leaves others' sessions alone, and refuses the next login."""
    admin, alice = _login(env, "alice", role="admin")
    tech, tom = _login(env, "tom")
    _device(env, "dev0000001", _account(env, tom), status="accepted", hostname="nas-7")
    _session(env, "sesstom002", tom, "dev0000001")
    _session(env, "sessali002", alice, "dev0000001")
    assert tech.http.get("/sessions").status_code == 200
    assert admin.post("/users/tom/disable").status_code == 303
    with env.sessions() as s:
        rows = {r.id: r for r in s.scalars(select(SshSession))}
    assert rows["sesstom002"].close_requested
    assert rows["sesstom002"].closed_by == "alice (user disabled)"
    assert not rows["sessali002"].close_requested
    assert "session:sesstom002" in env.hub.topics
    assert tech.http.get("/sessions").status_code == 303  # back to the login page
    with env.sessions() as s:
        live = s.scalars(select(PortalSession).where(PortalSession.user_id == tom.id))
        assert all(p.revoked for p in live)
    env.clock.now += 30
    again = env.client().login(tom.username, tom.password, tom.code())
    assert again.status_code == 401
    assert "user.disable" in _actions(env)


def test_totp_reset_sends_the_next_login_to_enrolment(env: PortalEnv) -> None:
    """After a reset the old code no longer logs in fully: the password leads to /enrol."""
    admin, _ = _login(env, "alice", role="admin")
    env.add_user("tom")
    assert admin.post("/users/tom/reset-totp").status_code == 303
    with env.sessions() as s:
        tom = s.scalars(select(User).where(User.username == "tom")).one()
        assert not tom.totp_confirmed
    response = env.client().login("tom", "correct horse battery", "")
    assert response.status_code == 303 and response.headers["location"].startswith("/enrol")
    assert "user.reset_totp" in _actions(env)


def test_user_added_and_ssh_keys_added_and_removed(env: PortalEnv) -> None:
    """An admin adds a user and an SSH key, then removes the key; each is audited."""
    admin, _ = _login(env, "alice", role="admin")
    added = admin.post("/users", {"username": "carol", "role": "technician", "password": "x" * 16})
    assert added.status_code == 303
    assert admin.post("/users", {"username": "Bad Name", "password": "x" * 16}).status_code == 400
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    assert admin.post("/users/carol/add-key", {"key": key}).status_code == 303
    page = admin.http.get("/users/carol").text
    with env.sessions() as s:
        row = s.scalars(select(UserKey)).one()
    assert row.fingerprint in page
    assert admin.post("/users/carol/add-key", {"key": "not a key"}).status_code == 400
    assert admin.post("/users/carol/remove-key", {"key_id": str(row.id)}).status_code == 303
    assert env.count(UserKey) == 0
    assert {"user.add", "user.add_key", "user.remove_key"} <= set(_actions(env))


def test_other_accounts_users_are_out_of_reach(env: PortalEnv) -> None:
    """An admin cannot see or change a user of another account, nor a superadmin of their own."""
    admin, _ = _login(env, "alice", role="admin")
    env.add_user("root", role="admin", superadmin=True)
    refused = admin.post("/users/root/reset-totp")
    assert refused.status_code == 400 and "only a superadmin" in refused.text
    with env.sessions() as s:
        assert s.scalars(select(User).where(User.username == "root")).one().totp_confirmed
    env.add_user("olga", role="admin", account="other")
    assert admin.http.get("/users/olga").status_code == 404
    assert admin.post("/users/olga/disable").status_code == 404
    assert "olga" not in admin.http.get("/users").text
    with env.sessions() as s:
        assert not s.scalars(select(User).where(User.username == "olga")).one().disabled


def test_dashboard_lists_pending_devices_first_and_charts_tunnels(env: PortalEnv) -> None:
    """Pending devices come with Accept; a never-seen device is listed; the chart is an SVG."""
    admin, user = _login(env, "alice", role="admin")
    acme = _account(env, user)
    _device(env, "pend000001", acme, hostname="box-new")
    _device(env, "dev0000001", acme, hostname="nas-quiet", status="accepted")
    page = admin.http.get("/").text
    assert page.index("box-new") < page.index("nas-quiet")
    assert 'action="/devices/pend000001/accept"' in page
    assert "SHA256:pend000001" in page
    assert '<svg class="chart"' in page and "<script" not in page


def test_chart_counts_tunnels_open_at_each_instant(env: PortalEnv) -> None:
    """Tunnel rows' up and down times give the count online at each sample."""
    _, user = _login(env, "alice", role="admin")
    acme = _account(env, user)
    _device(env, "dev0000001", acme, status="accepted")
    _device(env, "dev0000002", acme, status="accepted")
    now = utcnow()

    def tunnel(device_id: str, up_hours_ago: float, down_hours_ago: float | None) -> Tunnel:
        return Tunnel(
            device_id=device_id,
            relay_node="r",
            listen_port=1,
            peer_ip="x",
            peer_port=1,
            transport_port=2200,
            connected_at=now - timedelta(hours=up_hours_ago),
            closed_at=None if down_hours_ago is None else now - timedelta(hours=down_hours_ago),
        )

    with env.sessions() as s, s.begin():
        s.add_all(
            [
                tunnel("dev0000001", 30, 12),
                tunnel("dev0000002", 6, None),
                tunnel("dev0000001", 40, 30),
            ]
        )
    with env.sessions() as s:
        points = tunnel_chart.online_counts(s, [Device.account_id == acme], now=now)
    counts = {round((now - at).total_seconds() / 3600): n for at, n in points}
    assert counts[24] == 1 and counts[13] == 1  # the first tunnel only
    assert counts[9] == 0
    assert counts[3] == 1 and counts[0] == 1  # the second, still open
    svg = str(tunnel_chart.render(points))
    assert "now: 1" in svg and "<polyline" in svg


def test_dashboard_decides_key_logins_but_never_lists_gate_logins(env: PortalEnv) -> None:
    """alice's own key login shows on her dashboard with Approve; a gate login is neither
    listed nor decidable by id (only its URL reaches it)."""
    admin, alice = _login(env, "alice", role="admin")
    key_id, _ = env.create_approval(ssh_login="alice", required_user_id=alice.id)
    gate_id, _ = env.create_approval()
    page = admin.http.get("/").text
    assert f'action="/approvals/{key_id}/decide"' in page
    assert f'action="/approvals/{gate_id}/decide"' not in page
    refused = admin.post(f"/approvals/{gate_id}/decide", {"decision": "approve"})
    assert refused.status_code == 404
    assert env.approval(gate_id).status == "pending"
    assert admin.post(f"/approvals/{key_id}/decide", {"decision": "approve"}).status_code == 303
    assert env.approval(key_id).status == "approved"
    assert f"approval:{key_id}" in env.hub.topics
    again = admin.post(f"/approvals/{key_id}/decide", {"decision": "reject"})
    assert again.status_code == 409 and env.approval(key_id).status == "approved"


def test_superadmin_creates_a_token_for_another_account_admins_cannot(env: PortalEnv) -> None:
    """A superadmin picks the token's account; an account admin's choice is ignored."""
    env.add_user("olga", role="admin", account="other")
    root = env.add_user("root", role="admin", account="ops", superadmin=True)
    client = env.client()
    client.login_user(root)
    page = client.http.get("/tokens").text
    assert "<option>other</option>" in page and 'id="account"' in page
    assert client.post("/tokens", {"account": "other"}).status_code == 200
    assert client.post("/tokens", {"account": "nope"}).status_code == 400
    admin, _ = _login(env, "alice", role="admin")
    assert admin.post("/tokens", {"account": "other"}).status_code == 200
    with env.sessions() as s:
        owners = sorted(
            name
            for (name,) in s.execute(
                select(Account.name).join(EnrollToken, EnrollToken.account_id == Account.id)
            )
        )
    assert owners == ["acme", "other"]
