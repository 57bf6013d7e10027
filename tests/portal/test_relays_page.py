"""The Relays page (drain, resume) and the devices pages' Relay column.

In process (TestClient on a fresh SQLite database): node rows are inserted as a
relay's registration would write them. One test drives a real Chromium against
a real `rly serve`, whose own relay node is the one drained.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta

import pyotp
import pytest
from playwright.sync_api import Browser, expect
from sqlalchemy import select

from core.db import make_engine, make_sessions
from core.models import Account, AuditEvent, Device, RelayNode, SshSession, Tunnel, User, utcnow
from tests.portal.support import Client, PortalEnv, TestUser
from tests.support.rly_server import RlyFactory

ERROR_RE = re.compile(r'<p class="error" role="alert">(.*?)</p>', re.S)


def _login(env: PortalEnv, name: str, role: str = "technician") -> tuple[Client, TestUser]:
    user = env.add_user(name, role=role)
    client = env.client()
    client.login_user(user)
    return client, user


def _node(env: PortalEnv, name: str, **kw: object) -> None:
    """A registered node, as relay.node.register_node writes it, with a fresh heartbeat."""
    now = utcnow()
    values: dict[str, object] = {
        "public_host": "relay.example.net",
        "device_ports": "80,2200",
        "technician_port": 22,
        "peer_address": "10.0.0.5:2300",
        "started_at": now - timedelta(hours=2),
        "last_seen_at": now,
        "heartbeat_interval": 5.0,
        **kw,
    }
    with env.sessions() as s, s.begin():
        s.add(RelayNode(name=name, **values))


def _device_on(env: PortalEnv, account_id: int, device_id: str, node: str) -> None:
    """An accepted device with an open tunnel on `node`."""
    with env.sessions() as s, s.begin():
        s.add(
            Device(
                id=device_id,
                account_id=account_id,
                hostname=f"host-{device_id}",
                serial=f"SN-{device_id}",
                public_key="ssh-ed25519 AAAA",
                key_fingerprint=f"SHA256:{device_id}",
                status="accepted",
            )
        )
        s.flush()
        s.add(
            Tunnel(
                device_id=device_id,
                relay_node=node,
                listen_port=40000,
                peer_ip="198.51.100.20",
                peer_port=51000,
                transport_port=2200,
            )
        )


def _account(env: PortalEnv, user: TestUser) -> int:
    with env.sessions() as s:
        return s.get_one(User, user.id).account_id


def _nodes(env: PortalEnv) -> dict[str, tuple[str, datetime | None]]:
    with env.sessions() as s:
        return {n.name: (n.state, n.drain_deadline) for n in s.scalars(select(RelayNode))}


def _relay_audit(env: PortalEnv) -> list[AuditEvent]:
    with env.sessions() as s:
        query = select(AuditEvent).where(AuditEvent.action.startswith("relay."))
        return list(s.scalars(query.order_by(AuditEvent.id)))


def _row(page: str, name: str) -> str:
    """The table row of node `name` on the Relays page."""
    for row in re.findall(r"<tr id=\"relay-\d+\">.*?</tr>", page, re.S):
        if f'<span class="strong node-name">{name}</span>' in row:
            return str(row)
    raise AssertionError(f"no row for {name}")


def _error(page: str) -> str:
    found = ERROR_RE.findall(page)
    assert len(found) == 1, page
    return html.unescape(found[0])


def test_relays_page_lists_every_node_with_state_load_and_addresses(env: PortalEnv) -> None:
    """One row per node: live, draining, gone (declared or silent), open tunnels and sessions
    counted from their rows, the device, technician and peering addresses, and the buttons."""
    admin, alice = _login(env, "alice", role="admin")
    acme = _account(env, alice)
    now = utcnow()
    _node(env, "relay-a")
    _node(env, "relay-b", state="draining", drain_deadline=now + timedelta(minutes=5))
    _node(env, "relay-c", gone_at=now - timedelta(minutes=1), last_seen_at=now - timedelta(1))
    _node(env, "relay-d", last_seen_at=now - timedelta(seconds=20), peer_address="")  # silent
    _device_on(env, acme, "dev0000001", "relay-a")
    _device_on(env, acme, "dev0000002", "relay-b")
    with env.sessions() as s, s.begin():
        s.add(
            SshSession(
                id="sess000001", user_id=alice.id, username="alice", account_id=acme,
                device_id="dev0000002", relay_node="relay-b", client_ip="198.51.100.9",
            )
        )  # fmt: skip
    page = admin.http.get("/relays")
    assert page.status_code == 200
    assert '<a href="/relays">Relays</a>' in page.text  # in the admin nav
    a, b, c, d = (_row(page.text, n) for n in ("relay-a", "relay-b", "relay-c", "relay-d"))
    assert ">live</span>" in a and "Drain</button>" in a and "Resume" not in a
    assert '<a href="/devices?relay=relay-a">1</a>' in a  # one open tunnel
    assert "<code>relay.example.net:80,2200</code>" in a
    assert "<code>relay.example.net:22</code>" in a and "<code>10.0.0.5:2300</code>" in a
    assert re.search(r">[0-2] s ago</time>", a), a
    assert ">draining</span>" in b and "sessions end by" in b and "Resume</button>" in b
    assert '<td data-label="Sessions">1</td>' in b and "Drain</button>" not in b
    assert ">gone</span>" in c and "since" in c and "<button" not in c
    assert ">gone</span>" in d and "<button" not in d and "peering</span> off</td>" in d
    assert re.search(r">(19|20|21) s ago</time>", d), d


def test_technicians_get_no_relays_page_or_actions(env: PortalEnv) -> None:
    """A technician sees no Relays link, gets 403 for the page and for drain, nothing changes."""
    tech, _ = _login(env, "tom")
    _node(env, "relay-a")
    assert '<a href="/relays">' not in tech.http.get("/devices").text
    assert tech.http.get("/relays").status_code == 403
    refused = tech.post("/relays/relay-a/drain", {"deadline": "1m"})
    assert refused.status_code == 403 and "Only account admins may do this." in refused.text
    assert _nodes(env)["relay-a"] == ("live", None) and _relay_audit(env) == []


def test_drain_and_resume_are_the_clis_with_audit_rows(env: PortalEnv) -> None:
    """Drain sets the node draining with the deadline (default 10m, as the CLI), audits it as
    the admin and wakes the node; Resume makes it live again, audited too."""
    admin, alice = _login(env, "alice", role="admin")
    _node(env, "relay-a")
    _node(env, "relay-b")
    before = utcnow()
    drained = admin.post("/relays/relay-a/drain", {"deadline": "90s"})
    assert drained.status_code == 303 and drained.headers["location"] == "/relays?done=drain"
    state, deadline = _nodes(env)["relay-a"]
    assert state == "draining" and deadline is not None
    assert timedelta(seconds=89) <= deadline - before <= timedelta(seconds=92)
    assert "node:relay-a" in env.hub.topics
    page = admin.http.get("/relays?done=drain").text
    assert "Drain started" in page and ">drained</span>" in _row(page, "relay-a")  # empty
    assert admin.post("/relays/relay-b/drain").status_code == 303  # an empty field: 10 min
    _state, default = _nodes(env)["relay-b"]
    assert default is not None
    assert timedelta(minutes=9, seconds=58) <= default - before <= timedelta(minutes=10, seconds=3)
    resumed = admin.post("/relays/relay-a/resume")
    assert resumed.status_code == 303 and _nodes(env)["relay-a"] == ("live", None)
    assert env.hub.topics.count("node:relay-a") == 2
    rows = [
        (e.action, e.actor, e.target, e.detail, e.account_id, e.source_ip)
        for e in _relay_audit(env)
    ]
    acme = _account(env, alice)
    assert rows == [
        ("relay.drain", "alice", "relay-a", "deadline=90s", acme, "testclient"),
        ("relay.drain", "alice", "relay-b", "deadline=600s", acme, "testclient"),
        ("relay.resume", "alice", "relay-a", "", acme, "testclient"),
    ]


@pytest.mark.parametrize(
    ("path", "form", "status", "error"),
    [
        ("/relays/relay-x/drain", {}, 400, "relay node 'relay-x' is not registered"),
        ("/relays/-bad%20name/drain", {}, 400, "relay node name is invalid"),
        ("/relays/relay-a/drain", {"deadline": "soon"}, 400, "deadline: not a duration"),
        ("/relays/relay-a/drain", {"deadline": "8d"}, 400, "the drain deadline must be between"),
        ("/relays/relay-a/resume", {}, 400, "relay node relay-a is not draining"),
        ("/relays/relay-g/drain", {}, 400, "relay node relay-g is gone: nothing to drain"),
        ("/relays/relay-d/drain", {}, 400, "relay node relay-d is already draining"),
    ],
)
def test_bad_drain_requests_get_one_line_and_change_nothing(
    env: PortalEnv, path: str, form: dict[str, str], status: int, error: str
) -> None:
    """An unknown or malformed node name, a bad deadline or a wrong state: one line, 400,
    no row changed, no audit row."""
    admin, _ = _login(env, "alice", role="admin")
    _node(env, "relay-a")
    _node(env, "relay-d", state="draining", drain_deadline=utcnow() + timedelta(minutes=1))
    _node(env, "relay-g", gone_at=utcnow())
    before = _nodes(env)
    refused = admin.post(path, form)
    assert refused.status_code == status
    line = _error(refused.text)
    assert line.startswith(error) and "\n" not in line, line
    assert _nodes(env) == before and _relay_audit(env) == []
    assert not any(t.startswith("node:") for t in env.hub.topics)


def test_drain_without_the_csrf_token_or_with_an_unknown_action_is_refused(
    env: PortalEnv,
) -> None:
    """A drain POST without this session's CSRF token is a 403, an unknown action a 404."""
    admin, _ = _login(env, "alice", role="admin")
    _node(env, "relay-a")
    missing = admin.post("/relays/relay-a/drain", {"deadline": "1m"}, csrf=False)
    assert missing.status_code == 403 and "did not come from this site" in missing.text
    forged = admin.post("/relays/relay-a/drain", {"csrf": "forged"}, csrf=False)
    assert forged.status_code == 403
    assert admin.post("/relays/relay-a/delete").status_code == 404
    assert _nodes(env)["relay-a"] == ("live", None) and _relay_audit(env) == []


