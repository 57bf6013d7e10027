"""The portal's operations pages in real Chromium (JavaScript off) against one real `rly serve`.

One server, one real rly-client with a real sshd target, one browser context per portal
user for the whole module; the tests run in file order (each builds on the last: the
device enrolled from the token page is the one accepted, then connected to, then ended).
Screenshots go to a pytest temporary directory (printed), never into the repository.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from core import approvals
from core.models import Device, SshSession, Tunnel, User, utcnow
from tests.e2e.stack import wait_for
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyServer
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician

pytestmark = pytest.mark.slow
PASSWORD = "console test password"
NARROW = {"width": 390, "height": 844}
WIDE = {"width": 1400, "height": 900}


@dataclass
class Console:
    server: RlyServer
    processes: ProcessFactory
    sshds: SshdFactory
    sessions: sessionmaker[Session]
    shots: Path
    device_id: str = ""
    session_id: str = ""

    def url(self, path: str) -> str:
        return self.server.base_url + path

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    workdir = tmp_path_factory.mktemp("console")
    shots = tmp_path_factory.mktemp("console-screenshots")
    print(f"screenshots: {shots}")
    server = RlyServer(
        workdir, config={"relay": {"keepalive_interval": "2s", "keepalive_count": 2}}
    ).start()
    processes, sshds = ProcessFactory(workdir), SshdFactory(workdir)
    engine = create_engine(f"sqlite:///{server.data_dir / 'rly.sqlite3'}")
    try:
        server.run_cli("account", "add", "acme", check=True)
        for name, role in (("alice", "admin"), ("tom", "technician")):
            server.run_cli(
                "user", "add", name, "--account", "acme", "--role", role, "--password-stdin",
                input=PASSWORD + "\n", check=True,
            )  # fmt: skip
        yield Console(server, processes, sshds, sessionmaker(engine, expire_on_commit=False), shots)
    finally:
        processes.stop_all()
        sshds.stop_all()
        server.stop()
        engine.dispose()


def _login(console: Console, browser: Browser, username: str) -> BrowserContext:
    """A JavaScript-off context logged in as `username` (TOTP confirmed directly in the DB)."""
    with console.sessions() as s, s.begin():
        user = s.scalars(select(User).where(User.username == username)).one()
        user.totp_confirmed = True
        secret = user.totp_secret
    context = browser.new_context(java_script_enabled=False, viewport=WIDE)
    page = context.new_page()
    page.goto(console.url("/login"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_label("Authenticator code").fill(pyotp.TOTP(secret).now())
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()
    page.close()
    return context


@pytest.fixture(scope="module")
def admin(console: Console, browser: Browser) -> Iterator[Page]:
    context = _login(console, browser, "alice")
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def tech(console: Console, browser: Browser) -> Iterator[Page]:
    context = _login(console, browser, "tom")
    try:
        yield context.new_page()
    finally:
        context.close()


def _fingerprint(key_file: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(key_file)], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]


def test_token_page_command_enrolls_a_real_client_accepted_by_fingerprint(
    console: Console, admin: Page
) -> None:
    """The command shown once on the token page enrolls a real rly-client; its page's
    fingerprint matches the device's key file and Accept brings it online."""
    admin.goto(console.url("/tokens"))
    admin.get_by_label("Uses").fill("1")
    admin.get_by_label("Valid for").fill("1h")
    admin.get_by_role("button", name="Create token").click()
    command = admin.locator("#install-command").inner_text().strip()
    console.shot(admin, "tokens-created")
    assert command.endswith(" && rly-client install-service")
    enroll = shlex.split(command.split(" && ")[0])
    assert enroll[:4] == [
        "rly-client",
        "enroll",
        "--tracker",
        console.server.base_url.replace("127.0.0.1", "localhost"),
    ]
    admin.reload()  # the browser sends the form again: no second token, no command
    expect(admin.get_by_text("This form was already used")).to_be_visible()
    admin.goto(console.url("/tokens"))  # the token is never shown again
    assert "rlyet_" not in admin.content()
    expect(admin.locator("#tokens tbody tr")).to_have_count(1)
    user_ca = (console.server.data_dir / "keys" / "user_ca.pub").read_text().strip()
    sshd = console.sshds(trusted_user_ca_keys=[user_ca])
    config = console.server.workdir / "device" / "client.toml"
    extra = ["--config", str(config), "--hostname", "nas-portal", "--serial", "SN-P1"]
    extra += ["--target", "sshd", "--target-port", str(sshd.port)]
    proc = console.processes([*enroll, *extra], name="enroll")
    assert proc.wait(60) == 0, proc.output
    found = re.search(r"enrolled: device (\S+), status pending", proc.stdout)
    assert found, proc.stdout
    console.device_id = device_id = found.group(1)

    admin.goto(console.url("/devices?state=pending"))
    admin.get_by_role("link", name="nas-portal").click()
    shown = admin.locator("#key-fingerprint").inner_text().strip()
    assert shown == _fingerprint(config.with_suffix(".key"))
    console.shot(admin, "device-pending")
    admin.get_by_role("button", name="Accept").click()
    expect(admin.get_by_text("Device accepted.")).to_be_visible()
    with console.sessions() as s:
        assert s.get_one(Device, device_id).status == "accepted"

    console.processes(
        ["rly-client", "run", "--config", str(config)],
        name="rly-client",
        env={"RLY_CLIENT_BACKOFF_CAP": "2"},
    )

    def tunnel() -> Tunnel | None:
        with console.sessions() as s:
            return s.scalar(
                select(Tunnel).where(Tunnel.device_id == device_id, Tunnel.closed_at.is_(None))
            )

    up = wait_for(tunnel, 30, "the device's tunnel")
    admin.goto(console.url(f"/devices/{device_id}"))
    expect(admin.locator("h1 .badge")).to_have_text("online")
    expect(admin.get_by_text(f"{up.relay_node}, port {up.transport_port}")).to_be_visible()
    admin.goto(console.url("/devices?q=SN-P1"))
    expect(admin.locator("table.list tbody tr")).to_have_count(1)
    console.shot(admin, "devices")


def test_terminate_ends_the_technicians_session_within_a_second_naming_who(
    console: Console, admin: Page, tech: Page
) -> None:
    """Terminate on the sessions page ends tom's OpenSSH device session in < 1 s with
    "closed by alice (portal)" on his terminal."""
    assert console.device_id, "needs the enrolled device of the previous test"
    ssh = Technician(console.server.technician_port)
    try:
        link = ssh.expect(r"(http://\S+/approve/[A-Za-z0-9_-]+)").group(1)
        tech.goto(console.server.rebase(link))
        tech.set_viewport_size(NARROW)
        console.shot(tech, "approve-390")
        tech.get_by_role("button", name="Approve").click()
        expect(tech.get_by_role("heading", name="Approved")).to_be_visible()
        tech.set_viewport_size(WIDE)
        ssh.expect(re.escape("rly:tom@acme> "))
        ssh.sendline("connect nas-portal")
        ssh.sendline("echo in-$((1+2))")
        ssh.expect("in-3", timeout=15)

        def live() -> str | None:
            with console.sessions() as s:
                return s.scalar(
                    select(SshSession.id).where(
                        SshSession.device_id == console.device_id, SshSession.ended_at.is_(None)
                    )
                )

        console.session_id = session_id = wait_for(live, 10, "the session row")
        admin.goto(console.url("/sessions"))
        row = admin.locator("#live-sessions tbody tr", has_text=session_id)
        expect(row).to_contain_text("tom")
        expect(row).to_contain_text("nas-portal")
        console.shot(admin, "sessions-live")
        started = time.monotonic()
        row.get_by_role("button", name="Terminate").click()
        ssh.expect(re.escape("closed: closed by alice (portal)"), timeout=5)
        elapsed = time.monotonic() - started
        print(f"terminate -> message on the terminal: {elapsed:.3f} s")
        assert elapsed < 1.0, f"the session ended {elapsed:.2f} s after Terminate"
        ssh.expect(re.escape("rly:tom@acme> "))
        with console.sessions() as s:
            ended = s.get_one(SshSession, session_id)
            assert ended.end_reason == "closed by alice (portal)"
        admin.goto(console.url("/sessions"))
        expect(admin.locator("#recent-sessions")).to_contain_text("closed by alice (portal)")
    finally:
        ssh.close()