def test_devices_pages_name_the_node_holding_each_tunnel(env: PortalEnv) -> None:
    """The device list has a Relay column (and a filter the Relays page links); the device
    page names the node too."""
    admin, alice = _login(env, "alice", role="admin")
    acme = _account(env, alice)
    _node(env, "relay-a")
    _node(env, "relay-b")
    _device_on(env, acme, "dev0000001", "relay-a")
    _device_on(env, acme, "dev0000002", "relay-b")
    listing = admin.http.get("/devices").text
    assert "<th>Relay</th>" in listing
    cells = re.findall(r'<td data-label="Relay" class="relay-node">(.*?)</td>', listing)
    assert cells == ['<a href="/relays">relay-a</a>', '<a href="/relays">relay-b</a>']
    only_b = admin.http.get("/devices?relay=relay-b").text
    assert "dev0000002" in only_b and "dev0000001" not in only_b and "1 device matches" in only_b
    assert "0 devices match" in admin.http.get("/devices?relay=relay-c").text
    assert "relay-b, port 2200, over ssh" in admin.http.get("/devices/dev0000002").text
    tech, _ = _login(env, "tom")
    tech_cells = re.findall(
        r'<td data-label="Relay" class="relay-node">(.*?)</td>', tech.http.get("/devices").text
    )
    assert tech_cells == ["relay-a", "relay-b"]  # named, not linked to the admin page