def test_terminate_ends_an_exec_connect_with_the_message(
    console: Console, admin: Page, tech: Page
) -> None:
    """`ssh -t relay connect DEV` terminated in the portal prints who ended it and exits."""
    assert console.device_id, "needs the enrolled device"
    ssh = Technician(console.server.technician_port, args=["-t"], command=["connect", "nas-portal"])
    try:
        link = ssh.expect(r"(http://\S+/approve/[A-Za-z0-9_-]+)").group(1)
        tech.goto(console.server.rebase(link))
        tech.get_by_role("button", name="Approve").click()
        ssh.expect("Approved by tom")
        ssh.sendline("echo ex-$((2+3))")
        ssh.expect("ex-5", timeout=15)
        admin.goto(console.url("/sessions"))
        admin.locator("#live-sessions tbody tr", has_text="tom").get_by_role(
            "button", name="Terminate"
        ).click()
        ssh.expect(re.escape("closed: closed by alice (portal)."), timeout=3)
        assert ssh.expect_eof(timeout=5) != 0
    finally:
        ssh.close()


def test_technician_cannot_reach_admin_pages_or_other_users_sessions(
    console: Console, admin: Page, tech: Page
) -> None:
    """tom gets 403 on admin pages and neither sees nor ends alice's live session."""
    assert console.device_id, "needs the enrolled device"
    for path in ("/tokens", "/users", "/users/alice", f"/devices/{console.device_id}/revoke"):
        response = tech.goto(console.url(path))
        assert response is not None and response.status == 403, path
    with console.sessions() as s, s.begin():
        alice = s.scalars(select(User).where(User.username == "alice")).one()
        s.add(
            SshSession(
                id="alicesess1",
                user_id=alice.id,
                username="alice",
                account_id=alice.account_id,
                device_id=console.device_id,
                relay_node="elsewhere",
                client_ip="203.0.113.5",
            )
        )
    try:
        tech.goto(console.url("/sessions"))
        assert "alicesess1" not in tech.content()
        csrf = tech.locator("form.logout input[name=csrf]").get_attribute("value")
        assert csrf
        ended = tech.request.post(
            console.url("/sessions/alicesess1/terminate"), form={"csrf": csrf}
        )
        assert ended.status == 404
        admin.goto(console.url("/sessions"))
        assert "alicesess1" in admin.content()
        with console.sessions() as s:
            assert not s.get_one(SshSession, "alicesess1").close_requested
    finally:
        with console.sessions() as s, s.begin():
            row = s.get_one(SshSession, "alicesess1")
            row.ended_at = utcnow()


def _pages(console: Console) -> list[str]:
    return [
        "/",
        "/devices",
        f"/devices/{console.device_id}",
        f"/devices/{console.device_id}/revoke",
        "/sessions",
        "/tokens",
        "/users",
        "/users/alice",
        "/allowlist",
    ]


def _no_inline_code(page: Page) -> None:
    assert page.locator("script").count() == 0
    assert page.locator("style").count() == 0
    assert page.locator("[style]").count() == 0