@pytest.mark.slow
def test_drain_button_in_chromium_drains_the_real_relay(
    rly_factory: RlyFactory, browser: Browser
) -> None:
    """In Chromium (JavaScript off) an admin drains the real relay of `rly serve` from the
    Relays page: the row says draining, the relay itself starts draining, `rly relay list`
    agrees; Resume makes it live again. The page fits 390 px."""
    server = rly_factory(config={"relay": {"node_name": "relay-portal"}})
    server.run_cli("account", "add", "acme", check=True)
    server.run_cli(
        "user", "add", "alice", "--account", "acme", "--role", "admin", "--password-stdin",
        input="relays test password\n", check=True,
    )  # fmt: skip
    engine = make_engine(f"sqlite:///{server.data_dir / 'rly.sqlite3'}")
    sessions = make_sessions(engine)
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 1400, "height": 900}
    )
    try:
        with sessions() as s, s.begin():
            user = s.scalars(select(User).where(User.username == "alice")).one()
            user.totp_confirmed, secret = True, user.totp_secret
            acme = s.scalars(select(Account).where(Account.name == "acme")).one().id
            s.add(
                Device(
                    id="devbusy001", account_id=acme, hostname="nas-busy", serial="SN-B",
                    public_key="ssh-ed25519 AAAA", key_fingerprint="SHA256:b", status="accepted",
                )
            )  # fmt: skip
            s.flush()  # an open tunnel row keeps the node "draining" rather than "drained"
            s.add(
                Tunnel(
                    device_id="devbusy001", relay_node="relay-portal", listen_port=1,
                    peer_ip="127.0.0.1", peer_port=2, transport_port=server.device_port,
                )
            )  # fmt: skip
        page = context.new_page()
        page.goto(f"{server.base_url}/login")
        page.get_by_label("Username").fill("alice")
        page.get_by_label("Password").fill("relays test password")
        page.get_by_label("Authenticator code").fill(pyotp.TOTP(secret).now())
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("link", name="Relays").click()
        row = page.locator("#relays tbody tr", has_text="relay-portal")
        expect(row.locator(".badge")).to_have_text("live")
        expect(row).to_contain_text(f"127.0.0.1:{server.technician_port}")
        row.get_by_label("Deadline").fill("5m")
        row.get_by_role("button", name="Drain").click()
        expect(page.get_by_role("status")).to_contain_text("Drain started")
        expect(row.locator(".badge")).to_have_text("draining")
        expect(row).to_contain_text("sessions end by")
        assert server.process is not None
        server.process.wait_for_line("draining node relay-portal", 10, stream="stderr")
        listed = server.run_cli("relay", "list", check=True).stdout.splitlines()
        assert [line.split()[1] for line in listed if line.startswith("relay-portal")] == [
            "draining"
        ]
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        row.get_by_role("button", name="Resume").click()
        expect(row.locator(".badge")).to_have_text("live")
        server.process.wait_for_line("takes tunnels again", 10, stream="stderr")
        with sessions() as s:
            actions = s.scalars(
                select(AuditEvent.action).where(AuditEvent.target == "relay-portal")
            ).all()
        assert list(actions) == ["relay.drain", "relay.resume"]
    finally:
        context.close()
        engine.dispose()