def test_pages_fit_390_and_1400_px_with_a_strict_csp(
    console: Console, admin: Page, browser: Browser
) -> None:
    """No horizontal overflow at 390 px, no table wider than its page at 1400 px, the CSP
    header on every page and no inline script or style."""
    assert console.device_id, "needs the enrolled device"
    overflow = "document.documentElement.scrollWidth <= window.innerWidth"
    tables_fit = """() => [...document.querySelectorAll('table')].every(t =>
        t.getBoundingClientRect().right <= document.documentElement.clientWidth
        && t.scrollWidth <= t.clientWidth + 1)"""
    with console.sessions() as s, s.begin():  # long names, so wrapping is really exercised
        account_id = s.get_one(Device, console.device_id).account_id
        for i in range(30):
            s.add(
                Device(
                    id=f"long{i:06d}",
                    account_id=account_id,
                    hostname=f"backup-appliance-{i:02d}.branch-office.customer-example.internal",
                    serial=f"SERIAL-{i:04d}-ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                    os_name="Debian GNU/Linux",
                    os_version="12 (bookworm) with a long vendor suffix",
                    client_version="0.1.0+build.20261201.longsuffix",
                    public_key="ssh-ed25519 AAAA",
                    key_fingerprint=f"SHA256:long{i:06d}",
                    status="accepted",
                    last_checkin_at=utcnow(),
                )
            )
        s.add(
            Device(
                id="pendingdv1",
                account_id=account_id,
                hostname="new-nas-waiting-for-review.customer-example.internal",
                serial="SN-PENDING-0001",
                public_key="ssh-ed25519 AAAA",
                key_fingerprint="SHA256:Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5",
            )
        )
        alice = s.scalars(select(User).where(User.username == "alice")).one()
        approvals.create_approval(
            s,
            ssh_login="alice",
            required_user_id=alice.id,
            client_ip="2001:db8:ffff:ffff:ffff:ffff:ffff:1234",
            client_version="SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
            relay_node="relay-eu-west-1",
            ttl=300,
        )  # the dashboard shows both, with their buttons
    for size, name in ((NARROW, "390"), (WIDE, "1400")):
        admin.set_viewport_size(size)
        for path in _pages(console):
            response = admin.goto(console.url(path))
            assert response is not None and response.status == 200, path
            csp = response.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "unsafe-inline" not in csp, path
            _no_inline_code(admin)
            assert admin.evaluate(overflow), f"{path} overflows at {name} px"
            assert admin.evaluate(tables_fit), f"a table on {path} overflows at {name} px"
            console.shot(admin, f"{name}{path.replace('/', '_') or '_'}")

    with console.sessions() as s, s.begin():
        _, token = approvals.create_approval(
            s,
            ssh_login="partner",
            required_user_id=None,
            client_ip="198.51.100.7",
            client_version="SSH-2.0-OpenSSH_9.2p1",
            relay_node="relay-with-a-rather-long-node-name-01",
            ttl=300,
        )
    admin.set_viewport_size(NARROW)
    response = admin.goto(console.url(f"/approve/{token}"))
    assert response is not None and response.status == 200
    _no_inline_code(admin)
    assert admin.evaluate(overflow)
    for button in ("Approve", "Reject"):
        box = admin.get_by_role("button", name=button).bounding_box()
        assert box is not None and box["height"] >= 44 and box["width"] >= 300, button
    code_px = admin.locator("#verification-code").evaluate(
        "e => parseFloat(getComputedStyle(e).fontSize)"
    )
    assert code_px >= 28
    console.shot(admin, "approve-page-390")
    admin.set_viewport_size(WIDE)

    anonymous = browser.new_context(java_script_enabled=False, viewport=NARROW)
    try:
        page = anonymous.new_page()
        response = page.goto(console.url("/login"))
        assert response is not None and "content-security-policy" in response.headers
        assert page.evaluate(overflow)
        _no_inline_code(page)
    finally:
        anonymous.close()


def test_repair_close_and_tunnel_mode_from_the_device_page_reach_the_device(
    console: Console, admin: Page
) -> None:
    """Repair gives the real device a new tunnel; on-demand then Close tunnel leaves it
    down; persistent brings it back: the relay and the client act on the portal's rows."""
    assert console.device_id, "needs the enrolled device"
    device_id = console.device_id

    def open_tunnel() -> int | None:
        with console.sessions() as s:
            return s.scalar(
                select(Tunnel.id).where(Tunnel.device_id == device_id, Tunnel.closed_at.is_(None))
            )

    first = wait_for(open_tunnel, 15, "the device's tunnel")
    admin.goto(console.url(f"/devices/{device_id}"))
    admin.get_by_role("button", name="Repair tunnel").click()
    expect(admin.get_by_text("Asked the device to reconnect its tunnel.")).to_be_visible()
    wait_for(lambda: (open_tunnel() or first) != first, 15, "a new tunnel after repair")

    admin.get_by_label("Tunnel mode").select_option("on-demand")
    admin.get_by_role("button", name="Save").click()
    expect(admin.get_by_text("Tunnel mode saved")).to_be_visible()
    time.sleep(1.0)  # the device's long poll answers the mode change at once
    admin.get_by_role("button", name="Close tunnel").click()
    wait_for(lambda: open_tunnel() is None, 15, "the tunnel closed")
    time.sleep(3.0)
    assert open_tunnel() is None, "an on-demand device reopened its tunnel by itself"

    admin.goto(console.url(f"/devices/{device_id}"))
    admin.get_by_label("Tunnel mode").select_option("persistent")
    admin.get_by_role("button", name="Save").click()
    wait_for(open_tunnel, 15, "the persistent tunnel back")
    with console.sessions() as s:
        assert s.get_one(Device, device_id).tunnel_mode == "persistent"
